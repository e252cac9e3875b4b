"""Shared helpers: tiny token shards written by the tests, and running train_gpt2.py as a user would."""
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a step takes milliseconds on a CPU, on a 256-token vocabulary.
TINY = ["--vocab_size=256", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
        "--total_batch_size=256", "--warmup_steps=2", "--eval_iters=2", "--hellaswag=False", "--num_samples=0"]


def write_bin(path, tokens):
    """A shard in llm.c's format: 256 int32 of header (magic, version, count), then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def shard_dir(tmp_path):
    """A validation shard and two training shards of random ids below 256."""
    rng = np.random.default_rng(0)
    data = tmp_path / "shards"
    data.mkdir()
    write_bin(data / "tiny_val_000000.bin", rng.integers(0, 256, 4000))
    write_bin(data / "tiny_train_000001.bin", rng.integers(0, 256, 6000))
    write_bin(data / "tiny_train_000002.bin", rng.integers(0, 256, 6000))
    return data


def pytest_sessionstart(session):
    """Tiny Shakespeare in the repository root, where the README's commands expect it, before any test runs:
    copied under a name of this process's and renamed, so that test processes running side by side (pytest -n)
    never read a half-copied file, nor see it appear in the middle of a test."""
    path = os.path.join(ROOT, "input.txt")
    shared = os.path.join(ROOT, "..", "shared", "data", "input.txt")
    if not os.path.exists(path) and os.path.exists(shared):
        tmp = f"{path}.{os.getpid()}.tmp"
        shutil.copy(shared, tmp)
        os.replace(tmp, path)


@pytest.fixture(scope="session")
def input_txt():
    """Tiny Shakespeare in the repository root (pytest_sessionstart put it there if ../shared has it)."""
    path = os.path.join(ROOT, "input.txt")
    if not os.path.exists(path):
        pytest.skip("input.txt is missing (python train_gpt2.py config/shakespeare.py downloads it)")
    return path


def run_script(script, *args, timeout=300, cwd=ROOT, **kwargs):
    """Run a script of the repository in a subprocess (in the repository's root, unless cwd says otherwise);
    returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def tree_state(directory):
    """{path: (size, mtime)} of every file below directory: what a test must leave as it found it."""
    return {os.path.join(d, name): (os.path.getsize(os.path.join(d, name)), os.path.getmtime(os.path.join(d, name)))
            for d, _, names in os.walk(directory) for name in names}


@pytest.fixture(scope="session", autouse=True)
def the_users_log_is_left_alone():
    """Tests are guests in a user's checkout: every run they start writes into a temporary directory, never into
    the repository's log/, where the user's own runs are."""
    before = tree_state(os.path.join(ROOT, "log"))
    yield
    assert tree_state(os.path.join(ROOT, "log")) == before, "a test wrote into the repository's log/"


def fill(directory):
    """Fill the file system of directory to its last free byte, with directory/filler."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for block in (4096, 1):  # unbuffered, in pages and then byte by byte
        try:
            while True:
                os.write(fd, b"x" * block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.close(fd)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size="1m", read_only=False, full=False): a real tmpfs of that size under tmp_path, read-only or
    filled to the last byte, unmounted after the test. CI runs as root; where mounting is refused, the test is
    skipped and says why."""
    mounted = []

    def mount(name, size="1m", read_only=False, full=False):
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"a real fault needs a tmpfs, and mounting one was refused: {result.stderr.strip()}")
        mounted.append(path)
        if full:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_log(path):
    """log.txt as a list of (step, kind, value)."""
    rows = []
    for line in open(path):
        step, kind, value = line.split()
        rows.append((int(step), kind, float(value)))
    return rows


@pytest.fixture(autouse=True)
def signal_handlers():
    """Scripts run in the test process install their SIGTERM/SIGINT handlers: put pytest's back afterwards, so that
    no later test (nor a process it forks) inherits them."""
    import signal
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's in-process models on one thread: tiny matmuls gain little from a second one, and
    spinning threads lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
