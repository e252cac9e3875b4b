"""train_gpt2.py: the model, the settings, the data, the schedule, DDP, resume, signals and bad input."""
import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, read_log, run_script, write_bin
import train_gpt2
from train_gpt2 import KVCache
from train_gpt2 import GPT, GPTConfig, DataLoader, get_lr, get_tokenizer, open_shard, parse_settings


# --- the model -----------------------------------------------------------------------------------

def save_random_hf_model(directory, n_positions=64, vocab_size=1000):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=n_positions, n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size))
    hf.save_pretrained(directory)
    return hf.eval()


def test_logits_equal_transformers(tmp_path):
    hf = save_random_hf_model(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.vocab_size == 1000 and model.config.padded_vocab_size == 1024
    idx = torch.randint(0, 1000, (3, 64))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.shape == theirs.shape == (3, 64, 1000)  # the padded ids are never predicted
    assert (ours - theirs).abs().max().item() < 1e-4


def test_init_and_tied_head():
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.shape == (50304, 256)  # padded to a multiple of 64
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - residual) < 1e-3
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum().item() == 0


def test_kv_cache_matches_full_pass():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)).eval()
    idx = torch.randint(0, 256, (2, 20))
    cache = KVCache(2, 32)
    with torch.no_grad():
        parts = [model.logits(model.hidden_states(idx[:, :12], cache)), model.logits(model.hidden_states(idx[:, 12:13], cache)),
                 model.logits(model.hidden_states(idx[:, 13:], cache))]
        assert torch.allclose(torch.cat(parts, 1), model(idx)[0], atol=1e-5)


