"""
A training run's directory and its checkpoint files, for train_gpt2.py: one run owns out_dir (a lock the OS
releases when the process dies); each checkpoint ckpt_{step}.pt holds everything the run needs to go on exactly
where it was, written whole or not at all; the newest few are kept, and so are the best and the last good one,
so that a run that blows up never pushes out the checkpoint to go back to.
"""

import glob
import math
import os
import shlex

import torch
import torch.distributed as dist

from common import UserError, atomic_write, check_writable_dir, lock_dir

# Checkpoints carry this number; a checkpoint of another format is refused with the commit that reads it.
FORMAT = 2
FORMAT_1_COMMIT = "e955871"  # the last commit that reads format 1 (checkpoints without a format number)
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # init_from's names of OpenAI's models


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")))


def step_of(path):
    """The step of a checkpoint file, from its name ckpt_0000250.pt."""
    return int(os.path.basename(path)[len("ckpt_"):-len(".pt")])


def unused_name(path):
    """path, or path.1, path.2, ...: the first that names no file yet."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def claim_out_dir(out_dir, resuming, resume_step):
    """Own out_dir for a training run, before anything slow: a writable directory that no other run is writing
    and that holds no checkpoints of another run (the log of a run that saved none is set aside). Going back to
    an older checkpoint of the run sets the later ones aside, never over files set aside before.
    Returns (the lock, whether out_dir was made here), for release_out_dir."""
    made = not os.path.exists(out_dir)
    check_writable_dir(out_dir, "out_dir")
    lock = None
    try:
        lock = lock_dir(out_dir, "another training run")
        paths = checkpoint_paths(out_dir)
        if paths and not resuming:
            raise UserError(f"{out_dir} holds the checkpoints of another run (the newest: "
                            f"{os.path.basename(paths[-1])}); to go on with it: --init_from=resume "
                            f"--out_dir={out_dir}; to start a new run, name another --out_dir or delete {out_dir}")
        old_log = os.path.join(out_dir, "log.txt")
        if not resuming and os.path.exists(old_log):  # a run that saved no checkpoint: its log is not this run's
            kept = unused_name(old_log + ".old")
            os.replace(old_log, kept)
            print(f"{out_dir} held the log.txt of an earlier run with no checkpoint: kept as {os.path.basename(kept)}")
        later = [path for path in paths if resuming and step_of(path) > resume_step]
        for path in later:
            os.replace(path, unused_name(path + ".abandoned"))
        if later:
            print(f"going back to step {resume_step}: set aside {len(later)} later checkpoint(s) of the run as "
                  f"*.pt.abandoned* (delete them when you no longer want them)")
    except BaseException:
        release_out_dir(out_dir, lock, made, succeeded=False)
        raise
    return lock, made


def release_out_dir(out_dir, lock, made, succeeded):
    """Let go of out_dir. One that this run made and that holds nothing of it (the run failed or was stopped
    during set-up) goes too."""
    if lock is not None:
        os.close(lock)
    if made and not succeeded and os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {".lock"}:
        if os.path.exists(os.path.join(out_dir, ".lock")):
            os.remove(os.path.join(out_dir, ".lock"))
        os.rmdir(out_dir)


def check_room(out_dir, checkpoint_bytes, keep, existing):
    """Warn, before the first save, if the disk cannot hold keep + 1 checkpoints (the newest is written before
    the oldest is removed)."""
    import shutil
    needed, free = max(0, keep + 1 - existing) * checkpoint_bytes, shutil.disk_usage(out_dir).free
    if free < needed:
        print(f"warning: {out_dir} has {free / 1e9:.2f} GB free, but {keep + 1} checkpoints of "
              f"~{checkpoint_bytes / 1e9:.2f} GB need {needed / 1e9:.2f} GB more; free some space or lower "
              f"--keep_checkpoints")


def load_checkpoint(path):
    """A checkpoint of train_gpt2.py, loaded with weights_only=True (reading it runs no code) and mapped from the
    file rather than read into memory (eight processes resuming GPT-2 XL do not each hold a 19 GB copy)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:  # torch.save writes a zip archive
        raise UserError(f"{path} is not a checkpoint (not a file that torch.save wrote); give a ckpt_*.pt file "
                        f"of train_gpt2.py, resume, a GPT-2 name or a Hugging Face directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupted or not a checkpoint ({type(e).__name__}); delete it "
                        f"to resume from an older one") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this script (no model, config or step in it)")
    if checkpoint.get("format", 1) != FORMAT:
        raise UserError(f"{path} is a checkpoint of format {checkpoint.get('format', 1)}, this train_gpt2.py reads "
                        f"format {FORMAT}; read it with commit {FORMAT_1_COMMIT} of this repository (git checkout "
                        f"{FORMAT_1_COMMIT}), e.g. to export it with --export_hf")
    return checkpoint


def checkpoint_of(init_from, out_dir):
    """The checkpoint dict that init_from names (resume: the newest in out_dir), or None for scratch, a GPT-2
    name or a Hugging Face directory."""
    if init_from == "scratch" or init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "config.json")):
        return None
    if init_from == "resume":
        paths = checkpoint_paths(out_dir)
        if not paths:
            raise UserError(f"no checkpoint (ckpt_*.pt) in {out_dir} to resume; set --out_dir to the directory of "
                            f"the run, or --init_from to a checkpoint file or a model")
        init_from = paths[-1]
    if not init_from.endswith(".pt") and not os.path.isfile(init_from):
        raise UserError(f"--init_from={init_from} is neither a checkpoint file, a directory with a config.json, "
                        f"nor one of: scratch, resume, {', '.join(PRETRAINED)}")
    return load_checkpoint(init_from)


