"""bench/gpu.py, the one command that measures the GPU path: its small CPU version runs every part and writes
the table, the profile and the raw outputs; its readers get the scripts' figures right; bad flags get one line."""
import gzip
import importlib.util
import json
import os
import re

import pytest

from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "bench", "gpu.py"))
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)


def table_rows(text):
    """The markdown table as a list of {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))))) for line in lines[2:]]


def number(cell):
    return float(cell.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_script("bench/gpu.py", "--cpu", "--profile", "--out", out, timeout=600)
    return result, out


def test_the_cpu_version_writes_one_table_with_every_part(cpu_run):
    result, out = cpu_run
    assert result.returncode == 0, result.stderr
    table = (out / "table.md").read_text()
    assert table in result.stdout  # printed as written
    rows = table_rows(table)
    assert all(row["device"].startswith("CPU") and re.fullmatch(r"\d+\.\d+\.\d+.*", row["torch"]) for row in rows)
    what = [row["what"] for row in rows]
    assert what[0] == "CUDA tests: not run (no CUDA)"

    training = rows[1:7]  # GPT-2 124M at two micro-batches, then the four largest-micro-batch searches
    assert [row["what"].split(",")[1].strip() for row in training[:2]] == ["micro-batch 2 x 64", "micro-batch 8 x 64"]
    for name, row in zip(["gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-xl"], training[2:]):
        assert f"CPU stand-in for {name} (" in row["what"] and "largest micro-batch 8" in row["what"]
    assert "activation checkpointing" in training[-1]["what"] and "--activation_checkpointing=True" in training[-1]["command"]
    for row in training:
        assert row["command"].startswith("`python train_gpt2.py --benchmark=True --device=cpu")
        assert number(row["tokens/s (or examples/s)"]) > 0 and number(row["ms/step"]) > 0
        assert row["MFU"] == "n/a" and row["peak memory"] == "n/a"  # no peak FLOPS nor memory figure on a CPU

    hellaswag, sample, shakespeare, profile = rows[7:]
    assert "8 invented examples: all 8 in" in hellaswag["what"]
    assert hellaswag["command"] == ("`python hellaswag.py --model random_gpt2.pt --data hellaswag_invented.jsonl "
                                    "--device cpu --benchmark`")  # no path of the run's temporary directory
    assert hellaswag["tokens/s (or examples/s)"].endswith(" examples/s") and number(hellaswag["tokens/s (or examples/s)"]) > 0
    assert "16 new tokens, KV cache (without:" in sample["what"] and number(sample["tokens/s (or examples/s)"]) > 0
    if os.path.exists(os.path.join(ROOT, "input.txt")):
        val = [float(v) for v in re.search(r"validation loss ([\d. →]+)", shakespeare["what"])[1].split(" → ")]
        assert len(val) == 3 and val[0] > val[1] > val[2]  # it learns
        assert (out / "shakespeare_log.txt").read_text().count(" val ") == 3
    else:
        assert "input.txt is missing" in shakespeare["what"]
    assert profile["what"].startswith("profile: 3 steps") and number(profile["ms/step"]) > 0
    assert profile["command"].startswith("`python train_gpt2.py --benchmark=True --device=cpu")
    assert profile["command"].endswith("--batch_size=4 --total_batch_size=256 --profile=profile`")  # one micro-step

    raw = (out / "raw.txt").read_text()
    assert raw.count("$ python ") == 10 and raw.count("(exit status 0,") == 10  # every part but the CUDA tests
    assert set(os.listdir(out)) <= {"profile.txt", "raw.txt", "shakespeare_log.txt", "table.md", "trace.json.gz"}


def test_profile_writes_a_trace_and_prints_ten_operators(cpu_run):
    result, out = cpu_run
    with gzip.open(out / "trace.json.gz", "rt") as f:
        trace = json.load(f)
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    # key_averages().table(): a rule, the column names, a rule, the rows, a rule.
    printed = result.stdout[result.stdout.index("the ten costliest operators"):]
    lines = printed.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")][:3]
    assert "Self CPU" in lines[rules[0] + 1] and rules[2] - rules[1] - 1 == 10
    assert printed.split("\n\n")[0] in (out / "profile.txt").read_text()


def test_readers_of_the_scripts_output():
    line = "benchmark: 876.5 ms/step | 598,123 tok/s | mfu 51.9% | peak memory 61.20 GiB"
    assert bench_gpu.parse_train_benchmark("benchmark: 124,475,904 parameters\n" + line) == \
        {"ms": "876.5", "tokens": "598,123", "mfu": "51.9%", "memory": "61.20 GiB"}
    cpu = "benchmark: 31.0 ms/step | 16,644 tok/s | mfu n/a (no peak FLOPS known for this device) | peak memory n/a (CPU)"
    assert bench_gpu.parse_train_benchmark(cpu)["mfu"] == "n/a" and bench_gpu.parse_train_benchmark("oops") is None
    hellaswag = ("benchmark: batched 1630.2 examples/s, one at a time 95.1 examples/s, 17.1x\n"
                 "10042 examples in 6.2 s, batch_size 32\nacc 0.2500 acc_norm 0.2400 n 10042\n")
    assert bench_gpu.parse_hellaswag_benchmark(hellaswag) == \
        {"batched": 1630.2, "one_at_a_time": 95.1, "count": 10042, "seconds": 6.2}
    assert bench_gpu.parse_sample_benchmark("with KV cache:    412.5 tokens/s\nwithout KV cache:   88.0 tokens/s\n") == \
        (412.5, 88.0)
    steps = "12 train 4.123456 | lr 1.0e-03 | norm 0.5000 | 35 ms | 29,257 tok/s | mfu 12.5%\n13 val 4.5 | perplexity 90\n"
    assert bench_gpu.parse_train_steps(steps) == [(12, 35.0, 29257.0, 12.5)]
    assert bench_gpu.failure(1, "", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "OOM"
    assert bench_gpu.failure(None, "", "") == "timed out"
    assert bench_gpu.failure(2, "", "error: --n_head must divide --n_embd\n") == "failed: error: --n_head must divide --n_embd"
    rule = "-" * 20
    profiled = (f"{line}\nbenchmark: 3.0 ms/step | 1 tok/s | mfu n/a | peak memory n/a (CPU)\n{rule}\n Name  Self CPU\n"
                f"{rule}\n aten::mm  40%\n{rule}\nSelf CPU time total: 1ms\n\nprofile: 3 steps, trace in /x/trace.json\n")
    assert bench_gpu.profiler_table(profiled) == \
        (f"{rule}\n Name  Self CPU\n{rule}\n aten::mm  40%\n{rule}\nSelf CPU time total: 1ms", 3, "/x/trace.json")
    assert bench_gpu.profiler_table(line) is None


def test_the_search_goes_down_until_a_micro_batch_fits():
    tried = []

    def try_batch(batch_size):
        tried.append(batch_size)
        return ({"tokens": "1"}, None) if batch_size <= 8 else (None, "OOM")

    assert bench_gpu.largest_micro_batch(try_batch, (32, 16, 8, 4)) == (8, {"tokens": "1"}, [32, 16])
    assert tried == [32, 16, 8]
    assert bench_gpu.largest_micro_batch(lambda b: (None, "OOM"), (2, 1)) == (None, "OOM", [2, 1])
    assert bench_gpu.largest_micro_batch(lambda b: (None, "failed: x"), (2, 1)) == (None, "failed: x", [])


def test_invented_hellaswag_is_deterministic_and_sized_like_the_real_one(tmp_path):
    from train_gpt2 import get_tokenizer
    a = bench_gpu.write_invented_hellaswag(tmp_path / "a.jsonl", 50)
    b = bench_gpu.write_invented_hellaswag(tmp_path / "b.jsonl", 50)
    assert open(a).read() == open(b).read()
    records = [json.loads(line) for line in open(a)]
    enc = get_tokenizer()
    assert all(40 <= len(enc.encode_ordinary(r["ctx"])) <= 70 for r in records)
    assert all(14 <= len(enc.encode_ordinary(" " + e)) <= 28 for r in records for e in r["endings"])
    assert {r["label"] for r in records} == {0, 1, 2, 3}


def test_only_takes_parts_as_several_values_or_comma_separated():
    assert bench_gpu.parse_args(["--only", "gpt2", "profile"]).only == ["gpt2", "profile"]
    assert bench_gpu.parse_args(["--only=gpt2,profile"]).only == ["gpt2", "profile"]
    assert bench_gpu.parse_args(["--only", "tests,gpt2", "sample", "--cpu"]).only == ["tests", "gpt2", "sample"]
    assert bench_gpu.parse_args([]).only == []  # all of them


@pytest.mark.parametrize("args, message", [
    (["--only=tests,nope"], "error: --only: unknown part 'nope'; the parts are: tests, gpt2, sizes"),
    (["--only", "tests", "nope"], "error: --only: unknown part 'nope'; the parts are: tests, gpt2, sizes"),
    (["--only="], "error: --only takes one or more parts: tests, gpt2, sizes"),
    (["--time_limit=0"], "error: --time_limit takes a number of seconds above 0, not 0"),
    (["--time_limit=soon"], "error: --time_limit takes a number, not 'soon'"),
    (["--cpu=yes"], "error: --cpu takes True or False, not 'yes'"),
    (["--speed"], "error: unknown setting --speed"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_gpu.main(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_an_output_directory_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit:
        bench_gpu.main(["--cpu", "--only=sample", "--out", str(tmp_path / "file")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write into --out=") and err.count("\n") == 1
