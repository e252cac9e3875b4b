"""Nothing lost, third round: a run that blows up keeps the checkpoint to go back to, and says the rate that wrote
it; checkpoints set aside stay set aside; a stop signal during an evaluation keeps the finished steps; an old log is
never appended to; what cannot be used (a text file as a checkpoint, a full disk, a model larger than memory, an
unreachable hub) is one `error:` line, at once."""
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import train_gpt2
from conftest import ROOT, TINY, read_log, run_script
from train_gpt2 import DataLoader


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


def checkpoints(out, pattern="ckpt_*.pt"):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(str(out)), pattern)))

# --- a run that blows up ---------------------------------------------------------------------------


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

    def blown_up(*args, **kwargs):
        loss = next(steps)
        return loss, 1.0, 1e6, False, loss == loss
    monkeypatch.setattr(train_gpt2, "train_step", blown_up)
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


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_the_lock_on_a_full_disk_is_one_line_and_leaves_no_directory(tmp_path, capsys, monkeypatch):
    real_open = open
    monkeypatch.setattr(common, "open", lambda *args, **kwargs: FullDisk(real_open(*args, **kwargs)), raising=False)
    status, _, err = train(capsys, f"--out_dir={tmp_path / 'new' / 'out'}")
    err = one_error_line(status, err)
    assert f"cannot write {tmp_path / 'new' / 'out' / '.lock'} (No space left on device)" in err
    assert not os.path.exists(tmp_path / "new" / "out")


def test_a_full_disk_message_measures_the_room_after_removing_the_partial_file(shard_dir, tmp_path, capsys,
                                                                                monkeypatch, one_thread):
    def save(state, f):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 100 vs 64")
    measured = []

    def free(path):
        measured.append(glob.glob(str(tmp_path / "out" / "*.tmp")))
        return 12345
    monkeypatch.setattr(train_gpt2.torch, "save", save)
    monkeypatch.setattr(common, "free_bytes", free)
    status, _, err = train(capsys, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1")
    assert "(100 bytes written, 12,345 free after removing them)" in one_error_line(status, err)
    assert measured[-1] == []  # the partial file was gone when the room was measured


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
