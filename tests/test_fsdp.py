"""--fsdp: two processes sharding the model with FSDP2 (gloo, float32) train as DDP does, hold about half its
memory each, and write the checkpoints that every kind of run loads and goes on from."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import ROOT, TINY, read_log, run_script, write_bin

# TINY with GPT-2's vocabulary, so that the samples at each evaluation (GPT-2 tokens) run too; 4 micro-steps a
# step, 2 on each of the two processes.
ARGS = TINY + ["--vocab_size=50257", "--max_steps=20", "--eval_interval=10", "--checkpoint_interval=10",
               "--keep_checkpoints=5", "--num_samples=1", "--sample_length=4", "--sample_prompt="]


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_gpt2.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def train_records(out_dir, start=0):
    """{step: loss} of the training records in out_dir's log.txt, from step `start` on."""
    return {step: value for step, kind, value in read_log(os.path.join(out_dir, "log.txt")) if kind == "train" and step >= start}


def norms(stdout):
    return [float(n) for n in re.findall(r"\| norm ([0-9.]+) \|", stdout)]


def memory(stdout):
    """The bytes of weights, gradients and optimizer state per process, as the run prints them at its start."""
    line = next(line for line in stdout.splitlines() if line.startswith("memory per process:"))
    return [float(n) * 1e9 for n in re.findall(r"([0-9.e-]+) GB", line)[:3]]


def back_to(out_dir, copy, step):
    """A copy of a run's directory as it was when the checkpoint of `step` was its newest."""
    shutil.copytree(out_dir, copy)
    for name in os.listdir(copy):
        if name.startswith("ckpt_") and int(name[5:-3]) > step:
            os.remove(os.path.join(copy, name))
    return copy


@pytest.fixture(scope="module", params=["gpt2", "fast"])
def runs(request, tmp_path_factory):
    """The same 20 steps by DDP and by FSDP on two processes, with each recipe (fast: Muon, whose matrices FSDP
    gathers whole to orthogonalize, and an untied head): {kind: (out_dir, stdout)}. A DDP checkpoint is rank 0's
    model and optimizers as one process writes them: it stands for every checkpoint not sharded."""
    base = tmp_path_factory.mktemp(f"runs_{request.param}")
    rng = np.random.default_rng(0)  # the shards of conftest's shard_dir, once for the module
    (base / "shards").mkdir()
    for name, size in (("tiny_val_000000.bin", 4000), ("tiny_train_000001.bin", 6000), ("tiny_train_000002.bin", 6000)):
        write_bin(base / "shards" / name, rng.integers(0, 256, size))
    recipe = [os.path.join(ROOT, "config", "fast.py")] if request.param == "fast" else []
    results = {kind: torchrun(*recipe, *ARGS, f"--data_dir={base / 'shards'}", f"--out_dir={base / kind}", *flags)
               for kind, flags in (("ddp", []), ("fsdp", ["--fsdp"]))}
    for kind, result in results.items():
        assert result.returncode == 0, f"{kind}: {result.stderr[-3000:]}"
    return {kind: (str(base / kind), result.stdout) for kind, result in results.items()}


def test_fsdp_losses_and_gradient_norms_equal_ddp(runs):
    (ddp_dir, ddp_out), (fsdp_dir, fsdp_out) = runs["ddp"], runs["fsdp"]
    assert "2 processes x 2 micro-steps" in fsdp_out and "sharded by FSDP" in fsdp_out
    ddp, fsdp = train_records(ddp_dir), train_records(fsdp_dir)
    assert sorted(fsdp) == list(range(20)) and sorted(ddp) == sorted(fsdp)
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5)
    # A float32 norm of 1.6M gradients is exact to ~1e-5 (at step 0 FSDP's is 5e-6 from the float64 norm, DDP's 1e-5),
    # and the trajectories' last-bit differences grow a little over 20 steps.
    assert len(norms(fsdp_out)) == 20 and norms(fsdp_out) == pytest.approx(norms(ddp_out), rel=1e-3)
    val = lambda d: [v for _, kind, v in read_log(os.path.join(d, "log.txt")) if kind == "val"]
    assert val(fsdp_dir) == pytest.approx(val(ddp_dir), abs=1e-4) and len(val(fsdp_dir)) == 3
    assert fsdp_out.count("sample 0: <|endoftext|>") == 3  # every evaluation samples, though every rank runs it


def test_each_fsdp_process_holds_about_half_of_a_ddp_process(runs):
    ddp, fsdp = memory(runs["ddp"][1]), memory(runs["fsdp"][1])
    parameters = int(re.search(r"([0-9,]+) parameters", runs["ddp"][1]).group(1).replace(",", ""))
    assert ddp[0] == pytest.approx(4 * parameters, rel=1e-2)  # float32 weights, printed to 3 figures
    assert ddp[1] == ddp[0]  # float32 gradients
    if "optimizer = 'muon'" not in runs["ddp"][1]:
        assert ddp[2] == pytest.approx(2 * ddp[0], rel=1e-2)  # two AdamW moments
    else:  # one Muon momentum for each of the blocks' matrices
        assert ddp[0] < ddp[2] < 2 * ddp[0]
    for sharded, whole in zip(fsdp, ddp):
        assert sharded <= 0.55 * whole


