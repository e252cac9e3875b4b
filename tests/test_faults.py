"""Nothing lost, never a traceback: train_gpt2.py under everyday mistakes and faults. One run owns its out_dir;
the best checkpoint survives a divergence; a stop signal or a bad shard keeps every finished step; bad values,
full disks and unusable directories are one `error:` line."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, fill, read_log, run_script, write_bin
import common
import train_gpt2
from train_gpt2 import DataLoader, parse_settings


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


def checkpoints(out, pattern="ckpt_*.pt"):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(str(out)), pattern)))


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
    stale = out / "ckpt_0000002.pt.tmp"  # a process killed while writing that checkpoint
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
    monkeypatch.setattr(train_gpt2.StopSignals, "read", lambda self, loss_sum=None, seconds=0.0: (False, float("nan")))
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


def test_a_read_only_out_dir_is_refused_before_the_model_is_built(tmpfs, capsys, monkeypatch):
    out = tmpfs("ro", read_only=True)  # root writes anywhere else: a read-only file system stops it
    monkeypatch.setattr(train_gpt2, "GPT", lambda *args: pytest.fail("the model was built"))
    status, _, err = train(capsys, f"--out_dir={out}")
    assert f"--out_dir={out} cannot be written (Read-only file system)" in one_error_line(status, err)


def test_a_full_disk_while_saving_is_one_line_with_the_room_left_after_removing_the_partial_file(
        shard_dir, tmpfs, capsys, one_thread):
    out = tmpfs("small", size="256k") / "out"  # room for the log and run.json, not for a checkpoint of ~0.4 MB
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=1")
    err = one_error_line(status, err)
    assert f"no space left on the disk of {out} while writing ckpt_0000001.pt (" in err and "free some space" in err
    written, free = (int(n.replace(",", "")) for n in re.search(r"\(([\d,]+) bytes written, ([\d,]+) free", err).groups())
    assert written > 0 and free >= written  # measured once the partial file was gone
    assert not glob.glob(str(out / "*.tmp")) and not glob.glob(str(out / "ckpt_*"))


def test_a_disk_that_fills_during_a_run_stops_it_with_one_line_and_it_goes_on_once_there_is_room(
        shard_dir, tmpfs, capsys, monkeypatch, one_thread):
    out = tmpfs("disk", size="4m") / "out"
    calls, next_batch = [], DataLoader.next_batch

    def filling(self):  # the 13th training micro-batch is step 3's first: the disk fills up during that step
        calls.append(self.shuffle)
        if calls.count(True) == 13:
            fill(out.parent)
        return next_batch(self)
    monkeypatch.setattr(DataLoader, "next_batch", filling)
    run = [f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=6", "--checkpoint_interval=2"]
    status, _, err = train(capsys, *run)
    err = one_error_line(status, err)
    # log.txt's last page still had room for step 3's line: the checkpoint of step 4 found the disk full.
    assert f"no space left on the disk of {out} while writing ckpt_0000004.pt" in err and "free some space" in err
    assert checkpoints(out) == ["ckpt_0000002.pt"] and not glob.glob(str(out / "*.tmp"))  # whole, and no part
    monkeypatch.undo()
    os.remove(out.parent / "filler")
    status, stdout, err = train(capsys, *run, "--init_from=resume")
    assert status == 0 and "resuming from step 2" in stdout, err
    assert [step for step, kind, _ in read_log(out / "log.txt") if kind == "train"] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert checkpoints(out) == ["ckpt_0000002.pt", "ckpt_0000004.pt", "ckpt_0000006.pt"]


def test_a_log_that_cannot_grow_is_one_line_naming_it(shard_dir, tmpfs, capsys, monkeypatch, one_thread):
    out = tmpfs("disk", size="4m") / "out"
    real = train_gpt2.RunLog.record

    def filling(self, step, *args, **kwargs):  # the disk fills up, and log.txt's last page too, before step 1's line
        if step == 1:
            with open(self.path, "a") as f:
                f.write("#" * (4096 - os.path.getsize(self.path) % 4096))
            fill(out.parent)
        return real(self, step, *args, **kwargs)
    monkeypatch.setattr(train_gpt2.RunLog, "record", filling)
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=4")
    assert f"cannot write {out / 'log.txt'} (No space left on device); free some space (a training run then goes " \
           f"on with --init_from=resume --out_dir={out})" in one_error_line(status, err)


def test_a_disk_too_small_for_the_checkpoints_is_warned_of_before_the_first_save(shard_dir, tmpfs, capsys,
                                                                                 one_thread):
    out = tmpfs("small", size="1m")  # one checkpoint of ~0.4 MB fits, the four that keep_checkpoints=3 needs do not
    status, stdout, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=1")
    assert status == 0, err
    assert f"warning: {out} has 0.00 GB free, but 4 checkpoints of" in stdout


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

# --- third round: a run that blows up keeps the checkpoint to go back to -----------------------------


def test_a_run_that_blows_up_never_pushes_out_its_last_good_checkpoint(shard_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    run = [f"--data_dir={shard_dir}", f"--out_dir={out}", "--eval_interval=1000"]
    assert train(capsys, *run, "--max_steps=8", "--checkpoint_interval=2")[0] == 0
    assert checkpoints(out) == ["ckpt_0000004.pt", "ckpt_0000006.pt", "ckpt_0000008.pt"]  # none has a validation loss
    good = open(out / "ckpt_0000008.pt", "rb").read()
    # Resumed at an absurd rate, saving every step and keeping two: the weights blow up from the first update on.
    status, stdout, err = train(capsys, *run, "--init_from=resume", "--max_lr=1e6", "--checkpoint_interval=1",
                                "--keep_checkpoints=2", "--max_steps=14")
    assert "saved" in stdout and "ckpt_0000009.pt" in stdout
    assert open(out / "ckpt_0000008.pt", "rb").read() == good  # the last good one stays, whatever came after
    later = torch.load(out / checkpoints(out)[-1], weights_only=True)
    assert later["good"]["file"] == "ckpt_0000008.pt" and later["good"]["max_lr"] == 6e-4
    if status != 0:  # it went on to non-finite steps: the advice names that checkpoint, at half the rate that made it
        err = one_error_line(status, err)
        assert f"checkpoint is {out / 'ckpt_0000008.pt'}" in err and "--max_lr=0.0003" in err


def test_a_run_that_blows_up_from_scratch_says_no_checkpoint_is_good(shard_dir, tmp_path, capsys, monkeypatch,
                                                                       one_thread):
    steps = iter([1e4, 2e4, 3e4] + [float("nan")] * 10)  # finite but far worse than a guess, then not finite at all

    monkeypatch.setattr(train_gpt2.StopSignals, "read", lambda self, loss_sum=None, seconds=0.0: (False, next(steps)))
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'out'}", "--max_steps=10",
                           "--checkpoint_interval=1", "--eval_interval=1000", "--max_lr=1e6")
    err = one_error_line(status, err)
    assert "no checkpoint of this run is good to go back to: start again with a lower --max_lr (this run used 1e+06)" in err
    assert "resume from the last good checkpoint" not in err


def test_going_back_twice_keeps_what_was_set_aside_the_first_time(shard_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    run = [f"--data_dir={shard_dir}", f"--out_dir={out}", "--checkpoint_interval=2", "--eval_interval=1000"]
    assert train(capsys, *run, "--max_steps=8")[0] == 0
    first = {name: open(out / name, "rb").read() for name in ("ckpt_0000006.pt", "ckpt_0000008.pt")}
    back = [*run, f"--init_from={out / 'ckpt_0000004.pt'}", "--max_steps=8"]
    assert train(capsys, *back, "--max_lr=3e-4")[0] == 0  # sets 6 and 8 aside, then writes new ones
    status, stdout, err = train(capsys, *back, "--max_lr=2e-4")  # and again
    assert status == 0, err
    assert checkpoints(out, "*.abandoned*") == ["ckpt_0000006.pt.abandoned", "ckpt_0000006.pt.abandoned.1",
                                                "ckpt_0000008.pt.abandoned", "ckpt_0000008.pt.abandoned.1"]
    for name, data in first.items():  # the first set aside, untouched
        assert open(out / f"{name}.abandoned", "rb").read() == data

# --- stop signals and logs -------------------------------------------------------------------------


def test_a_stop_signal_during_an_evaluation_saves_the_finished_steps_at_once(shard_dir, tmp_path, capsys, monkeypatch,
                                                                              one_thread):
    out = tmp_path / "out"
    calls, next_batch = [], DataLoader.next_batch

    def sending(self):
        calls.append(self.shuffle)
        # The validation loader reads in file order (shuffle off): 4 batches at step 0, then the fifth starts the
        # evaluation after step 3.
        if not self.shuffle and calls.count(False) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(self)
    monkeypatch.setattr(DataLoader, "next_batch", sending)
    status, stdout, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=10",
                                "--eval_interval=3", "--eval_iters=4", "--checkpoint_interval=100")
    assert status == 0, err
    assert "stopped by a signal after step 3" in stdout and checkpoints(out) == ["ckpt_0000003.pt"]
    assert [(step, kind) for step, kind, _ in read_log(out / "log.txt") if kind == "val"] == [(0, "val")]
    assert torch.load(out / "ckpt_0000003.pt", weights_only=True)["step"] == 3


def test_a_new_run_never_appends_to_the_log_of_a_run_that_saved_no_checkpoint(shard_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text("0 val 9.9000\n0 train 9.900000\n")
    status, stdout, _ = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=2")
    assert status == 0 and "kept as log.txt.old" in stdout
    assert (out / "log.txt.old").read_text() == "0 val 9.9000\n0 train 9.900000\n"
    assert [(step, kind) for step, kind, _ in read_log(out / "log.txt")] == [(0, "val"), (0, "train"), (1, "train"),
                                                                            (2, "val")]


def test_a_signal_during_start_up_leaves_no_empty_out_dir(tmp_path, capsys, monkeypatch):
    def killed(*args, **kwargs):  # SIGTERM while the model is being built, after out_dir was made and locked
        assert os.path.exists(tmp_path / "out" / ".lock")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    monkeypatch.setattr(train_gpt2, "GPT", killed)
    status, _, _ = train(capsys, f"--out_dir={tmp_path / 'out'}")
    assert status == 128 + signal.SIGTERM and not os.path.exists(tmp_path / "out")

# --- one line, at once --------------------------------------------------------------------------------


def test_a_text_file_as_a_checkpoint_is_not_called_corrupted(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes\n")
    status, _, err = train(capsys, f"--init_from={tmp_path / 'notes.txt'}", f"--out_dir={tmp_path / 'out'}")
    err = one_error_line(status, err)
    assert "notes.txt is not a checkpoint (not a file that torch.save wrote)" in err and "delete" not in err


def test_the_lock_on_a_full_disk_is_one_line_and_leaves_no_directory(tmpfs, capsys):
    full = tmpfs("full", full=True)  # a real file system without a free byte
    status, _, err = train(capsys, f"--out_dir={full / 'new' / 'out'}")
    err = one_error_line(status, err)
    assert f"cannot write {full / 'new' / 'out' / '.lock'} (No space left on device)" in err
    assert not os.path.exists(full / "new" / "out")


@pytest.mark.parametrize("args", [["--block_size=100000000"], ["--n_embd=1048576", "--n_head=16"]])
def test_a_model_larger_than_memory_is_one_line(args, tmp_path):
    result = run_script("train_gpt2.py", *args, "--device=cpu", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: out of memory: the settings ask for more than this machine has")
    assert not os.path.exists(tmp_path / "out")


def test_fineweb_refuses_a_shard_larger_than_its_header_can_count(tmp_path):
    result = run_script("fineweb.py", "--shard_size=99999999999999", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--shard_size=99999999999999: a shard holds at most 2,147,483,647 tokens" in result.stderr


def test_profile_without_benchmark_is_refused(tmp_path, capsys):
    status, _, err = train(capsys, f"--profile={tmp_path / 'prof'}", f"--out_dir={tmp_path / 'out'}")
    assert "--profile=" in one_error_line(status, err) and "add --benchmark" in err


@pytest.mark.parametrize("script", ["train_gpt2.py", "sample.py"])
def test_an_unreachable_hub_is_one_quiet_line_at_once(script, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = ["--init_from=gpt2", f"--out_dir={tmp_path / 'out'}"] + (["--eval_only"] if script == "train_gpt2.py" else [])
    start = time.time()
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env)
    assert time.time() - start < 30
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot load Hugging Face model 'gpt2': it is not in the local cache and the Hugging Face hub cannot be " \
           "reached (offline?)" in result.stderr


def test_the_export_stops_generating_at_the_models_context(tmp_path):
    from transformers import AutoModelForCausalLM
    from huggingface import save_hf
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    save_hf(model, str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "generation_config.json"))["max_length"] == 16
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokens = hf.generate(torch.tensor([[50256, 11, 12]]), do_sample=False)  # no length given: the config's
    assert tokens.shape[1] == 16


def test_sample_and_plot_take_the_same_newest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, log_time, checkpoint_time in (("a", 100, 300), ("b", 200, 150)):
        os.makedirs(f"log/{name}")
        for file, when in (("log.txt", log_time), ("ckpt_0000001.pt", checkpoint_time)):
            open(f"log/{name}/{file}", "w").close()
            os.utime(f"log/{name}/{file}", (when, when))
    # b's log was written last (a run appends to it every step), though a's checkpoint is newer: both take b.
    assert common.newest_run("log") == os.path.join("log", "b")
    for script in ("sample.py", "plot.py"):
        assert "newest_run(args.out_dir)" in open(os.path.join(ROOT, script)).read() or \
            "newest_run(run_dir)" in open(os.path.join(ROOT, script)).read()


def test_run_json_and_evals_txt_on_a_full_disk_are_one_line(shard_dir, tmp_path, tmpfs, capsys, monkeypatch,
                                                            one_thread):
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'run'}", "--max_steps=1")
    assert status == 0, err
    # evals.txt: --eval_only of that checkpoint into a full file system, which still makes the directory.
    full = tmpfs("full", full=True)
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--init_from={tmp_path / 'run' / 'ckpt_0000001.pt'}",
                           f"--out_dir={full / 'evals'}", "--eval_only")
    assert f"cannot write {full / 'evals' / 'evals.txt'} (No space left on device)" in one_error_line(status, err)
    # run.json: the disk fills up once the run owns its out_dir, before the run's first file.
    os.remove(full / "filler")
    real = train_gpt2.find_data
    monkeypatch.setattr(train_gpt2, "find_data", lambda *args: fill(full) or real(*args))
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={full / 'new'}", "--max_steps=1")
    assert f"no space left on the disk of {full / 'new'} while writing run.json" in one_error_line(status, err)