def resumes(init_from, out_dir, checkpoint):
    """Whether init_from goes on with the run in out_dir: resume, or one of its own checkpoints named as a file
    (to go back to an earlier step, after the run diverged, say). Any other checkpoint only gives weights."""
    if init_from == "resume":
        return True
    return (checkpoint is not None and "optimizers" in checkpoint and os.path.isdir(out_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(init_from)), out_dir))


def rng_state():
    """The process's random number generators' states: the CPU's, and the GPU's on CUDA."""
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_finite(parameters, device):
    """Whether every weight is finite on every process: under FSDP each process sees only its own shards."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
    finite = torch.tensor(float(all(torch.isfinite(p).all() for p in local)), device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_checkpoint(run, settings, system, val_loss=None):
    """A checkpoint of everything the run needs to go on exactly where it is; never of non-finite weights.
    Keeps the newest keep_checkpoints of this run's checkpoints, its best (the lowest validation loss) and
    its last good one (judge_pending), whatever the intervals. Every process takes part (under FSDP the state
    is gathered); returns whether one was written."""
    out_dir, max_lr = settings["out_dir"], settings["max_lr"]
    if not all_finite(run.model.parameters(), system.device):
        system.say(f"step {run.step}: the model has non-finite weights; no checkpoint written")
        return False
    rng = [rng_state()]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state())
    if system.fsdp:
        from fsdp import full_state_dicts
        model_state, optimizer_states = full_state_dicts(run.model, run.optimizers)
    else:
        model_state, optimizer_states = run.model.state_dict(), [o.state_dict() for o in run.optimizers]
    if not system.master:
        return True
    path = os.path.join(out_dir, f"ckpt_{run.step:07d}.pt")
    if val_loss is not None and (run.best is None or val_loss <= run.best["val_loss"]):
        run.best = {"file": os.path.basename(path), "val_loss": val_loss, "max_lr": max_lr}
    run.pending = {"file": os.path.basename(path), "max_lr": max_lr}  # good or not: its next step's loss says
    state = {"format": FORMAT, "model": model_state, "optimizers": optimizer_states, "scaler": run.scaler.state_dict(),
             "config": vars(run.model.config), "settings": settings, "step": run.step,
             "loader": run.train_loader.state_dict(), "rng": rng, "val_loss": val_loss,
             "best_val_loss": run.best_val_loss, "best": run.best, "good": run.good, "lowest_loss": run.lowest_loss,
             "run_id": run.run_id, "wandb_id": run.wandb_id}
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-write leaves the previous checkpoint whole
    kept = {os.path.join(out_dir, good["file"]) for good in (run.best, run.good) if good}
    paths = sorted(set(run.checkpoints) | {path})
    for old in paths[:-settings["keep_checkpoints"]]:
        if old not in kept:
            os.remove(old)
    run.checkpoints = [p for p in paths if os.path.exists(p)]
    system.say(f"saved {path}")
    return True


def restore_training_state(run, checkpoint, system):
    """Optimizers, loss scaler, data position, step, the run's record and random states from its checkpoint."""
    if "optimizers" not in checkpoint:
        raise UserError("the newest checkpoint holds a model but no training state to resume; start a new run "
                        "from its weights with --init_from=PATH_OF_THE_CHECKPOINT")
    for optimizer, state in zip(run.optimizers, checkpoint["optimizers"], strict=True):
        peaks = [group["peak_lr"] for group in optimizer.param_groups]  # this run's settings, not the saved ones
        if system.fsdp:
            from fsdp import load_optimizer_state
            load_optimizer_state(run.model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["peak_lr"] = peak
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.train_loader.load_state_dict(checkpoint["loader"])
    for name in ("step", "best_val_loss", "best", "good", "lowest_loss", "run_id", "wandb_id"):
        setattr(run, name, checkpoint[name])
    run.pending = {"file": f"ckpt_{run.step:07d}.pt", "max_lr": checkpoint["settings"]["max_lr"]}
    if len(checkpoint["rng"]) == system.world_size:
        set_rng_state(checkpoint["rng"][system.rank])
    else:
        system.say(f"note: the checkpoint was written by {len(checkpoint['rng'])} processes, not "
                   f"{system.world_size}: random states start afresh")


def judge_pending(run, loss, vocab_size):
    """The first training loss after a checkpoint is that of its weights: within a nat of the run's lowest (and of
    a uniform guess's, ln(vocab_size)), the checkpoint is the run's last good one. A run that blows up is far out."""
    if math.isfinite(loss):
        run.lowest_loss = min(run.lowest_loss, loss)
    if run.pending is not None:
        if math.isfinite(loss) and loss <= min(run.lowest_loss, math.log(vocab_size)) + 1:
            run.good = {**run.pending, "loss": loss}
        run.pending = None


def resume_advice(run, out_dir, max_lr):
    """Where a training run that went wrong goes on from: its best checkpoint (the lowest validation loss) or
    else its last good one (judge_pending), at half the rate of the run that wrote it."""
    good = run.best or run.good
    if good is None:
        return (f"no checkpoint of this run is good to go back to: start again with a lower --max_lr (this run "
                f"used {max_lr:g}) or a longer --warmup_steps, in a new --out_dir")
    path = os.path.join(out_dir, good["file"])
    quality = f"validation loss {good['val_loss']:.4f}" if "val_loss" in good else f"training loss {good['loss']:.4f}"
    kind = "best" if good is run.best else "last good"
    return (f"the {kind} checkpoint is {path} ({quality}): go on from it with a lower learning rate, python "
            f"train_gpt2.py --init_from={shlex.quote(path)} --out_dir={shlex.quote(out_dir)} "
            f"--max_lr={good['max_lr'] / 2:g}")
