"""fineweb.py: the shards decode back to the corpus, with the first shard (or a tenth of a small corpus) for
validation; every kind of source goes through datasets' loaders; a killed run resumes to the same bytes;
and each bad input gets one line on stderr, exit status 2, and leaves no file behind."""

import json
import os
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
from train_gpt2 import find_data, get_tokenizer, open_shard  # noqa: E402

EOT = "<|endoftext|>"
ENC = get_tokenizer()
# Words to make documents of: several languages, an emoji, whitespace runs, and the special token's text.
WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from "
         "naïve café 日本語 Ελληνικά 🙂 <|endoftext|>").split() + ["\n", "\n\n", "  ", "\t"]


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
    """The shard names the manifest lists, in stream order (validation first), and their tokens."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    names = [shard["file"] for shard in manifest["shards"]]
    return names, [np.asarray(open_shard(os.path.join(out_dir, name), ENC.n_vocab)) for name in names]


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
    assert sorted(os.listdir(out)) == sorted(names + ["manifest.json"])
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
def test_a_corpus_smaller_than_two_shards_gives_a_tenth_to_validation(tmp_path, capsys, shards_worth):
    text = " ".join(make_documents(40, seed=1))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    total = 1 + len(ENC.encode_ordinary(text))
    shard_size = int(total / shards_worth)
    status, stdout, err = run(capsys, "--input", tmp_path / "input.txt", "--out_dir", tmp_path / "out", "--shard_size", shard_size)
    assert status == 0, err
    names, tokens = shards(tmp_path / "out")
    assert len(tokens[0]) == total // 10
    train = total - total // 10
    assert names[1:] == [f"edufineweb_train_{i:06d}.bin" for i in range(-(-train // shard_size))]
    assert decoded(tmp_path / "out") == EOT + text
    assert f"{total:,} tokens" in stdout


def test_a_finished_run_is_not_redone(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be", encoding="utf-8")
    args = ("--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    before = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in os.listdir(tmp_path / "out")}
    status, stdout, err = run(capsys, *args)
    assert status == 0 and "nothing to do" in stdout
    assert before == {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in os.listdir(tmp_path / "out")}

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
    for name in os.listdir(killed):  # whatever has a final name is whole
        if name.endswith(".bin"):
            assert len(open_shard(str(killed / name), ENC.n_vocab)) == 20000

    status, stdout, err = run(capsys, *args, "--out_dir", killed, "--workers", "2")  # the shards don't depend on it
    assert status == 0, err
    assert "resuming after" in stdout
    assert sorted(os.listdir(killed)) == sorted(os.listdir(tmp_path / "whole"))
    for name in os.listdir(killed):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


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
    "bad number": (["empty.txt", "--shard_size", "1e8"], "--shard_size takes a whole number, not '1e8'"),
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
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for other in (["--input", tmp_path / "b.txt"], ["--input", tmp_path / "a.txt", "--shard_size", 200]):
        status, stdout, err = run(capsys, *other, "--out_dir", out)
        assert status == 2 and err.count("\n") == 1 and "--overwrite" in err, err
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    status, stdout, err = run(capsys, "--input", tmp_path / "b.txt", "--out_dir", out, "--overwrite")
    assert status == 0, err
    assert decoded(out) == EOT + "second corpus"
    assert sorted(os.listdir(out)) == ["edufineweb_train_000000.bin", "edufineweb_val_000000.bin", "manifest.json"]


def test_shards_of_unknown_origin_are_refused(tmp_path, capsys):
    os.mkdir(tmp_path / "out")
    (tmp_path / "out" / "fineweb_train_000001.bin").write_bytes(b"from llm.c, say")
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    status, stdout, err = run(capsys, "--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out")
    assert status == 2 and "did not make (fineweb_train_000001.bin" in err, err
    assert os.listdir(tmp_path / "out") == ["fineweb_train_000001.bin"]


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
