"""Nothing lost, never a traceback: train_gpt2.py under everyday mistakes and faults. One run owns its out_dir;
the best checkpoint survives a divergence; a stop signal or a bad shard keeps every finished step; bad values,
full disks and unusable directories are one `error:` line."""
import errno
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, read_log, run_script, write_bin
import common
import train_gpt2
from train_gpt2 import DataLoader, parse_settings


@pytest.fixture(autouse=True)
def signal_handlers():
    """Runs in this process install the trainer's SIGTERM/SIGINT handlers: put pytest's back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def train(capsys, *args):
    """train_gpt2.py with TINY and args, in this process: (exit status, stdout, stderr)."""
    try:
        train_gpt2.main([*TINY, *map(str, args)])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(status, err):
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def checkpoints(out):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(str(out)), "ckpt_*.pt")))


def contents(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in checkpoints(out) + ["log.txt"]}

# --- one run per out_dir -------------------------------------------------------------------------


def test_a_new_run_into_a_used_out_dir_is_refused_and_loses_nothing(shard_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    run = [f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=4", "--checkpoint_interval=2"]
    assert train(capsys, *run)[0] == 0
    before = contents(out)
    assert checkpoints(out) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    status, stdout, err = train(capsys, *run, "--max_lr=1e-3")  # the same command with another setting
    err = one_error_line(status, err)
    assert f"{out} holds the checkpoints of another run (the newest: ckpt_0000004.pt)" in err
    assert f"--init_from=resume --out_dir={out}" in err and "another --out_dir" in err
    assert contents(out) == before  # not a byte changed, not a line appended


def test_a_second_run_into_an_out_dir_in_use_names_the_first(shard_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = TINY + [f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=100000", "--checkpoint_interval=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "train_gpt2.py", *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in first.stdout:
            if line.startswith("1 train"):
                break
        second = run_script("train_gpt2.py", *args)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"{out} is in use by another training run (process {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    steps = [step for step, kind, _ in read_log(out / "log.txt") if kind == "train"]
    assert steps == list(range(len(steps)))  # the second run wrote nothing: each step once, in order


def test_temporary_files_of_killed_writers_are_swept_at_start(shard_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"ckpt_0000002.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half a checkpoint")
    status, stdout, _ = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=1")
    assert status == 0 and not stale.exists()
    assert f"removed 1 unfinished file(s) of killed processes from {out}" in stdout

# --- the best checkpoint survives a divergence ---------------------------------------------------


def test_the_best_checkpoint_outlives_diverged_ones_and_the_run_goes_back_to_it(shard_dir, tmp_path, capsys,
                                                                                  monkeypatch, one_thread):
    out = tmp_path / "out"
    run = [f"--data_dir={shard_dir}", f"--out_dir={out}", "--eval_interval=2", "--checkpoint_interval=2",
           "--keep_checkpoints=2"]
    # Validation losses that fall to step 4, then climb: a run going wrong while staying finite.
    val_losses = {0: 9.0, 2: 5.0, 4: 4.0, 6: 6.0, 8: 7.0, 10: 8.0}
    monkeypatch.setattr(train_gpt2, "evaluate", lambda step, *args: val_losses.get(step, 9.0))
    assert train(capsys, *run, "--max_steps=10")[0] == 0
    assert checkpoints(out) == ["ckpt_0000004.pt", "ckpt_0000008.pt", "ckpt_0000010.pt"]  # the newest two, and the best

    # Then it blows up: three non-finite steps stop it, naming the checkpoint to go back to.
    monkeypatch.setattr(train_gpt2, "train_step", lambda *args, **kwargs: (float("nan"), 1.0, 1e-3, False, False))
    status, stdout, err = train(capsys, *run, "--init_from=resume", "--max_steps=14")
    err = one_error_line(status, err)
    best = out / "ckpt_0000004.pt"
    assert "non-finite loss or gradient norm for 3 steps in a row" in err
    assert f"the best checkpoint is {best} (validation loss 4.0000)" in err
    assert f"python train_gpt2.py --init_from={best} --out_dir={out}" in err

    # Going back to it resumes the run from step 4; the later checkpoints are set aside, not deleted.
    later = [name for name in checkpoints(out) if name != "ckpt_0000004.pt"]
    # The best survived the failing run's saves too, and so did the last good one (8, the last whose loss was seen).
    assert "ckpt_0000004.pt" in checkpoints(out) and later == ["ckpt_0000008.pt", "ckpt_0000010.pt", "ckpt_0000012.pt"]
    monkeypatch.undo()
    status, stdout, err = train(capsys, *run, f"--init_from={best}", "--max_steps=6", "--max_lr=3e-4")
    assert status == 0, err
    assert "resuming from step 4" in stdout and "set aside 3 later checkpoint(s)" in stdout
    assert checkpoints(out) == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "*.abandoned"))) == [f"{name}.abandoned" for name in later]
    assert torch.load(out / "ckpt_0000006.pt", weights_only=True)["settings"]["max_lr"] == 3e-4

# --- stop signals and bad shards keep every finished step ----------------------------------------


def signal_at_train_batch(monkeypatch, number):
    """Send this process SIGTERM as the training loader hands out its `number`-th micro-batch."""
    calls, next_batch = [], DataLoader.next_batch

    def sending(self):
        if len(self.sources) == 2:  # the training shards; validation has one
            calls.append(1)
            if len(calls) == number:
                os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(self)
    monkeypatch.setattr(DataLoader, "next_batch", sending)


def test_a_signal_between_micro_steps_drops_the_step_and_resume_is_bit_for_bit(shard_dir, tmp_path, capsys,
                                                                               monkeypatch, one_thread):
    run = [f"--data_dir={shard_dir}", "--max_steps=6", "--checkpoint_interval=6", "--eval_interval=6"]
    assert train(capsys, *run, f"--out_dir={tmp_path / 'whole'}")[0] == 0
    assert train(capsys, *run, f"--out_dir={tmp_path / 'three'}", "--checkpoint_interval=3", "--max_steps=3")[0] == 0
    # TINY takes 4 micro-steps a step: the 14th micro-batch is the second of step 3 (counting from 0).
    signal_at_train_batch(monkeypatch, 14)
    status, stdout, err = train(capsys, *run, f"--out_dir={tmp_path / 'cut'}")
    assert status == 0, err
    assert "stopped by a signal after step 3" in stdout
    checkpoint = torch.load(tmp_path / "cut" / "ckpt_0000003.pt", weights_only=True)
    # The data position is the start of step 3, where a run of three steps stops.
    assert checkpoint["loader"] == torch.load(tmp_path / "three" / "ckpt_0000003.pt", weights_only=True)["loader"]
    monkeypatch.undo()
    status, stdout, err = train(capsys, *run, f"--out_dir={tmp_path / 'cut'}", "--init_from=resume")
    assert status == 0 and "resuming from step 3" in stdout, err
    whole = torch.load(tmp_path / "whole" / "ckpt_0000006.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "ckpt_0000006.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_signal_at_an_evaluation_step_saves_at_once_without_evaluating(shard_dir, tmp_path, capsys, monkeypatch,
                                                                          one_thread):
    signal_at_train_batch(monkeypatch, 8)  # the last micro-batch of step 1: the step finishes, then stops
    out = tmp_path / "out"
    status, stdout, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=10",
                                "--eval_interval=2")
    assert status == 0, err
    assert checkpoints(out) == ["ckpt_0000002.pt"]
    assert [(step, kind) for step, kind, _ in read_log(out / "log.txt") if kind == "val"] == [(0, "val")]


def test_a_bad_token_in_a_later_shard_saves_the_steps_done_then_names_the_shard(shard_dir, tmp_path, capsys,
                                                                                one_thread):
    later = shard_dir / "tiny_train_000002.bin"
    tokens = np.random.default_rng(2).integers(0, 256, 6000)
    tokens[100] = 300  # not below TINY's vocab_size of 256
    write_bin(later, tokens)
    out = tmp_path / "out"
    status, stdout, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=100",
                                "--checkpoint_interval=1000", "--shuffle=False")  # the bad shard comes second
    err = one_error_line(status, err)
    steps_done = sum(1 for _, kind, _ in read_log(out / "log.txt") if kind == "train")
    assert steps_done == 6000 // 260  # the first shard's whole steps (260 tokens a step)
    assert f"{later}: token id 300" in err and f"the steps up to {steps_done} are saved" in err
    assert "remake that shard, then resume with --init_from=resume" in err
    assert checkpoints(out) == [f"ckpt_{steps_done:07d}.pt"]

# --- bad values and places: one line, before anything slow ----------------------------------------


@pytest.mark.parametrize("flag, message", [
    ("--max_lr=inf", "--max_lr=inf: it takes a finite number (a number above 0)"),
    ("--min_lr=nan", "--min_lr=nan: it takes a finite number (0 or more)"),
    ("--weight_decay=nan", "--weight_decay=nan: it takes a finite number (0 or more)"),
    ("--grad_clip=nan", "--grad_clip=nan: it takes a finite number (0 or more)"),
    ("--beta1=1.5", "--beta1=1.5: it takes a number at least 0 and below 1"),
    ("--beta2=-0.1", "--beta2=-0.1: it takes a number at least 0 and below 1"),
    ("--adam_eps=-1", "--adam_eps=-1.0: it takes a number above 0"),
    ("--peak_flops=-1", "--peak_flops=-1.0: it takes 0 or more"),
    ("--max_steps=1.5e0", "--max_steps takes a whole number, not '1.5e0'"),
])
def test_every_float_setting_is_finite_and_in_range(flag, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_gpt2, "find_data", lambda *args: pytest.fail("the data was touched"))
    status, _, err = train(capsys, flag, f"--out_dir={tmp_path / 'out'}")
    assert message in one_error_line(status, err)
    assert not os.path.exists(tmp_path / "out")  # a run that failed at set-up leaves nothing


def test_whole_numbers_in_scientific_notation():
    settings, _ = parse_settings(["--max_steps=1e3", "--total_batch_size=2.5e5", "--seed", "1E2"])
    assert (settings["max_steps"], settings["total_batch_size"], settings["seed"]) == (1000, 250000, 100)
    assert isinstance(settings["max_steps"], int)


def test_a_bad_total_batch_size_is_said_before_the_data_is_read(shard_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_gpt2, "find_data", lambda *args: pytest.fail("the data was touched"))
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--total_batch_size=100")
    assert "total_batch_size 100 is not a multiple of" in one_error_line(status, err)


def test_an_empty_sample_prompt_starts_a_new_document(shard_dir, tmp_path, capsys, one_thread):
    run = [f"--data_dir={shard_dir}", "--max_steps=1", "--num_samples=1", "--sample_length=4", "--sample_prompt="]
    status, stdout, err = train(capsys, *run, f"--out_dir={tmp_path / 'a'}", "--vocab_size=50257")
    assert status == 0, err
    assert stdout.count("sample 0: <|endoftext|>") == 2  # at step 0 and at the end
    # A model of another vocabulary cannot read GPT-2's tokens: one line, not an IndexError.
    status, stdout, err = train(capsys, *run, f"--out_dir={tmp_path / 'b'}")
    assert "outside the model's vocab_size 256; set --num_samples=0" in one_error_line(status, err)


@pytest.mark.parametrize("where, message", [
    ("file", "--out_dir={file}: it is a file; name a directory"),
    ("file/below", "--out_dir={file}/below: it lies below {file}, which is a file; name a directory"),
])
def test_an_out_dir_that_cannot_hold_a_run_is_refused_before_the_model_is_built(where, message, tmp_path, capsys,
                                                                                 monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(train_gpt2, "GPT", lambda *args: pytest.fail("the model was built"))
    status, _, err = train(capsys, f"--out_dir={tmp_path / where}")
    assert message.format(file=tmp_path / "file") in one_error_line(status, err)


def test_a_read_only_out_dir_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import common
    out = tmp_path / "ro"

    def read_only(path, *args, **kwargs):  # root writes anywhere: a read-only file system answers like this
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(common, "open", read_only, raising=False)
    monkeypatch.setattr(train_gpt2, "GPT", lambda *args: pytest.fail("the model was built"))
    status, _, err = train(capsys, f"--out_dir={out}")
    assert f"--out_dir={out} cannot be written (Read-only file system)" in one_error_line(status, err)


def test_a_full_disk_while_saving_is_one_line_with_the_room_left(shard_dir, tmp_path, capsys, monkeypatch, one_thread):
    def save(state, f):  # what torch.save does when the disk fills: its zip writer fails on a short write
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 100 vs 64")
    monkeypatch.setattr(train_gpt2.torch, "save", save)
    out = tmp_path / "out"
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=1")
    err = one_error_line(status, err)
    assert f"no space left on the disk of {out} while writing ckpt_0000001.pt (100 bytes written" in err
    assert "free some space" in err and not glob.glob(str(out / "*.tmp"))


def test_a_disk_too_small_for_the_checkpoints_is_warned_of_before_the_first_save(shard_dir, tmp_path, capsys,
                                                                                 monkeypatch, one_thread):
    monkeypatch.setattr(common, "free_bytes", lambda path: 1000)
    status, stdout, _ = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--max_steps=1")
    assert status == 0
    assert f"warning: {tmp_path} has 0.00 GB free, but 4 checkpoints of" in stdout


def test_an_unfinished_shard_directory_is_refused_unless_partial_data(shard_dir, tmp_path, capsys, one_thread):
    manifest = {"shards": [{"file": "tiny_val_000000.bin"}, {"file": "tiny_train_000001.bin"}], "complete": False}
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'a'}", "--max_steps=1")
    err = one_error_line(status, err)
    assert f"{shard_dir} is unfinished" in err and "run the same fineweb.py command again" in err
    assert "--partial_data" in err
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'b'}", "--max_steps=1",
                           "--partial_data")
    assert status == 0, err


@pytest.mark.parametrize("name, make, message", [
    ("notes.md", lambda p: p.write_text("# notes"), "is a file but not a .txt file"),
    ("objects_train_0.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "holds Python objects"),
])
def test_data_that_is_not_what_it_seems_is_named_for_what_it_is(name, make, message, tmp_path, capsys):
    make(tmp_path / name)
    target = tmp_path / name if name.endswith(".md") else tmp_path
    if not name.endswith(".md"):
        write_bin(tmp_path / "x_val_000000.bin", np.zeros(100))
    status, _, err = train(capsys, f"--data_dir={target}", f"--out_dir={tmp_path / 'out'}")
    assert message in one_error_line(status, err)
