"""The first hour with the repository, as a new user lives it: the commands a run prints at its end work as
printed; sample.py and plot.py find the quick start's run; --help goes into a pipe; the log shows what each
optimizer is doing and a time left that means something; the README's examples write where git ignores."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_script

SCRIPTS = ["train_gpt2.py", "sample.py", "hellaswag.py", "fineweb.py", "plot.py", "bench/gpu.py", "bench/optimizers.py"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shard_dir_module):
    """A tiny run of two steps, through the command line, in a directory laid out like the quick start's:
    log/ holds no run of its own, log/tiny does."""
    home = tmp_path_factory.mktemp("home")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *TINY, f"--data_dir={shard_dir_module}",
                             "--max_steps=2", "--out_dir=log/tiny", "--vocab_size=50257"],
                            cwd=home, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    return home, result.stdout


@pytest.fixture(scope="module")
def shard_dir_module(tmp_path_factory):
    import numpy as np
    from conftest import write_bin
    data = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_bin(data / "tiny_val_000000.bin", rng.integers(0, 50257, 4000))
    write_bin(data / "tiny_train_000001.bin", rng.integers(0, 50257, 6000))
    return data


def next_commands(stdout):
    """The commands under 'next:' at the end of a run, without their comments."""
    lines = stdout[stdout.rindex("next:\n") + len("next:\n"):].splitlines()
    return [line.split("#")[0].strip() for line in lines if line.startswith("  python ")]


def test_a_run_ends_with_the_next_commands_for_its_own_out_dir_and_they_work(finished_run):
    home, stdout = finished_run
    commands = next_commands(stdout)
    assert [c.split()[1] for c in commands] == ["sample.py", "plot.py", "train_gpt2.py", "train_gpt2.py"]
    assert all("log/tiny" in c for c in commands)
    sample, plot, _, export = commands
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (sample + " --max_new_tokens=4 --device=cpu", plot, export):
        args = command.split()
        result = subprocess.run([sys.executable, os.path.join(ROOT, args[1]), *args[2:]], cwd=home, capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, (command, result.stderr)
    assert os.path.isfile(home / "log" / "tiny" / "curves.png")
    assert os.path.isfile(home / "log" / "tiny" / "hf" / "config.json")


@pytest.mark.parametrize("script, wrote", [("sample.py", None), ("plot.py", "log/tiny/curves.png")])
def test_sample_and_plot_without_out_dir_take_the_newest_run_under_log(finished_run, script, wrote):
    home, _ = finished_run
    args = ["--max_new_tokens=4", "--device=cpu"] if script == "sample.py" else []
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=home, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "note: log holds no run; using the newest run below it, log/tiny" in result.stderr
    if wrote:
        assert f"wrote {wrote}" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_into_a_closed_pipe_is_quiet(script):
    # head reads one line and exits: the script then writes into a closed pipe.
    result = subprocess.run(f"{sys.executable} {script} --help | head -n 1", shell=True, cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.stdout.strip() and result.stderr == "", result.stderr


def test_the_log_shows_both_learning_rates_with_muon(shard_dir, tmp_path):
    result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--max_steps=2",
                        "--optimizer=muon", "--warmup_steps=2")
    assert result.returncode == 0, result.stderr
    step_lines = [line for line in result.stdout.splitlines() if re.match(r"\d+ train ", line)]
    # Step 0 of a 2-step warmup runs at half of each peak: AdamW's 6e-4 and Muon's 4e-3.
    assert "| lr 3.0000e-04 | muon lr 2.0000e-03 |" in step_lines[0]


def test_time_left_is_estimated_from_the_steps_after_the_first(shard_dir, tmp_path):
    result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--max_steps=3")
    assert result.returncode == 0, result.stderr
    step_lines = [line for line in result.stdout.splitlines() if re.match(r"\d+ train ", line)]
    assert len(step_lines) == 3
    assert "left" not in step_lines[0]  # its time holds the start-up: no estimate from it
    assert step_lines[1].endswith(" left") and step_lines[2].endswith("0s left")


def test_every_example_in_the_docs_writes_its_model_and_files_where_git_ignores_them():
    # The directories .gitignore names: run output, data, caches.
    ignored = tuple(line.strip() for line in open(os.path.join(ROOT, ".gitignore")) if line.strip().endswith("/"))
    assert "log/" in ignored
    for path in ["README.md", *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        text = open(os.path.join(ROOT, path)).read()
        for flag, value in re.findall(r"--(export_hf|profile|out_dir)[= ](\S+)", text):
            value = value.strip("`'\"),")
            if value and not value.startswith(("$", "<", "DIR", "{")):
                assert (value + "/").startswith(ignored), f"{path}: --{flag}={value} writes where git does not ignore"
