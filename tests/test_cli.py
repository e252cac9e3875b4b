"""Every script answers the command line alike (--name=value, --name value, a bare --flag for booleans, one
'error:' line and exit status 2 for anything bad, --help), and the rough edges a new user met are gone."""
import dataclasses
import functools
import glob
import hashlib
import http.server
import json
import os
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp

import hellaswag
import train_gpt2
from conftest import TINY, read_log, run_script
from train_gpt2 import GPT, GPTConfig


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random GPT-2-vocabulary model as a checkpoint file, for the scripts that load one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    path = tmp_path_factory.mktemp("model") / "ckpt_0000000.pt"
    torch.save({"format": 2, "model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def invented_hellaswag(tmp_path_factory):
    path = tmp_path_factory.mktemp("hellaswag") / "hs.jsonl"
    path.write_text("".join(json.dumps({"ctx": f"The cook opened oven {i} and", "label": i % 4, "endings": [
        "took out the bread.", "sang.", "painted the car.", "ran up the hill."]}) + "\n" for i in range(4)))
    return str(path)


def one_error_line(result):
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def script_runs(shard_dir, tiny_checkpoint, invented_hellaswag, tmp_path):
    """For each script: a short real run written with a bare boolean (--benchmark) and a '--name value' pair,
    and what its output must then show."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Tokens to count, and more of them. " * 200)
    return {
        "train_gpt2.py": ([*TINY, "--benchmark", "--batch_size", "4", f"--out_dir={tmp_path / 'b'}"],
                          ["benchmark:", "256 tokens per step"]),
        "sample.py": ([f"--init_from={tiny_checkpoint}", "--benchmark", "--max_new_tokens", "6", "--device=cpu"],
                      ["with KV cache:", "6 new tokens"]),
        "hellaswag.py": (["--model", tiny_checkpoint, "--data", invented_hellaswag, "--device=cpu", "--benchmark",
                          "--batch_size", "2"], ["benchmark: batched", "batch_size 2"]),
        "fineweb.py": (["--input", str(corpus), "--benchmark", "--workers", "1"], ["benchmark:", "1 worker processes"]),
        "plot.py": None,  # no boolean: tests/test_plot.py runs it with -o, --output PATH and --output=PATH
    }


@pytest.mark.parametrize("script", ["train_gpt2.py", "sample.py", "hellaswag.py", "fineweb.py", "plot.py"])
def test_every_script_reads_its_command_line_alike(script, shard_dir, tiny_checkpoint, invented_hellaswag, tmp_path):
    assert "unknown setting --no_such_flag" in one_error_line(run_script(script, "--no_such_flag=1"))
    assert "unknown setting --no_such_flag" in one_error_line(run_script(script, "--no_such_flag", "1"))
    help_text = run_script(script, "--help")
    assert help_text.returncode == 0 and "settings: --name=value or --name value" in help_text.stdout
    assert "  --seed=1337" in help_text.stdout or script in ("hellaswag.py", "fineweb.py", "plot.py")
    run = script_runs(shard_dir, tiny_checkpoint, invented_hellaswag, tmp_path)[script]
    if run is not None:
        args, expected = run
        result = run_script(script, *args)
        assert result.returncode == 0, result.stderr
        for text in expected:
            assert text in result.stdout


def test_a_setting_without_its_value_is_one_line():
    assert "--max_lr has no value: write --max_lr=VALUE" in one_error_line(run_script("train_gpt2.py", "--max_lr"))
    # A flag right after it is not its value.
    message = one_error_line(run_script("train_gpt2.py", "--max_steps", "--out_dir=x"))
    assert "--max_steps has no value: write --max_steps=VALUE or --max_steps VALUE" in message


def test_a_head_count_that_does_not_divide_the_width_is_one_line():
    message = one_error_line(run_script("train_gpt2.py", "config/shakespeare.py", "--n_head=5"))
    assert "--n_head=5 does not divide --n_embd=128" in message and "try --n_head=4" in message


def test_export_after_a_run_takes_the_shape_from_the_checkpoint_and_prints_only_its_line(shard_dir, tmp_path):
    out = tmp_path / "run"
    assert run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=1", f"--out_dir={out}").returncode == 0
    result = run_script("train_gpt2.py", "--init_from=resume", f"--out_dir={out}", f"--export_hf={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (f"wrote {tmp_path / 'hf'}\n", "")  # no progress bar of transformers
    assert GPT.from_pretrained(str(tmp_path / "hf")).config.n_layer == 2


def test_a_resumed_run_takes_its_settings_from_the_checkpoint(shard_dir, tmp_path):
    out = tmp_path / "run"
    first = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=3", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr
    assert "2 train" in first.stdout and "step 3 of 3" in first.stdout and " left" in first.stdout
    assert "done: 3 steps, 768 tokens in" in first.stdout and "best validation loss" in first.stdout
    # No flag but where the run is: its data, model and max_steps come from the checkpoint, so nothing is left to do.
    again = run_script("train_gpt2.py", "--init_from=resume", f"--out_dir={out}")
    assert again.returncode == 0, again.stderr
    assert "resuming from step 3" in again.stdout and "done: 0 steps" in again.stdout and "changed" not in again.stdout
    longer = run_script("train_gpt2.py", "--init_from=resume", f"--out_dir={out}", "--max_steps", "5", "--n_layer=2")
    assert longer.returncode == 0, longer.stderr
    assert "changed: --max_steps 3 -> 5" in longer.stdout and "n_layer" not in longer.stdout
    # The rate at step 3: the end of the cosine (min_lr) before; a third of the way down it now.
    assert "the cosine now ends at step 5, not 3: the rate at step 3 goes from 6.0000e-05 to 4.6500e-04" in longer.stdout
    assert [step for step, kind, _ in read_log(out / "log.txt") if kind == "train"] == [0, 1, 2, 3, 4]
    refused = one_error_line(run_script("train_gpt2.py", "--init_from=resume", f"--out_dir={out}", "--n_embd=64"))
    assert "--n_embd=32 (given 64)" in refused


def test_hellaswag_unreachable_names_both_ways_out(shard_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hellaswag, "DATA_URL", "http://127.0.0.1:9/")  # the discard port: nothing listens
    monkeypatch.setenv(hellaswag.CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'out'}", "--hellaswag=True"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert "--hellaswag_data" in err and "--hellaswag=False" in err


def test_sample_without_a_run_does_not_suggest_scratch(tmp_path):
    message = one_error_line(run_script("sample.py", f"--out_dir={tmp_path}"))
    assert "no checkpoint (ckpt_*.pt) in" in message and "scratch" not in message


# --- one download per node under torchrun ------------------------------------------------------------

class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def find_input_txt(rank, world_size, port, url, sha256, path, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    train_gpt2.SHAKESPEARE_URL, train_gpt2.SHAKESPEARE_SHA256 = url, sha256
    train, val = train_gpt2.find_data(path, 50257)
    results.put((rank, len(train[0]) + len(val[0])))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_one_process_per_node_downloads_input_txt(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    text = "ROMEO: a text of our own, served from this machine.\n" * 300
    (served / "shakespeare.txt").write_text(text)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shakespeare.txt"
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    results = mp.get_context("spawn").SimpleQueue()
    path = str(tmp_path / "data" / "input.txt")
    os.makedirs(os.path.dirname(path))
    try:
        mp.start_processes(find_input_txt, args=(2, free_port(), url, sha256, path, results), nprocs=2, start_method="spawn")
    finally:
        server.shutdown()
    counts = sorted(results.get() for _ in range(2))
    assert CountingHandler.requests == ["/shakespeare.txt"]  # one download, the other process waited for it
    assert counts[0][1] == counts[1][1] > 0
    assert open(path).read() == text and glob.glob(path + ".*") == []  # no temporary file left


def test_an_error_comes_before_the_settings_block_and_help_quotes_a_default_with_spaces(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = run_script("train_gpt2.py", "config/fast.py", "config/shakespeare.py", f"--out_dir={tmp_path / 'file'}")
    assert result.returncode == 2 and result.stdout == ""  # nothing printed before the one line: `2>&1 | head -1`
    assert result.stderr.startswith("error: --out_dir=") and result.stderr.count("\n") == 1
    help_text = run_script("train_gpt2.py", "--help").stdout
    assert "--sample_prompt=\"Hello, I'm a language model,\" what the samples start from" in help_text
    assert "config files: config/fast.py, config/shakespeare.py" in help_text
    assert max(map(len, help_text.splitlines())) <= 120