def test_import_has_no_side_effects(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                             "from train_gpt2 import GPT, GPTConfig"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and os.listdir(tmp_path) == []


def test_tokenizer_is_gpt2():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert enc.decode(enc.encode_ordinary("ROMEO: thou art\n")) == "ROMEO: thou art\n"

# --- settings ------------------------------------------------------------------------------------

def test_settings_defaults_and_overrides():
    s, given = parse_settings([])
    assert given == {}
    assert (s["total_batch_size"], s["batch_size"], s["block_size"], s["max_lr"], s["min_lr"]) == (524288, 64, 1024, 6e-4, 6e-5)
    assert (s["warmup_steps"], s["max_steps"], s["weight_decay"], s["grad_clip"], s["seed"]) == (715, 19073, 0.1, 1.0, 1337)
    s, given = parse_settings(["--max_lr=1e-3", "--n_layer=4", "--hellaswag=False", "--compile=True", "--out_dir=x"])
    assert set(given) == {"max_lr", "n_layer", "hellaswag", "compile", "out_dir"}
    assert s["max_lr"] == 1e-3 and s["n_layer"] == 4 and s["hellaswag"] is False and s["compile"] is True
    s, given = parse_settings(["config/shakespeare.py", "--max_steps=7"])
    assert s["data_dir"] == "input.txt" and s["max_steps"] == 7  # the flag wins over the config file
    assert given["data_dir"] == "config/shakespeare.py" and given["max_steps"] == "--max_steps"


def test_help_lists_every_setting():
    out = run_script("train_gpt2.py", "--help").stdout
    for name in ("data_dir", "out_dir", "init_from", "n_layer", "total_batch_size", "eval_iters", "hellaswag", "dtype"):
        assert f"--{name}=" in out
    assert "--max_lr=0.0006" in out and "peak learning rate" in out


@pytest.mark.parametrize("flag, message", [
    ("--max_lrr=1", "unknown setting --max_lrr; did you mean --max_lr?"),
    ("--n_layer=four", "--n_layer takes a whole number, not 'four'"),
    ("--hellaswag=yes", "--hellaswag takes True or False, not 'yes'"),
    ("config/huge.py", "config file config/huge.py does not exist"),
    ("max_lr=1", "write settings as --name=value"),
])
def test_bad_flags(flag, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([flag])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

# --- data ----------------------------------------------------------------------------------------

def test_bin_and_npy_shards_read_alike(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 10_000).astype(np.uint16)
    write_bin(tmp_path / "a_train_000000.bin", tokens)
    np.save(tmp_path / "b_train_000000.npy", tokens)
    from_bin = open_shard(str(tmp_path / "a_train_000000.bin"), 50257)
    from_npy = open_shard(str(tmp_path / "b_train_000000.npy"), 50257)
    assert isinstance(from_bin, np.memmap) and isinstance(from_npy, np.memmap)  # mapped, never copied whole
    assert from_bin.dtype == from_npy.dtype == np.uint16
    assert np.array_equal(from_bin, tokens) and np.array_equal(from_npy, tokens)


def test_txt_is_split_90_10(input_txt):
    train, val = train_gpt2.find_data(input_txt, 50257)
    tokens = get_tokenizer().encode_ordinary(open(input_txt).read())
    assert len(train[0]) == int(0.9 * len(tokens)) and len(train[0]) + len(val[0]) == len(tokens)
    assert train[0][:5].tolist() == tokens[:5] and val[0][-5:].tolist() == tokens[-5:]


def test_ranks_read_disjoint_tokens_that_cover_one_process(tmp_path):
    tokens = np.arange(50_000, dtype=np.uint16)  # every token is its own position
    sources = [tokens[:20_000], tokens[20_000:]]
    single = DataLoader(sources, 2, 16, 0, 1, 50257)
    ranks = [DataLoader(sources, 2, 16, r, 2, 50257) for r in range(2)]
    for _ in range(40):  # crosses from the first source to the second
        a, b = single.next_batch(), single.next_batch()
        r0, r1 = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(r0[0], a[0]) and torch.equal(r1[0], b[0]) and torch.equal(r1[1], b[1])
        assert not set(r0[0].flatten().tolist()) & set(r1[0].flatten().tolist())
    assert torch.equal(a[1], a[0] + 1)  # targets are the inputs shifted by one
    state = single.state_dict()
    x = single.next_batch()
    single.reset()
    single.load_state_dict(state)
    assert torch.equal(single.next_batch()[0], x[0])


def test_lr_schedule(monkeypatch):
    for name, value in dict(warmup_steps=10, max_steps=110, max_lr=6e-4, min_lr=6e-5).items():
        monkeypatch.setattr(train_gpt2, name, value)  # the constants at the top are the schedule's settings
    assert get_lr(0) == pytest.approx(6e-5)
    assert get_lr(9) == pytest.approx(6e-4)
    assert get_lr(10) == pytest.approx(6e-4)
    assert get_lr(60) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    assert get_lr(110) == pytest.approx(6e-5) and get_lr(500) == pytest.approx(6e-5)
    lrs = [get_lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

# --- training runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, tolerance", [
    ([], 2e-6),
    # Muon's Newton-Schulz runs in bfloat16, where the all-reduce's last-bit differences in a gradient can round
    # a value the other way: the runs agree to a unit in the last place of a logged validation loss.
    (["--optimizer=muon", "--muon_lr=2e-3"], 1e-4),
], ids=["adamw", "muon"])
def test_two_processes_equal_one_with_accumulation(shard_dir, tmp_path, optimizer, tolerance):
    args = TINY + optimizer + [f"--data_dir={shard_dir}", "--max_steps=4", "--eval_interval=2", "--checkpoint_interval=100"]
    one = run_script("train_gpt2.py", *args, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    assert "1 processes x 4 micro-steps" in one.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_gpt2.py", *args, f"--out_dir={tmp_path / 'two'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert "2 processes x 2 micro-steps" in two.stdout
    log_one, log_two = read_log(tmp_path / "one" / "log.txt"), read_log(tmp_path / "two" / "log.txt")
    assert [r[:2] for r in log_one] == [r[:2] for r in log_two] and len(log_one) == 7
    for (_, _, a), (_, _, b) in zip(log_one, log_two):
        assert a == pytest.approx(b, abs=tolerance)


def test_resume_after_kill_is_bit_for_bit(shard_dir, tmp_path):
    args = TINY + [f"--data_dir={shard_dir}", "--max_steps=30", "--eval_interval=10", "--checkpoint_interval=5",
                   "--dropout=0.1", "--batch_size=8", "--total_batch_size=1024", "--keep_checkpoints=10"]
    whole = run_script("train_gpt2.py", *args, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *args, f"--out_dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(str(out / "ckpt_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    survivors = sorted(glob.glob(str(out / "ckpt_*.pt")))
    assert survivors and not survivors[-1].endswith("0000030.pt"), "the run ended before it could be killed"

    resumed = run_script("train_gpt2.py", *args, f"--out_dir={out}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    a = torch.load(tmp_path / "whole" / "ckpt_0000030.pt", weights_only=True)
    b = torch.load(out / "ckpt_0000030.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = {}
    for step, kind, value in read_log(tmp_path / "whole" / "log.txt"):
        losses[step, kind] = value
    for step, kind, value in read_log(out / "log.txt"):  # the log was appended to, and agrees everywhere
        assert losses[step, kind] == value
    assert sum(1 for s, k, _ in read_log(out / "log.txt") if k == "train") >= 30


def test_sigterm_saves_and_exits_zero(shard_dir, tmp_path):
    args = TINY + [f"--data_dir={shard_dir}", "--max_steps=100000", "--checkpoint_interval=100000", f"--out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("3 train"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by a signal" in out
    [path] = glob.glob(str(tmp_path / "ckpt_*.pt"))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] >= 4 and path.endswith(f"{checkpoint['step']:07d}.pt")
    assert checkpoint["loader"]["chunk"] > 0


def test_end_to_end_on_input_txt(input_txt, tmp_path):
    result = run_script("train_gpt2.py", "config/fast.py", "config/shakespeare.py", "--n_layer=2", "--n_embd=64", "--n_head=2",
                        "--block_size=64", "--batch_size=8", "--total_batch_size=512", "--max_steps=30",
                        "--eval_interval=30", "--warmup_steps=5", f"--out_dir={tmp_path}", "--sample_length=8")
    assert result.returncode == 0, result.stderr
    val = [v for _, kind, v in read_log(tmp_path / "log.txt") if kind == "val"]
    assert len(val) == 2 and val[1] < val[0] - 2.0  # from ~10.8 (uniform) to well below
    assert "sample 0: ROMEO:" in result.stdout
    checkpoint = torch.load(tmp_path / "ckpt_0000030.pt", weights_only=True)
    assert checkpoint["step"] == 30 and checkpoint["config"]["n_layer"] == 2
    assert checkpoint["best_val_loss"] == pytest.approx(val[1], abs=1e-4)


def test_eval_only_and_benchmark(shard_dir, tmp_path):
    args = TINY + [f"--data_dir={shard_dir}", "--max_steps=2", f"--out_dir={tmp_path}"]
    assert run_script("train_gpt2.py", *args).returncode == 0
    result = run_script("train_gpt2.py", *args, "--init_from=resume", "--eval_only=True")
    assert result.returncode == 0, result.stderr
    assert [k for _, k, _ in read_log(tmp_path / "log.txt")].count("val") == 2  # step 0, step 2: training's own
    assert read_log(tmp_path / "evals.txt") == [(2, "val", pytest.approx(read_log(tmp_path / "log.txt")[-1][2], abs=1e-4))]
    result = run_script("train_gpt2.py", *TINY, "--benchmark=True", f"--out_dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "ms/step" in result.stdout and not os.path.exists(tmp_path / "b")


def test_fine_tune_from_hugging_face_directory(input_txt, tmp_path):
    save_random_hf_model(tmp_path / "hf", vocab_size=50257)
    result = run_script("train_gpt2.py", "--data_dir=input.txt", f"--init_from={tmp_path / 'hf'}", "--block_size=64",
                        "--batch_size=4", "--total_batch_size=256", "--max_steps=3", "--eval_iters=2", "--dropout=0.1",
                        "--hellaswag=False", "--num_samples=0", f"--out_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "run" / "ckpt_0000003.pt", weights_only=True)
    assert checkpoint["config"]["n_embd"] == 64 and checkpoint["config"]["dropout"] == 0.1

# --- bad input -----------------------------------------------------------------------------------


def corrupt(shard_dir, how):
    path = shard_dir / "tiny_train_000001.bin"
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = (1234).to_bytes(4, "little")
    elif how == "truncated":
        data = data[:-100]
    elif how == "ids":
        data[2000:2002] = (300).to_bytes(2, "little")  # 300 >= vocab_size 256
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how, message", [
    ("magic", "not a token shard in llm.c's format"),
    ("truncated", "the shard is truncated"),
    ("ids", "token id 300 (first bad id at position 488) is not below the model's vocab_size 256"),
])
def test_bad_shards(shard_dir, tmp_path, how, message):
    path = corrupt(shard_dir, how)
    result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=40", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert message in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_bad_settings_and_data(shard_dir, tmp_path, capsys):
    def fails(*args):
        with pytest.raises(SystemExit) as exit:
            train_gpt2.main([*TINY, f"--out_dir={tmp_path / 'out'}", *args])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "does not exist" in fails(f"--data_dir={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    assert "0 training and 0 validation shards" in fails(f"--data_dir={tmp_path / 'empty'}")
    assert "not a multiple of batch_size x block_size x processes = 2 x 32 x 1 = 64" in \
        fails(f"--data_dir={shard_dir}", "--total_batch_size=100")
    assert "no checkpoint (ckpt_*.pt) in" in fails(f"--data_dir={shard_dir}", "--init_from=resume")
    save_random_hf_model(tmp_path / "hf", vocab_size=256)
    capsys.readouterr()
    # A loaded model keeps its shape: a shape flag that differs from it is refused, naming both values.
    assert "has --n_head=4 (given 2)" in fails(f"--data_dir={shard_dir}", f"--init_from={tmp_path / 'hf'}")
    with pytest.raises(SystemExit):
        train_gpt2.main([arg for arg in TINY if arg.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size")]
                        + [f"--out_dir={tmp_path / 'out'}", f"--data_dir={shard_dir}", f"--init_from={tmp_path / 'hf'}",
                           "--block_size=128"])
    assert "--block_size=128 is longer than the model's context of 64 tokens" in capsys.readouterr().err
    assert "is neither a checkpoint file" in fails(f"--init_from={tmp_path / 'empty'}")
    assert not os.path.exists(tmp_path / "out")


def test_bad_checkpoints(shard_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=2", f"--out_dir={out}").returncode == 0
    [path] = glob.glob(str(out / "ckpt_*.pt"))
    good = open(path, "rb").read()

    mismatch = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--init_from=resume", f"--out_dir={out}", "--n_layer=3")
    assert mismatch.returncode == 2 and "--n_layer=2 (given 3)" in mismatch.stderr

    open(path, "wb").write(good[: len(good) // 2])
    broken = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--init_from=resume", f"--out_dir={out}")
    assert broken.returncode == 2 and "is corrupted or not a checkpoint" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert open(path, "rb").read() == good[: len(good) // 2]  # nothing overwritten


def test_a_checkpoint_of_an_older_format_is_refused_naming_the_commit_that_reads_it(shard_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=1", f"--out_dir={out}").returncode == 0
    checkpoint = torch.load(out / "ckpt_0000001.pt", weights_only=True)
    del checkpoint["format"]  # as every checkpoint written before the format number was
    torch.save(checkpoint, out / "ckpt_0000001.pt")
    for script, args in (("train_gpt2.py", [*TINY, f"--data_dir={shard_dir}", "--init_from=resume", "--max_steps=2"]),
                         ("sample.py", ["--max_new_tokens=2"])):
        result = run_script(script, *args, f"--out_dir={out}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "is a checkpoint of format 1, this train_gpt2.py reads format 2; read it with commit e955871" in result.stderr


def test_non_finite_model_stops_and_is_not_saved(shard_dir, tmp_path):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256))
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    from dataclasses import asdict
    torch.save({"format": 2, "model": model.state_dict(), "config": asdict(model.config), "step": 0}, tmp_path / "nan.pt")
    result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", f"--init_from={tmp_path / 'nan.pt'}",
                        "--max_steps=10", "--checkpoint_interval=1", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "update skipped" in result.stdout and "non-finite loss or gradient norm for 3 steps in a row" in result.stderr
    assert not glob.glob(str(tmp_path / "out" / "ckpt_*.pt"))


def test_hellaswag_during_training_and_eval_only(input_txt, tmp_path):
    import json
    lines = [{"ctx": f"The cook opened the oven number {i} and", "label": i % 4,
              "endings": ["took out the bread.", "sang to the moon.", "painted the car blue.", "ran up the hill."]}
             for i in range(8)]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["config/shakespeare.py", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
            "--total_batch_size=128", "--max_steps=2", "--eval_interval=2", "--num_samples=0",
            "--hellaswag=True", f"--hellaswag_data={tmp_path / 'hs.jsonl'}", f"--out_dir={tmp_path / 'out'}"]
    result = run_script("train_gpt2.py", *args)
    assert result.returncode == 0, result.stderr
    hella = [(step, value) for step, kind, value in read_log(tmp_path / "out" / "log.txt") if kind == "hella"]
    assert [step for step, _ in hella] == [0, 2]
    assert all(value * 8 == round(value * 8) for _, value in hella)  # a count out of 8 examples
    assert "over 8 examples" in result.stdout
    result = run_script("train_gpt2.py", *args, "--init_from=resume", "--eval_only=True")
    assert result.returncode == 0, result.stderr
    assert [k for _, k, _ in read_log(tmp_path / "out" / "log.txt")].count("hella") == 2
    assert [k for _, k, _ in read_log(tmp_path / "out" / "evals.txt")] == ["val", "hella"]


def test_bad_hellaswag_data_is_one_line(input_txt, tmp_path):
    result = run_script("train_gpt2.py", *TINY, "--data_dir=input.txt", "--vocab_size=50257", "--hellaswag=True",
                        f"--hellaswag_data={tmp_path / 'missing.jsonl'}", "--max_steps=1", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert "missing.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