def test_fsdp_checkpoint_is_the_format_of_one_process(runs):
    one = torch.load(os.path.join(runs["ddp"][0], "ckpt_0000020.pt"), weights_only=True)
    sharded = torch.load(os.path.join(runs["fsdp"][0], "ckpt_0000020.pt"), weights_only=True)
    assert list(sharded["model"]) == list(one["model"])
    # The two reduce the gradients in different orders, and the last bits differ. With the gpt2 recipe every weight
    # agrees to 1e-5. The fast recipe's losses agree to 1e-5 (the test above), and given equal gradients Muon on shards
    # is exact (test_sharded_muon_steps_exactly_as_muon), but its weights carry the different last bits further:
    # Muon's Newton-Schulz runs in bfloat16, and AdamW, which divides by the gradient's size, turns rounding into
    # steps of the full rate (4e-3) wherever the true gradient is about 0 (the biases behind the zero-initialized
    # projections, the keys' biases). So for it: the whole model to 2e-3 of its norm (measured: 5e-4), and each
    # tensor to a tenth of its own, which a shard put in the wrong place would not be.
    fast = one["settings"]["optimizer"] == "muon"
    for key, tensor in one["model"].items():
        assert sharded["model"][key].shape == tensor.shape and sharded["model"][key].dtype == tensor.dtype
        if fast:
            assert (sharded["model"][key] - tensor).norm() <= 0.1 * tensor.norm(), key
        else:
            assert torch.allclose(sharded["model"][key], tensor, rtol=1e-4, atol=1e-5), key
    differences = sum((sharded["model"][key] - tensor).square().sum() for key, tensor in one["model"].items())
    assert differences.sqrt() <= (2e-3 if fast else 1e-5) * sum(t.square().sum() for t in one["model"].values()).sqrt()
    # A tied head is the embedding, one tensor in the file, as in a checkpoint of one process.
    tied = sharded["model"]["lm_head.weight"].data_ptr() == sharded["model"]["transformer.wte.weight"].data_ptr()
    assert tied is sharded["config"]["tie_head"] is one["config"]["tie_head"]
    assert len(one["optimizers"]) == len(sharded["optimizers"]) == (1 if tied else 2)  # [AdamW] or [Muon, AdamW]
    for a, b in zip(one["optimizers"], sharded["optimizers"]):
        assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
        for i, state in a["state"].items():
            assert state.keys() == b["state"][i].keys()
            for name, value in state.items():  # the clipping of 1e-5-different norms scales the moments alike
                assert (b["state"][i][name] - value).norm() <= (5e-2 if fast else 1e-4) * value.norm(), (i, name)


