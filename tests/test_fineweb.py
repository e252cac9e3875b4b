"""fineweb.py: the shards decode back to the corpus, with the first shard (or a tenth of a small corpus) for
validation; every kind of source goes through datasets' loaders; a killed run resumes to the same bytes;
and each bad input gets one line on stderr, exit status 2, and leaves no file behind."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fineweb  # noqa: E402
from common import get_tokenizer, open_shard  # noqa: E402
from conftest import fill  # noqa: E402

EOT = "<|endoftext|>"
ENC = get_tokenizer()
# Words to make documents of: several languages, an emoji, whitespace runs, and the special token's text.
WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from "
         "naïve café 日本語 Ελληνικά 🙂 <|endoftext|>").split() + ["\n", "\n\n", "  ", "\t"]



def files(directory):
    """The files of directory but its .lock, which the run that owned it leaves (it is never removed)."""
    return [name for name in os.listdir(directory) if name != ".lock"]

def make_documents(n, seed=0, words=(1, 300)):
    """n documents of random words, then the awkward ones: empty, one space, one long word."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(*words))) for _ in range(n)] + ["", " ", "x" * 3000]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's own directory, and the hub out of reach."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys, *args):
    """fineweb.py's command line, in this process: (exit status, stdout, stderr)."""
    try:
        fineweb.main([str(arg) for arg in args])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def shards(out_dir):
    """The shard names the manifest lists, in stream order (validation first, or last for a corpus smaller
    than two shards), and their tokens."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    names = [shard["file"] for shard in manifest["shards"]]
    return names, [np.asarray(open_shard(os.path.join(out_dir, name), ENC.n_vocab)) for name in names]


def find_data(data_dir, vocab_size):
    """train_gpt2.py's own reading of data_dir. Imported when a test asks for it, so that the other tests of
    fineweb.py don't depend on the trainer importing."""
    from train_gpt2 import find_data
    return find_data(data_dir, vocab_size)


def decoded(out_dir):
    return ENC.decode(np.concatenate(shards(out_dir)[1]).tolist())


def expected(documents):
    return "".join(EOT + doc for doc in documents)


def write_jsonl(path, documents, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(documents):
            f.write(json.dumps({"id": i, field: doc}) + "\n")

# -----------------------------------------------------------------------------
# What it writes


def test_shards_decode_to_the_documents_and_the_first_is_validation(tmp_path, capsys):
    docs = make_documents(60)
    os.mkdir(tmp_path / "corpus")
    write_jsonl(tmp_path / "corpus" / "a.jsonl", docs[:30])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", docs[30:])
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "--input", tmp_path / "corpus", "--out_dir", out, "--prefix", "tiny", "--shard_size", 1000)
    assert status == 0, err
    names, tokens = shards(out)
    assert names[0] == "tiny_val_000000.bin"
    assert names[1:] == [f"tiny_train_{i:06d}.bin" for i in range(len(names) - 1)]
    assert len(names) >= 4
    assert [len(t) for t in tokens[:-1]] == [1000] * (len(names) - 1) and 0 < len(tokens[-1]) <= 1000
    assert decoded(out) == expected(docs)
    assert sorted(files(out)) == sorted(names + ["manifest.json"])
    # llm.c's format to the byte: 256 int32 of header, then the uint16 tokens.
    for name, t in zip(names, tokens):
        raw = (out / name).read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert list(header[:3]) == [20240520, 1, len(t)] and not header[3:].any()
        assert raw[1024:] == t.astype("<u2").tobytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["documents"] == len(docs)
    assert manifest["tokens"] == sum(len(t) for t in tokens)
    assert manifest["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": 50256}
    train, val = find_data(str(out), ENC.n_vocab)  # train_gpt2.py reads them
    assert len(val) == 1 and len(train) == len(names) - 1


