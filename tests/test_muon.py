"""--optimizer=muon: Muon on the blocks' weight matrices, AdamW on the rest, through everything the trainer does."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import ROOT, TINY, read_log, run_script, write_bin
from configurator import read_config_file
from train_gpt2 import GPT, SETTINGS, GPTConfig, configure_optimizers

MUON = ["--optimizer=muon", "--muon_lr=2e-2", "--max_lr=1e-2"]


@pytest.fixture
def pattern_dir(tmp_path):
    """Shards that repeat one sequence of 64 distinct ids: a model can learn them, so the loss must fall."""
    period = np.random.default_rng(0).permutation(256)[:64]
    data = tmp_path / "pattern"
    data.mkdir()
    write_bin(data / "pattern_val_000000.bin", np.tile(period, 40))
    write_bin(data / "pattern_train_000001.bin", np.tile(period, 100))
    return data


def test_parameters_split_between_muon_and_adamw(monkeypatch):
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32))
    monkeypatch.setattr(train_gpt2, "optimizer", "muon")
    muon, adamw = configure_optimizers(model, "cpu")
    assert isinstance(muon, train_gpt2.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = [p for group in muon.param_groups for p in group["params"]]
    in_adamw = [p for group in adamw.param_groups for p in group["params"]]
    names = {id(p): name for name, p in model.named_parameters()}  # the tied head is wte: one parameter
    assert sorted(names[id(p)] for p in in_muon) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(map(id, in_muon + in_adamw)) == sorted(names)  # every parameter, each in exactly one
    assert {id(model.lm_head.weight), id(model.transformer.wpe.weight)} <= set(map(id, in_adamw))
    # With AdamW alone, one optimizer holds them all.
    monkeypatch.setattr(train_gpt2, "optimizer", "adamw")
    (alone,) = configure_optimizers(model, "cpu")
    assert sorted(id(p) for group in alone.param_groups for p in group["params"]) == sorted(names)


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the GradScaler unscales and steps both
def test_muon_trains_and_the_loss_falls(pattern_dir, tmp_path, dtype):
    out = tmp_path / "out"
    result = run_script("train_gpt2.py", *TINY, *MUON, f"--data_dir={pattern_dir}", f"--out_dir={out}",
                        "--max_steps=20", "--eval_interval=10", f"--dtype={dtype}")
    assert result.returncode == 0, result.stderr
    assert "update skipped" not in result.stdout
    val = {step: value for step, kind, value in read_log(out / "log.txt") if kind == "val"}
    assert val[0] == pytest.approx(np.log(256), abs=0.05) and val[20] < 2.5  # from chance to well below it


def test_muon_steps_exactly_as_torchs(monkeypatch):
    """Our Muon is torch.optim.Muon's arithmetic (with match_rms_adamw), written out: the same weights, step for step,
    on square, tall and wide matrices."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 8), (12, 5), (5, 12))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = train_gpt2.Muon(ours, lr=0.02, momentum=0.9, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, momentum=0.9, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_fast_recipe_resumes_bit_for_bit_and_needs_muon(shard_dir, tmp_path):
    """config/fast.py: Muon with its momentum warm-up, the embeddings at their own rate, an untied head; the run
    stopped at step 10 goes on exactly as the whole one did."""
    args = [os.path.join(ROOT, "config", "fast.py")] + TINY + [f"--data_dir={shard_dir}", "--max_steps=20", "--eval_interval=5",
                   "--checkpoint_interval=10", "--dropout=0.1", "--keep_checkpoints=10", "--muon_momentum_warmup=15"]
    whole = run_script("train_gpt2.py", *args, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    # A run stopped at step 10: its checkpoint alone, resumed in a new directory.
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "whole" / "ckpt_0000010.pt", tmp_path / "resumed")
    resumed = run_script("train_gpt2.py", *args, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 10" in resumed.stdout

    a = torch.load(tmp_path / "whole" / "ckpt_0000020.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt_0000020.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    muon_a, adamw_a = a["optimizers"]
    muon_b, adamw_b = b["optimizers"]
    for state_a, state_b in ((muon_a, muon_b), (adamw_a, adamw_b)):
        assert state_a["state"].keys() == state_b["state"].keys() and state_a["state"]
        for key, per_param in state_a["state"].items():
            assert all(torch.equal(v, state_b["state"][key][name]) for name, v in per_param.items())
    assert list(muon_a["state"][0]) == ["momentum_buffer"]
    # One schedule, each group at its own peak: here the rates of the last step, 19; the momentum warmed up by 15.
    fast = {**train_gpt2.SETTINGS, **read_config_file(os.path.join(ROOT, "config", "fast.py"), SETTINGS)}
    progress = (19 - 2) / (20 - 2)  # the cosine, after TINY's 2 warmup steps
    scale = (fast["min_lr"] + 0.5 * (1 + np.cos(np.pi * progress)) * (fast["max_lr"] - fast["min_lr"])) / fast["max_lr"]
    assert [group["lr"] for group in adamw_a["param_groups"]] == pytest.approx(
        [scale * peak for peak in (fast["embedding_lr"], fast["max_lr"], fast["max_lr"])])
    assert muon_a["param_groups"][0]["lr"] == pytest.approx(scale * fast["muon_lr"])
    assert muon_a["param_groups"][0]["momentum"] == fast["muon_momentum"]
    assert "lm_head.weight" in a["model"] and a["config"]["tie_head"] is False
    whole_log = {(step, kind): value for step, kind, value in read_log(tmp_path / "whole" / "log.txt")}
    resumed_log = read_log(tmp_path / "resumed" / "log.txt")
    assert len(resumed_log) == 10 + 2  # steps 10..19 and the evaluations after 15 and 20 steps
    assert all(whole_log[step, kind] == value for step, kind, value in resumed_log)

    # The optimizer states would not fit another optimizer: resuming with AdamW is refused.
    refused = run_script("train_gpt2.py", *args, "--optimizer=adamw", f"--out_dir={tmp_path / 'whole'}", "--init_from=resume")
    assert refused.returncode == 2
    assert refused.stderr == ("error: the run used --optimizer=muon (given adamw); its checkpoint holds that "
                              "optimizer's state: leave out --optimizer to resume\n")


@pytest.mark.parametrize("flag, message", [
    ("--optimizer=sgd", "error: --optimizer takes adamw or muon, not 'sgd'"),
    ("--muon_lr=-0.01", "error: --muon_lr=-0.01: it takes a number above 0"),
    ("--muon_weight_decay=-1", "error: --muon_weight_decay=-1.0: it takes 0 or more"),
    ("--embedding_lr=-1", "error: --embedding_lr=-1.0: it takes 0 or more"),
    ("--recipe=fast", "error: unknown setting --recipe; see --help"),  # the recipe is config/fast.py
])
def test_bad_optimizer_settings(shard_dir, tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'out'}", "--optimizer=muon", flag])
    assert exit.value.code == 2
    assert capsys.readouterr().err == message + "\n"
    assert not os.path.exists(tmp_path / "out")


def test_benchmark_reads_the_step_fraction_off_the_curve():
    spec = importlib.util.spec_from_file_location("bench_optimizers", os.path.join(ROOT, "bench", "optimizers.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    curve = {0: 10.0, 25: 6.0, 50: 5.0, 75: 4.0}
    assert bench.steps_to_reach(curve, 5.0) == 50
    assert bench.steps_to_reach(curve, 4.5) == pytest.approx(62.5)  # half way between the evaluations at 50 and 75
    assert bench.steps_to_reach(curve, 3.9) is None


def test_benchmark_compares_the_recipes_on_pythons_documentation(tmp_path):
    result = run_script("bench/optimizers.py", "--sizes", "2x64", "--seeds=1", "--steps", "4", "--eval_interval=1",
                        "--lrs=1e-3,2e-3", "--short=0.5", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "documentation" in result.stdout and os.path.getsize(tmp_path / "pydocs.txt") > 1_000_000
    assert "| step | gpt2 0.001 | gpt2 0.002 | fast |" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 2x64 | 1 |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[2] in ("0.001", "0.002") and cells[-1].isdigit() and cells[-2].isdigit()  # the rate, ms per step
    step, kind, loss = open(tmp_path / "2x64_seed1_fast_2steps" / "log.txt").read().splitlines()[-1].split()
    assert (step, kind) == ("2", "val") and float(cells[7]) == pytest.approx(float(loss), abs=1e-4)  # a 2-step run
    runs = sorted(os.listdir(tmp_path))
    assert runs == ["2x64_seed1_fast", "2x64_seed1_fast_2steps", "2x64_seed1_gpt2_lr0.001", "2x64_seed1_gpt2_lr0.002",
                    "pydocs.txt"]
    bad = run_script("bench/optimizers.py", "--lrs", "fast")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sizes takes layers x width")
    bad = run_script("bench/optimizers.py", "--steps=200", "--short=1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --short is a fraction of --steps")
