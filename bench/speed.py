"""
The speed of train_gpt2.py's training step, for its modes that measure rather than train:

    python train_gpt2.py --benchmark                   # tokens/s, MFU and memory of the real step, on random tokens
    python train_gpt2.py --benchmark --profile=prof    # then a torch.profiler trace of three more steps
    python train_gpt2.py --batch_size=auto             # the largest micro-batch that fits, found by real steps

train_gpt2.py hands these functions its own step as a callable: this file imports nothing of the trainer.
"""

import os
import time

import torch
import torch.distributed as dist

from common import UserError, rng_state, set_rng_state


# Peak dense bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets (no sparsity), for MFU. The first
# name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12,
              "T4": 65e12}


def device_peak_flops(device, setting=0.0):
    """One device's peak FLOP/s: the peak_flops setting if given, else from the GPU's name; None if unknown."""
    if setting:
        return setting
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def speed(tokens_per_step, seconds, processes, flops_per_token, peak):
    """(tokens/s of the whole job, tokens/s of one process, MFU of one device in % or None). Each process
    does 1/processes of the step's work on its own device, so MFU divides one process's FLOPs by one peak."""
    per_process = tokens_per_step / processes / seconds
    return tokens_per_step / seconds, per_process, (100 * flops_per_token * per_process / peak if peak else None)


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def run_benchmark(step, device_type, say, describe, warmup=3, measured=10):
    """Time step() (one optimizer step, returning its loss) after `warmup` steps of compilation and warm-up.
    describe(loss, seconds_per_step) gives the two lines' words up to the peak memory; said on rank 0."""
    for _ in range(warmup):
        step()
    synchronize(device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(measured):
        loss = step()
    synchronize(device_type)
    seconds = (time.time() - t0) / measured
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device_type == "cuda" else "n/a (CPU)"
    what, speed = describe(loss, seconds)
    say(f"benchmark: {what}")
    say(f"benchmark: {1000 * seconds:.1f} ms/step | {speed} | peak memory {memory}")


def profile_steps(step, directory, device_type, master, steps=3):
    """Run `steps` steps under torch.profiler (on every process: the steps hold collectives); on rank 0 write
    the trace (chrome://tracing or Perfetto) into directory and print the ten costliest kernels on a GPU
    (operators on a CPU), by their own time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device_type)
    if not master:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "trace.json")
    profiler.export_chrome_trace(path)
    sort_by = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=10))
    print(f"profile: {steps} steps, trace in {path}")


def micro_batches(total_batch_size, block_size, world_size):
    """The micro-batches that keep total_batch_size with gradient accumulation: the powers of two that divide
    each process's sequences per step, largest first."""
    sequences, rest = divmod(total_batch_size, block_size * world_size)
    if rest:
        return []
    return [b for b in (2 ** i for i in range(sequences.bit_length(), -1, -1)) if b <= sequences and sequences % b == 0]


def find_batch_size(fits, candidates, device, say):
    """--batch_size=auto on CUDA: the first candidate (largest first) for which fits(batch) returns True on
    every process. fits runs real training steps (optimizer state made, DDP's buckets or FSDP's shards as the
    run has them) and returns False if they ran out of memory."""
    out_of_memory = []
    for batch in candidates:
        try:
            fit = fits(batch)
        except torch.OutOfMemoryError:
            fit = False
        torch.cuda.empty_cache()
        fit = torch.tensor(float(fit), device=device)
        if dist.is_initialized():
            dist.all_reduce(fit, op=dist.ReduceOp.MIN)  # it must fit on every process
        if fit.item():
            tried = ", ".join(f"{b}: out of memory" for b in out_of_memory) or \
                "the largest candidate; a larger one may fit"
            say(f"auto batch_size: {batch} ({tried})")
            return batch
        out_of_memory.append(batch)
    raise UserError(f"not even a micro-batch of 1 sequence fits on {device}; try --activation_checkpointing, a "
                    f"shorter --block_size or a smaller model")


def benchmark(step, model, cfg, system):
    """--benchmark: time the real training step (step(), on random tokens) and print tokens/s, MFU and peak
    memory; with --profile, then profile three more steps."""
    say = print if system.master else (lambda *args, **kwargs: None)

    def describe(loss, seconds):
        tokens, per_process, mfu = speed(cfg.total_batch_size, seconds, system.world_size, model.flops_per_token(),
                                         device_peak_flops(system.device, cfg.peak_flops))
        unit = "GPU" if system.device_type == "cuda" else "process"
        mfu = f"{mfu:.1f}% per {unit}" if mfu else "n/a (no peak FLOP/s known for this device: set --peak_flops)"
        return (f"{model.num_params():,} parameters, {cfg.total_batch_size:,} tokens per step, loss {loss:.4f}",
                f"{tokens:,.0f} tok/s | {per_process:,.0f} tok/s per {unit} | mfu {mfu}")
    run_benchmark(step, system.device_type, say, describe)
    if cfg.profile:
        profile_steps(step, cfg.profile, system.device_type, system.master)


def search_batch_size(steps_at, cfg, system, default):
    """--batch_size=auto: the largest micro-batch that keeps total_batch_size and fits. On CUDA each candidate,
    largest first, gets two real training steps of steps_at(batch) (a new one for each try, so that a try that
    ran out of memory leaves no half-made optimizer state to the next): the second holds AdamW's moments, made
    at the first. Elsewhere no search: the default, or the largest candidate below it."""
    say = print if system.master else (lambda *args, **kwargs: None)
    candidates = micro_batches(cfg.total_batch_size, cfg.block_size, system.world_size)
    if not candidates:
        raise UserError(f"total_batch_size {cfg.total_batch_size:,} is not a multiple of block_size x processes = "
                        f"{cfg.block_size} x {system.world_size}; --batch_size=auto needs one")
    if system.device_type != "cuda":
        batch = next((b for b in candidates if b <= default), 1)
        say(f"auto batch_size: {batch} (the default {default} or the largest below it that keeps total_batch_size: "
            f"the search runs on CUDA only)")
        return batch
    rng = rng_state("cuda")

    def fits(batch):
        step = steps_at(batch)
        step(), step()
        torch.cuda.synchronize()
        return True
    batch = find_batch_size(fits, candidates, system.device, say)
    set_rng_state(rng)
    return batch


def out_of_memory_advice(batch_size, block_size, total_batch_size, world_size, device):
    """The one line for an out-of-memory error: a smaller micro-batch that keeps total_batch_size."""
    if batch_size == "auto":  # out of memory before the search: the model alone does not fit
        return (f"out of memory on {device} before any micro-batch was tried; try --activation_checkpointing "
                f"or a smaller model")
    smaller = [b for b in micro_batches(total_batch_size, block_size, world_size) if b < batch_size]
    hint = f"try --batch_size={smaller[0]} or --batch_size=auto" if smaller else \
        "try --activation_checkpointing, a shorter --block_size or a smaller model"
    return (f"out of memory on {device} with micro-batch {batch_size} x {block_size} tokens; {hint} "
            f"(gradient accumulation keeps total_batch_size={total_batch_size:,})")