@pytest.mark.parametrize("shards_worth", [0.5, 1.5])
def test_a_corpus_smaller_than_two_shards_gives_its_last_tenth_to_validation(tmp_path, capsys, shards_worth):
    text = " ".join(make_documents(40, seed=1))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    text_tokens = len(ENC.encode_ordinary(text))
    total = 1 + text_tokens  # <|endoftext|>, then the text
    shard_size = int(total / shards_worth)
    status, stdout, err = run(capsys, "--input", tmp_path / "input.txt", "--out_dir", tmp_path / "out", "--shard_size", shard_size)
    assert status == 0, err
    names, tokens = shards(tmp_path / "out")
    val = text_tokens - int(0.9 * text_tokens)  # the tenth of the text's tokens, as train_gpt2.py splits a .txt file
    assert names[-1] == "edufineweb_val_000000.bin" and len(tokens[-1]) == val
    assert names[:-1] == [f"edufineweb_train_{i:06d}.bin" for i in range(-(-(total - val) // shard_size))]
    assert [len(t) for t in tokens[:-2]] == [shard_size] * (len(names) - 2)
    assert decoded(tmp_path / "out") == EOT + text  # training, then validation: the stream in order
    assert f"{total:,} tokens" in stdout and f"({val:,} validation tokens)" in stdout


def test_a_small_text_file_gives_the_validation_tokens_of_the_trainer(tmp_path, capsys):
    # train_gpt2.py --data_dir=FILE.txt tokenizes the file itself and keeps its last tenth for validation;
    # fineweb.py on the same file must hold out the very same tokens, or one text gives two validation sets.
    text = " ".join(make_documents(60, seed=8))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    status, stdout, err = run(capsys, "--input", tmp_path / "input.txt", "--out_dir", tmp_path / "out")
    assert status == 0, err
    train, val = find_data(str(tmp_path / "input.txt"), ENC.n_vocab)
    names, tokens = shards(tmp_path / "out")
    assert names == ["edufineweb_train_000000.bin", "edufineweb_val_000000.bin"]
    assert np.array_equal(tokens[1], val[0])
    # The training shard is the trainer's training tokens after the <|endoftext|> that opens every document.
    assert tokens[0][0] == ENC.eot_token and np.array_equal(tokens[0][1:], train[0])
    val_shards = find_data(str(tmp_path / "out"), ENC.n_vocab)[1]  # and the trainer reads that shard as validation
    assert np.array_equal(open_shard(val_shards[0], ENC.n_vocab), val[0])


def test_a_finished_run_is_not_redone(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be", encoding="utf-8")
    args = ("--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    before = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in files(tmp_path / "out")}
    status, stdout, err = run(capsys, *args)
    assert status == 0 and "nothing to do" in stdout
    assert before == {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in files(tmp_path / "out")}

# -----------------------------------------------------------------------------
# Sources: every kind goes through datasets.load_dataset, as a dataset on the hub does


def write_corpus(kind, directory, docs):
    """docs written as `kind`; returns the --input paths and any other arguments."""
    os.makedirs(directory)
    if kind == "txt":  # one file, one document; sorted by name
        for i, doc in enumerate(docs):
            (directory / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
        return [directory]
    if kind == "jsonl":
        write_jsonl(directory / "docs.jsonl", docs, field="content")
        return [directory / "docs.jsonl", "--text_field", "content"]
    if kind == "json":  # one JSON array
        (directory / "docs.json").write_text(json.dumps([{"text": doc, "n": len(doc)} for doc in docs]), encoding="utf-8")
        return [directory / "docs.json"]
    if kind == "parquet":
        pq.write_table(pa.table({"url": [f"u{i}" for i in range(len(docs))], "text": docs}), directory / "docs.parquet")
        return [directory / "docs.parquet"]
    if kind == "mixed":  # a directory walked in sorted order: a/ (parquet), b.jsonl, c.txt
        os.mkdir(directory / "a")
        pq.write_table(pa.table({"text": docs[:10]}), directory / "a" / "part.parquet")
        write_jsonl(directory / "b.jsonl", docs[10:-1])
        (directory / "c.txt").write_text(docs[-1], encoding="utf-8")
        return [directory]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "mixed"])
def test_every_local_format(tmp_path, capsys, kind):
    docs = make_documents(20, seed=2)
    args = write_corpus(kind, tmp_path / "corpus", docs)
    status, stdout, err = run(capsys, "--input", *args, "--out_dir", tmp_path / "out", "--shard_size", 500)
    assert status == 0, err
    assert decoded(tmp_path / "out") == expected(docs)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_directory_through_the_hub_loader(tmp_path, capsys, streaming):
    # load_dataset(path) reads a local directory exactly as it reads a dataset repository on the hub.
    docs = make_documents(30, seed=3)
    os.makedirs(tmp_path / "dataset" / "data")
    write_jsonl(tmp_path / "dataset" / "data" / "train.jsonl", docs)
    write_jsonl(tmp_path / "dataset" / "data" / "test.jsonl", ["not this split"])
    args = ["--dataset", tmp_path / "dataset", "--name", "", "--split", "train", "--out_dir", tmp_path / "out"]
    status, stdout, err = run(capsys, *args, *(["--streaming"] if streaming else []), "--shard_size", 700)
    assert status == 0, err
    assert decoded(tmp_path / "out") == expected(docs)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    # Two invalid bytes, and one U+FFFD that was in the file all along.
    (tmp_path / "bad.txt").write_bytes("café ".encode() + b"\xff\xfe ok " + "\ufffd".encode())
    status, stdout, err = run(capsys, "--input", tmp_path / "bad.txt", "--out_dir", tmp_path / "out")
    assert status == 0, err
    assert decoded(tmp_path / "out") == EOT + "café \ufffd\ufffd ok \ufffd"
    assert "2 invalid UTF-8 sequences" in stdout


# -----------------------------------------------------------------------------
# Integrity: a killed run, started again, ends with the same bytes as one that never stopped


def shards_listed(out_dir):
    """How many shards the manifest lists (it is replaced whole, never written in place)."""
    try:
        return len(json.loads((out_dir / "manifest.json").read_text())["shards"])
    except FileNotFoundError:
        return 0


def test_a_killed_run_resumes_to_identical_shards(tmp_path, capsys):
    # About 3.5M tokens: the killed run, on one worker, still has most of a second to go when its first shards appear.
    docs = make_documents(2000, seed=4, words=(100, 2500)) + [" ".join(["shard-spanning"] * 30000)]
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    args = ["--input", tmp_path / "corpus.jsonl", "--shard_size", 20000]
    assert run(capsys, *args, "--out_dir", tmp_path / "whole")[0] == 0

    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, args), "--out_dir", str(killed), "--workers", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not shards_listed(killed) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"], "the run ended before it was killed: give it more work"
    for name in files(killed):  # whatever has a final name is whole
        if name.endswith(".bin"):
            assert len(open_shard(str(killed / name), ENC.n_vocab)) == 20000

    status, stdout, err = run(capsys, *args, "--out_dir", killed, "--workers", "2")  # the shards don't depend on it
    assert status == 0, err
    assert "resuming after" in stdout
    assert sorted(files(killed)) == sorted(files(tmp_path / "whole"))
    for name in files(killed):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_killed_run_lets_go_of_its_out_dir_at_once_though_its_worker_runs_on(tmp_path, capsys):
    # A batch of these documents takes a worker about a second: killed, the run leaves its worker in the middle
    # of one, and the next run must find the directory free at once, not "in use" by a process that is gone.
    write_jsonl(tmp_path / "c.jsonl", make_documents(3 * fineweb.DOCS_PER_TASK, seed=11, words=(4000, 4001)))
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "fineweb.py"), "--input", str(tmp_path / "c.jsonl"), "--out_dir",
               str(out), "--shard_size", "20000", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not shards_listed(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    status, stdout, err = run(capsys, "--input", tmp_path / "c.jsonl", "--out_dir", out, "--shard_size", 20000)
    assert status == 0, err
    assert "resuming after" in stdout


def test_a_lost_shard_is_made_again(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", make_documents(40, seed=5))
    args = ("--input", tmp_path / "c.jsonl", "--out_dir", tmp_path / "out", "--shard_size", 1000)
    assert run(capsys, *args)[0] == 0
    names, _ = shards(tmp_path / "out")
    original = (tmp_path / "out" / names[3]).read_bytes()
    (tmp_path / "out" / names[3]).write_bytes(original[:2000])  # truncated, as by a full disk
    status, stdout, err = run(capsys, *args)
    assert status == 0 and "resuming after 3 whole shards" in stdout, err
    assert (tmp_path / "out" / names[3]).read_bytes() == original


@pytest.mark.parametrize("which", [0, 3, -1])  # the validation shard, one in the middle, the last
def test_a_shard_that_is_not_the_one_the_manifest_records_is_made_again(tmp_path, capsys, which):
    # What another run writing into the same directory left behind: a shard of the right length, other tokens.
    write_jsonl(tmp_path / "c.jsonl", make_documents(40, seed=5))
    args = ("--input", tmp_path / "c.jsonl", "--shard_size", 1000)
    assert run(capsys, *args, "--out_dir", tmp_path / "clean")[0] == 0
    shutil.copytree(tmp_path / "clean", tmp_path / "out")
    names, tokens = shards(tmp_path / "out")
    original = (tmp_path / "out" / names[which]).read_bytes()
    other = np.random.default_rng(9).integers(0, ENC.n_vocab, len(tokens[which]), dtype=np.uint16)
    (tmp_path / "out" / names[which]).write_bytes(original[:1024] + other.astype("<u2").tobytes())
    status, stdout, err = run(capsys, *args, "--out_dir", tmp_path / "out")
    assert status == 0 and f"{names[which]} is not the shard" in stdout, stdout + err
    assert sorted(files(tmp_path / "out")) == sorted(files(tmp_path / "clean"))
    for name in files(tmp_path / "clean"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", make_documents(20, seed=10))
    out = tmp_path / "out"
    os.mkdir(out)
    # A process that holds out/ as a running fineweb.py does, until its stdin closes.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common; "
                               "lock = common.lock_dir(sys.argv[2], 'a test'); print('locked', flush=True); sys.stdin.read()",
                               ROOT, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        status, stdout, err = run(capsys, "--input", tmp_path / "c.jsonl", "--out_dir", out, "--shard_size", 500)
        assert status == 2
        assert err == (f"error: {out} is in use by another fineweb.py run (process {holder.pid}); wait for it to "
                       f"finish, or write somewhere else\n")
        assert os.listdir(out) == [".lock"] and (out / ".lock").read_text() == str(holder.pid)  # the holder's, untouched
    finally:
        holder.stdin.close()
        holder.wait()
    status, stdout, err = run(capsys, "--input", tmp_path / "c.jsonl", "--out_dir", out, "--shard_size", 500)
    assert status == 0, err
    assert set(os.listdir(out)) - set(files(out)) == {".lock"} and "manifest.json" in files(out)  # its lock stays


def test_temporary_files_of_killed_runs_are_swept_when_the_next_run_takes_the_lock(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be", encoding="utf-8")
    args = ("--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    dead = tmp_path / "out" / "edufineweb_train_000001.bin.tmp"  # a run killed while writing a shard left it
    dead.write_bytes(b"half a shard")
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    assert f"removed 1 unfinished file(s) of killed processes from {tmp_path / 'out'}" in stdout
    assert not dead.exists()


# -----------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no file left under a final name


BAD_INPUTS = {  # case: (--input and other arguments, in a directory write_bad_inputs filled; what the error says)
    "missing file": (["nothere.jsonl"], "nothere.jsonl does not exist"),
    "missing directory": (["nodir/"], "nodir/ does not exist"),
    "unknown format": (["notes.csv"], "takes .txt, .jsonl, .json, .parquet"),
    "not parquet": (["fake.parquet"], "cannot read fake.parquet as Parquet"),
    "not json": (["broken.jsonl"], "first line is not JSON"),
    "no text field (json)": (["fields.jsonl"], "no field 'text'; its fields are: id, body"),
    "no text field (parquet)": (["fields.parquet"], "no field 'text'; its fields are: body, url"),
    "wrong text field": (["fields.parquet", "fields.jsonl", "--text_field", "url"], "fields.jsonl has no field 'url'"),
    "empty text": (["empty.txt"], "the corpus is empty"),
    "empty jsonl": (["empty.jsonl"], "the corpus is empty"),
    "no corpus files": (["no_text"], "holds no .txt, .jsonl, .json, .parquet files"),
    "bad prefix": (["empty.txt", "--prefix", "my_val"], "without 'train' or 'val'"),
    "bad shard size": (["empty.txt", "--shard_size", "0"], "positive integer"),
    "bad number": (["empty.txt", "--shard_size", "1e-3"], "--shard_size takes a whole number, not '1e-3'"),
}


def write_bad_inputs(directory):
    (directory / "notes.csv").write_text("text\nhello\n")
    (directory / "fake.parquet").write_text("not parquet at all")
    (directory / "broken.jsonl").write_text("this is not json\n")
    write_jsonl(directory / "fields.jsonl", ["hello"], field="body")
    pq.write_table(pa.table({"body": ["hello"], "url": ["u"]}), directory / "fields.parquet")
    (directory / "empty.txt").write_text("")
    (directory / "empty.jsonl").write_text("")
    os.mkdir(directory / "no_text")
    (directory / "no_text" / "README.md").write_text("not a corpus")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    write_bad_inputs(tmp_path)
    inputs, phrase = BAD_INPUTS[case]
    status, stdout, err = run(capsys, "--input", *inputs, "--out_dir", "out")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and phrase in err, err
    assert not (tmp_path / "out").exists()


def test_an_out_dir_of_another_corpus_is_refused_unless_overwrite(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first corpus " * 200, encoding="utf-8")
    (tmp_path / "b.txt").write_text("second corpus", encoding="utf-8")
    out = tmp_path / "out"
    assert run(capsys, "--input", tmp_path / "a.txt", "--out_dir", out, "--shard_size", 100)[0] == 0
    before = {name: (out / name).read_bytes() for name in files(out)}
    for other in (["--input", tmp_path / "b.txt"], ["--input", tmp_path / "a.txt", "--shard_size", 200]):
        status, stdout, err = run(capsys, *other, "--out_dir", out)
        assert status == 2 and err.count("\n") == 1 and "--overwrite" in err, err
        assert {name: (out / name).read_bytes() for name in files(out)} == before
    status, stdout, err = run(capsys, "--input", tmp_path / "b.txt", "--out_dir", out, "--overwrite")
    assert status == 0, err
    assert decoded(out) == EOT + "second corpus"
    assert sorted(files(out)) == ["edufineweb_train_000000.bin", "edufineweb_val_000000.bin", "manifest.json"]


@pytest.mark.parametrize("case", ["a file", "below a file", "read-only"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_set_up(tmp_path, tmpfs, capsys, monkeypatch, case):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "file").write_text("not a directory")
    out, phrase = {
        "a file": (tmp_path / "file", f"--out_dir={tmp_path / 'file'}: it is a file; name a directory"),
        "below a file": (tmp_path / "file" / "out", f"lies below {tmp_path / 'file'}, which is a file; name a directory"),
        # The tests run as root, whom chmod 0o555 does not stop: a read-only file system does.
        "read-only": (None, "cannot be written (Read-only file system); name a directory you can write"),
    }[case]
    out = out or tmpfs("ro", read_only=True)
    def too_late(*args, **kwargs):
        raise AssertionError("set-up began before --out_dir was checked")
    monkeypatch.setattr(fineweb, "get_tokenizer", too_late)
    monkeypatch.setattr(datasets, "load_dataset", too_late)
    status, stdout, err = run(capsys, "--input", tmp_path / "a.txt", "--out_dir", out)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"error: --out_dir={out}") and phrase in err, err
    assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_a_full_disk_is_one_line_with_the_room_needed_and_left(tmp_path, tmpfs, capsys, monkeypatch, target):
    write_jsonl(tmp_path / "c.jsonl", make_documents(40, seed=5))
    disk = tmpfs("disk", size="1m")
    out = disk / "out"
    name = {"shard": "edufineweb_val_000000.bin", "manifest": "manifest.json"}[target]
    # A real file system that fills up just before the file is written: the first shard, or the first manifest.
    function = {"shard": "write_shard", "manifest": "save_manifest"}[target]
    real = getattr(fineweb, function)
    monkeypatch.setattr(fineweb, function, lambda *args: fill(disk) or real(*args))
    status, stdout, err = run(capsys, "--input", tmp_path / "c.jsonl", "--out_dir", out, "--shard_size", 1000)
    assert status == 2
    needed = "3,024" if target == "shard" else "[0-9,]+"  # a shard: 1024 bytes of header, 1000 two-byte tokens
    assert re.fullmatch(rf"error: no space left on the disk of {re.escape(str(out))} while writing {name} \({needed} "
                        rf"bytes needed, [0-9,]+ bytes written, [0-9,]+ free after removing them\); free some space\n",
                        err), err
    # No temporary file is left: a shard's failure leaves the manifest that claimed out/; the manifest's, nothing.
    assert (sorted(files(out)) == ["manifest.json"]) if target == "shard" else not out.exists()


def test_shards_of_unknown_origin_are_refused(tmp_path, capsys):
    os.mkdir(tmp_path / "out")
    (tmp_path / "out" / "fineweb_train_000001.bin").write_bytes(b"from llm.c, say")
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    status, stdout, err = run(capsys, "--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out")
    assert status == 2 and "did not make (fineweb_train_000001.bin" in err, err
    assert files(tmp_path / "out") == ["fineweb_train_000001.bin"]


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "fineweb.py", "--input", str(tmp_path / "missing.txt"),
                             "--out_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'missing.txt'} does not exist\n"


def test_it_runs_where_processes_are_spawned(tmp_path):
    # macOS and Windows start worker processes by spawning: each imports fineweb.py afresh as __mp_main__.
    docs = make_documents(300, seed=7)
    write_jsonl(tmp_path / "c.jsonl", docs)
    code = ("import multiprocessing, runpy, sys; multiprocessing.set_start_method('spawn'); "
            "sys.argv = ['fineweb.py', *sys.argv[1:]]; runpy.run_path('fineweb.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "--input", str(tmp_path / "c.jsonl"), "--out_dir",
                             str(tmp_path / "out"), "--shard_size", "5000", "--workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert decoded(tmp_path / "out") == expected(docs)


def test_benchmark_prints_tokens_per_second_and_keeps_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "c.jsonl", make_documents(50, seed=6))
    status, stdout, err = run(capsys, "--input", "c.jsonl", "--benchmark")
    assert status == 0, err
    assert "M tokens/s end to end" in stdout and "one core of tiktoken" in stdout and "ratio" in stdout
    assert set(os.listdir(tmp_path)) - {"hf_cache"} == {"c.jsonl"}  # no edu_fineweb10B/