def test_fsdp_resumes_bit_for_bit(runs, tmp_path):
    fsdp_dir, _ = runs["fsdp"]
    out = back_to(fsdp_dir, tmp_path / "resumed", 10)
    result = torchrun(f"--out_dir={out}", "--init_from=resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 10" in result.stdout
    a = torch.load(os.path.join(fsdp_dir, "ckpt_0000020.pt"), weights_only=True)
    b = torch.load(out / "ckpt_0000020.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for optimizer_a, optimizer_b in zip(a["optimizers"], b["optimizers"], strict=True):
        for state_a, state_b in zip(optimizer_a["state"].values(), optimizer_b["state"].values(), strict=True):
            assert all(torch.equal(state_a[name], state_b[name]) for name in state_a)
    assert train_records(out, 10) == train_records(fsdp_dir, 10)


def test_an_fsdp_checkpoint_goes_on_in_one_process(runs, tmp_path):
    fsdp_dir, _ = runs["fsdp"]
    out = back_to(fsdp_dir, tmp_path / "resumed", 10)
    result = run_script("train_gpt2.py", f"--out_dir={out}", "--init_from=resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--fsdp: one process has nothing to shard" in result.stdout  # the run's own setting, kept
    assert "resuming from step 10" in result.stdout
    resumed, original = train_records(out, 10), train_records(fsdp_dir, 10)
    assert sorted(resumed) == list(range(10, 20))
    for step in original:  # the optimizer's moments came back: without them step 11 on would differ
        assert resumed[step] == pytest.approx(original[step], rel=1e-5)


def test_a_checkpoint_not_sharded_goes_on_under_fsdp(runs, tmp_path):
    one_dir, _ = runs["ddp"]
    out = back_to(one_dir, tmp_path / "resumed", 10)
    result = torchrun(f"--out_dir={out}", "--init_from=resume", "--fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 10" in result.stdout and "sharded by FSDP" in result.stdout
    resumed, original = train_records(out, 10), train_records(one_dir, 10)
    assert sorted(resumed) == list(range(10, 20))
    for step in original:
        assert resumed[step] == pytest.approx(original[step], rel=1e-5)


def test_an_fsdp_checkpoint_loads_exports_and_samples(runs, tmp_path, capsys):
    fsdp_dir, _ = runs["fsdp"]
    model, checkpoint = train_gpt2.load_model("resume", fsdp_dir)  # what export, sample.py and eval_only load
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, checkpoint["model"]["transformer.h.1.mlp.c_fc.weight"])
    train_gpt2.main(["--init_from=resume", f"--out_dir={fsdp_dir}", f"--export_hf={tmp_path / 'hf'}"])
    from safetensors.torch import load_file
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    c_fc = "transformer.h.1.mlp.c_fc.weight"
    assert torch.equal(exported[c_fc], checkpoint["model"][c_fc].t())
    token = next(model.eval().generate(torch.tensor([[0]]), 1, temperature=0))
    assert token.shape == (1,)
    from transformers import GPT2LMHeadModel  # the export is GPT-2 to transformers, whichever the recipe, and ours
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings is model.config.tie_head
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-4


SHARDED_MUON = """
import copy, gc, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
sys.path.insert(0, sys.argv[1])
from train_gpt2 import Muon

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same weights and gradients on both processes
model = torch.nn.Sequential(torch.nn.Linear(6, 7, bias=False), torch.nn.Linear(7, 5, bias=False))  # 7, 5 rows: uneven
plain_model = copy.deepcopy(model)
fully_shard(model)
options = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
sharded = Muon(model.parameters(), **options)
plain = torch.optim.Muon(plain_model.parameters(), **options, adjust_lr_fn="match_rms_adamw")
for step in range(3):
    for p, q in zip(model.parameters(), plain_model.parameters()):
        q.grad = torch.randn_like(q)
        p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements, src_data_rank=None)
    sharded.step()
    plain.step()
    sharded.param_groups[0]["momentum"] = plain.param_groups[0]["momentum"] = 0.95  # as the warm-up changes it
print(all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), plain_model.parameters())))
del model, plain_model, sharded, plain  # they hold the group: freed first, as run_main does, or gloo aborts at exit
gc.collect()
dist.destroy_process_group()
"""


def test_sharded_muon_steps_exactly_as_muon(tmp_path):
    """Given the same gradients, Muon on two processes' shards moves every weight exactly as on one process."""
    (tmp_path / "sharded_muon.py").write_text(SHARDED_MUON)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "sharded_muon.py"), ROOT], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("True") == 2 and "False" not in result.stdout  # the two ranks' lines may interleave


def test_benchmark_runs_sharded(tmp_path):
    result = torchrun(*TINY, "--benchmark", "--fsdp", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ms/step" in result.stdout and "tok/s" in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=auto", "error: --batch_size=auto does not search under --fsdp"),
])
def test_what_fsdp_refuses_is_one_line(flag, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([*TINY, "--fsdp", flag, f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(message) and err.count("\n") == 1


def test_every_rank_scores_as_many_hellaswag_batches(monkeypatch):
    # Three batches (one context length each) on two ranks: rank 1 scores one batch more, then drops it, because
    # a sharded model's every forward pass is a collective of all ranks.
    import hellaswag
    examples = [hellaswag.Example([1] * n, [[2]] * hellaswag.NUM_ENDINGS, 0) for n in (3, 4, 5)]
    scored = []
    monkeypatch.setattr(hellaswag, "score_batch", lambda model, batch, *args: scored.append(len(batch)) or
                        (torch.zeros(len(batch), hellaswag.NUM_ENDINGS),) * 2)
    monkeypatch.setattr(hellaswag.dist, "all_reduce", lambda counts: None)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=16, vocab_size=8, n_layer=1, n_head=1, n_embd=4))
    counts = [hellaswag.evaluate(model, examples, "cpu", torch.float32, rank=rank, world_size=2, batch_size=1)[2]
              for rank in (0, 1)]
    assert counts == [2, 1] and scored == [1, 1, 1, 1]  # rank 0: two batches; rank 1: one, and one again


COUNT_ALL_GATHERS = """
import gc, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
import train_gpt2
from fsdp import shard_model
dist.init_process_group("gloo")
model = train_gpt2.GPT(train_gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256))
shard_model(model, False, torch.float32)
calls, gather = [], param_group.foreach_all_gather
param_group.foreach_all_gather = lambda *args, **kwargs: calls.append(1) or gather(*args, **kwargs)
x = torch.randint(0, 256, (2, 16))
loss = model(x, x)[1]
forward = len(calls)
loss.backward()
print(f"all-gathers: forward {forward}, backward {len(calls) - forward}")
del model, loss  # they hold the group: freed first, as run_main does, or gloo aborts at exit now and then
gc.collect()
dist.destroy_process_group()
"""


def test_a_training_step_gathers_each_unit_once_a_pass(tmp_path):
    # Three units (two blocks and the root): the forward gathers each; the backward gathers the blocks again (the
    # root keeps its weights after the forward). Calling the root's registered forward methods from within its
    # forward would gather the root twice more in the backward.
    script = tmp_path / "count.py"
    script.write_text(COUNT_ALL_GATHERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), ROOT], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("all-gathers: forward 3, backward 2") == 2, result.stdout
