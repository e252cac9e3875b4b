"""
The GPU path: what only CUDA runs (bf16 and fp16 autocast, torch.compile's kernels, fused AdamW, NCCL), and
what the CPU tests check (resume, torchrun, HellaSwag, the KV cache), checked again on CUDA.

Every test is skipped where CUDA is absent, as in CI. To check the tests themselves on a machine without
a GPU, run them against the CPU: CUDA_TESTS_DEVICE=cpu python -m pytest tests/test_cuda.py
(the tests of what only CUDA has are then skipped, or use its CPU counterpart: gloo for NCCL).

Anything that goes through the training loop runs train_gpt2.py as a user would, in a subprocess; only the
model, its config and generate() are used in-process.
"""

import copy
import glob
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

import hellaswag
from conftest import ROOT, TINY, read_log, run_script
from train_gpt2 import GPT, GPTConfig

DEVICE = os.environ.get("CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")

pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="checks something only CUDA has")

# cuBLAS picks its algorithms, and so its order of additions, by the workspace it may use: a fixed
# workspace makes its matmuls repeat bit for bit (NVIDIA's documented condition for reproducibility).
DETERMINISTIC_CUBLAS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@pytest.fixture
def exact_float32():
    """float32 matmuls in full float32, not TF32 (10 bits of mantissa): the in-process comparisons below
    then measure what they name (compile, the cache, the optimizer), not TF32's rounding."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def small_model(seed=0, vocab_size=50257, block_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=block_size, vocab_size=vocab_size)).to(DEVICE)


def random_batch(batch_size=4, block_size=64, vocab_size=50257, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=generator).to(DEVICE)
    return tokens[:, :-1], tokens[:, 1:]


def loss_before_and_after_one_step(model, x, y, autocast_dtype=None):
    """The loss on (x, y), then one AdamW step on it, then the loss again."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    autocast = torch.autocast(torch.device(DEVICE).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        _, before = model(x, y)
    before.backward()
    optimizer.step()
    with torch.no_grad(), autocast:
        _, after = model(x, y)
    return before.item(), after.item()

# --- numerics: bf16, compile, fused AdamW -------------------------------------------------------------


def test_bf16_autocast_step_matches_float32(exact_float32):
    x, y = random_batch()
    full = loss_before_and_after_one_step(small_model(), x, y)
    mixed = loss_before_and_after_one_step(small_model(), x, y, torch.bfloat16)
    assert full[0] == pytest.approx(10.83, abs=0.2)  # about ln(50257) at initialization
    # bf16 keeps 8 bits of mantissa: each rounding is off by up to 2**-8 (0.4%) of its value. The loss is
    # computed in float32 from bf16 logits, and at initialization those are ~0.1 while the loss, ~10.8, is
    # mostly ln(50257), which no rounding touches: the roundings move it by ~1e-4 (a relative 1e-5, as
    # measured with CPU autocast). rtol 2e-3 leaves a margin of 100 for other kernels and still catches a
    # broken cast (a softmax or loss taken in bf16 is off by ~2**-8 * 10.8 = 0.04, a relative 4e-3).
    assert mixed[0] == pytest.approx(full[0], rel=2e-3)
    assert mixed[1] == pytest.approx(full[1], rel=2e-3)
    # The step itself: both fall by ~0.6, and by the same amount to within bf16's roundings.
    assert full[1] < full[0] - 0.1 and mixed[1] < mixed[0] - 0.1
    assert (mixed[0] - mixed[1]) == pytest.approx(full[0] - full[1], rel=0.05)


def test_compiled_model_matches_eager(exact_float32):
    torch._dynamo.reset()
    model = small_model()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    x, y = random_batch()
    with torch.no_grad():
        eager_logits, compiled_logits = model(x)[0], compiled(x)[0]
    # In float32 the compiler's fused kernels differ from eager ones only in the order of their additions
    # (LayerNorm's statistics, the attention softmax, GELU fused into its matmul's epilogue): a few ulps,
    # ~1e-6 on logits of size ~1 after two blocks. 1e-4 keeps a margin of 100, and a real miscompilation
    # (a lost mask or scale, a wrong layout) moves logits by 1e-2 or more.
    assert (eager_logits - compiled_logits).abs().max().item() < 1e-4
    eager = loss_before_and_after_one_step(model, x, y)
    compiled_step = loss_before_and_after_one_step(compiled, x, y)
    # The same ulps, through the backward pass and one AdamW step of lr 1e-3.
    assert compiled_step[0] == pytest.approx(eager[0], abs=1e-5)
    assert compiled_step[1] == pytest.approx(eager[1], abs=1e-4)
    torch._dynamo.reset()


def test_fused_adamw_matches_foreach_on_the_same_gradients():
    model = small_model()
    twin = copy.deepcopy(model)

    def adamw(module, **implementation):
        # The groups of the recipe: decay on matrices and embeddings only.
        params = list(module.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **implementation)

    fused, foreach = adamw(model, fused=True), adamw(twin, foreach=True)
    for step in range(3):  # the moments, the bias correction and the decay all come into play
        x, y = random_batch(seed=step)
        model(x, y)[1].backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()  # the same gradients, bit for bit
        fused.step(), foreach.step()
        fused.zero_grad(), foreach.zero_grad()
    # Weights of ~0.02 change by ~6e-4 a step; the two kernels round each update's last bit differently
    # (fused multiply-adds, another order of operations): a float32 ulp of 0.02 is 2e-9, and three steps
    # differed by 7e-9 at most on a CPU. 1e-6 is far above that and far below a step's size, so a fused
    # kernel that skipped or doubled any term (the decay, the bias correction, epsilon) would fail.
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p - q).abs().max().item() < 1e-6, name
    moved = (model.transformer.h[0].mlp.c_fc.weight - small_model().transformer.h[0].mlp.c_fc.weight).abs().max()
    assert moved.item() > 1e-3  # three steps of ~6e-4 were taken

# --- training runs, through the command line ------------------------------------------------------------


def train_args(shard_dir, out_dir, *more):
    return [*TINY, f"--data_dir={shard_dir}", f"--out_dir={out_dir}", f"--device={DEVICE}", *more]


def test_float16_with_grad_scaler_takes_steps_and_saves_only_finite_weights(shard_dir, tmp_path):
    # Eager: this checks the loss scaler, not the compiler (test_compiled_model_matches_eager does that).
    out = tmp_path / "fp16"
    result = run_script("train_gpt2.py", *train_args(shard_dir, out, "--dtype=float16", "--compile=False",
                                                     "--max_steps=20", "--eval_interval=10", "--checkpoint_interval=5",
                                                     "--keep_checkpoints=10", "--max_lr=3e-3"))
    assert result.returncode == 0, result.stderr
    assert "float16" in result.stdout
    losses = [value for _, kind, value in read_log(out / "log.txt") if kind == "train"]
    # The shards are uniform random ids: the loss stays at ln(256) = 5.545, finite at every step.
    assert len(losses) == 20 and all(abs(loss - 5.545) < 0.2 for loss in losses)
    paths = sorted(glob.glob(str(out / "ckpt_*.pt")))
    assert [os.path.basename(p) for p in paths] == [f"ckpt_{s:07d}.pt" for s in (5, 10, 15, 20)]
    checkpoints = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    for path, checkpoint in zip(paths, checkpoints):
        assert all(torch.isfinite(value).all() for value in checkpoint["model"].values()), path
        scale = checkpoint["scaler"]["scale"]
        assert 0 < scale < float("inf") and scale == 2 ** round(torch.tensor(scale).log2().item())  # a power of 2
    for before, after in zip(checkpoints, checkpoints[1:]):  # the scaler let steps through in every interval
        assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_resume_after_kill_gives_the_losses_of_an_uninterrupted_run(shard_dir, tmp_path, monkeypatch):
    # float32 and no compile: the two runs must compute the same thing. With a fixed cuBLAS workspace the
    # matmuls repeat bit for bit; what may not is the backward of float32 attention (the memory-efficient
    # kernel adds into its gradients with atomics, in an order that varies from run to run), which moves
    # the last bits of the gradients. Over 40 steps of this tiny model that drift stays near 1e-6, so the
    # losses are compared to 1e-4, while a resume that got anything wrong (the data position, the optimizer
    # moments, the CUDA random state that dropout draws from) changes them by 1e-2 or more. On the CPU
    # every kernel is deterministic and the runs agree exactly.
    tolerance = 1e-4 if ON_CUDA else 0.0
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS["CUBLAS_WORKSPACE_CONFIG"])
    more = ["--dtype=float32", "--compile=False", "--max_steps=40", "--eval_interval=10", "--checkpoint_interval=5",
            "--dropout=0.1", "--batch_size=8", "--total_batch_size=1024", "--keep_checkpoints=10"]
    whole = run_script("train_gpt2.py", *train_args(shard_dir, tmp_path / "whole", *more))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *train_args(shard_dir, out, *more)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(str(out / "ckpt_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    proc.wait()
    survivors = sorted(glob.glob(str(out / "ckpt_*.pt")))
    assert survivors and not survivors[-1].endswith("0000040.pt"), "the run ended before it could be killed"

    resumed = run_script("train_gpt2.py", *train_args(shard_dir, out, *more, "--init_from=resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    expected = {(step, kind): value for step, kind, value in read_log(tmp_path / "whole" / "log.txt")}
    got = {(step, kind): value for step, kind, value in read_log(out / "log.txt")}  # the last record of a step counts
    assert got.keys() == expected.keys() and sum(kind == "train" for _, kind in got) == 40
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tolerance, rel=0), key
    a = torch.load(tmp_path / "whole" / "ckpt_0000040.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(out / "ckpt_0000040.pt", map_location="cpu", weights_only=True)["model"]
    if ON_CUDA:
        # The mean, not the largest difference: AdamW moves a weight by ~lr whatever the size of its gradient, so
        # one gradient that the atomics' last bits flip in sign moves one weight by ~6e-4. A resume that lost
        # the moments or the position moves most weights that much: a mean of ~1e-4.
        assert (torch.cat([(a[k] - b[k]).flatten() for k in a]).abs().mean().item()) < 1e-6
    else:
        assert all(torch.equal(a[k], b[k]) for k in a)


def torchrun(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_with_one_process_trains_like_python(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS["CUBLAS_WORKSPACE_CONFIG"])
    more = ["--dtype=float32", "--compile=False", "--max_steps=4", "--eval_interval=2", "--checkpoint_interval=100"]
    plain = run_script("train_gpt2.py", *train_args(shard_dir, tmp_path / "plain", *more))
    assert plain.returncode == 0, plain.stderr
    launched = torchrun("train_gpt2.py", *train_args(shard_dir, tmp_path / "torchrun", *more))
    assert launched.returncode == 0, launched.stderr
    assert "1 processes x 4 micro-steps" in launched.stdout
    log, reference = read_log(tmp_path / "torchrun" / "log.txt"), read_log(tmp_path / "plain" / "log.txt")
    assert [row[:2] for row in log] == [row[:2] for row in reference] and len(log) == 7  # 4 train, 3 val
    for (_, _, a), (_, _, b) in zip(log, reference):
        assert a == pytest.approx(b, abs=1e-4 if ON_CUDA else 0.0)  # the same run; on CUDA, attention's atomics


def test_nccl_all_reduce_under_torchrun(tmp_path):
    # train_gpt2.py starts a process group under torchrun, one process included; this checks, on one GPU, that
    # the backend a multi-GPU run would use comes up and reduces. On the CPU: gloo, as train_gpt2.py uses.
    backend = "nccl" if ON_CUDA else "gloo"
    script = tmp_path / "all_reduce.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        f"dist.init_process_group({backend!r})\n"
        f"device = {DEVICE!r} if {ON_CUDA} else 'cpu'\n"
        "if device.startswith('cuda'):\n"
        "    device = f\"cuda:{os.environ['LOCAL_RANK']}\"\n"
        "    torch.cuda.set_device(device)\n"
        "value = torch.full((4,), 1.5, device=device)\n"
        "dist.all_reduce(value)\n"
        "dist.barrier()\n"
        "print('backend', dist.get_backend(), 'sum', value.sum().item(), 'world', dist.get_world_size())\n"
        "dist.destroy_process_group()\n")
    result = torchrun(str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"backend {backend} sum 6.0 world 1" in result.stdout

# --- evaluation and generation ----------------------------------------------------------------------------

WORDS = ("the a cook girl boy dog team rider painter kite boat ladder river garden kitchen rope wall bread "
         "opens closes lifts pours paints climbs throws holds pulls waves smiles turns slowly quickly again "
         "then near under over into onto with after before").split()


def invented_sentence(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def test_hellaswag_counts_equal_on_cuda_and_cpu(tmp_path, monkeypatch):
    # The scripts allow TF32 matmuls (float32 with 10 bits of mantissa) on CUDA, as training does; their
    # rounding, ~1e-3 on a loss, would flip a near-tie between endings now and then. NVIDIA's libraries read
    # this variable and then keep float32 matmuls in float32, so both devices compute the same float32 sums.
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    rng = random.Random(0)
    with open(tmp_path / "invented.jsonl", "w") as f:
        for i in range(32):
            record = {"ctx": invented_sentence(rng, rng.randint(6, 30)), "label": rng.randrange(4),
                      "endings": [invented_sentence(rng, rng.randint(2, 14)) for _ in range(4)]}
            f.write(json.dumps(record) + "\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=50257))
    with torch.no_grad():
        # A larger output head gives the random model strong opinions: the endings' losses then differ by
        # ~0.5, not ~0.05, so that float32's ~1e-6 of difference between the devices never flips a choice.
        model.lm_head.weight.mul_(10)
    torch.save({"format": 2, "model": model.state_dict(), "config": asdict(model.config), "step": 0}, tmp_path / "random.pt")
    last_lines = {}
    for device in (DEVICE, "cpu"):
        result = run_script("hellaswag.py", "--model", tmp_path / "random.pt", "--data", tmp_path / "invented.jsonl",
                            "--device", device, "--dtype", "float32")
        assert result.returncode == 0, result.stderr
        last_lines[device] = result.stdout.strip().splitlines()[-1]
    assert last_lines[DEVICE].startswith("acc ") and last_lines[DEVICE].endswith(" n 32")
    assert last_lines[DEVICE] == last_lines["cpu"]


@cuda_only
def test_hellaswag_copies_each_batch_in_once_and_the_choices_out_once():
    from torch.profiler import ProfilerActivity, profile
    rng = random.Random(0)
    examples = [hellaswag.Example([rng.randrange(50257) for _ in range(rng.choice([8, 12]))],
                                  [[rng.randrange(50257) for _ in range(rng.randint(1, 10))] for _ in range(4)],
                                  rng.randrange(4)) for _ in range(24)]
    batches = hellaswag.plan_batches(examples, 64, 4)
    model = small_model().eval()
    hellaswag.evaluate(model, examples, DEVICE, torch.float32, batch_size=4)  # kernels, allocators warmed up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        hellaswag.evaluate(model, examples, DEVICE, torch.float32, batch_size=4)
    copies = {event.key: event.count for event in profiler.key_averages() if event.key.startswith("Memcpy")}
    # One copy per batch, from pinned memory (asynchronous: the host does not wait for the batch before),
    # and one copy back of all the choices at the end, the only time the host waits.
    assert sum(count for key, count in copies.items() if key.startswith("Memcpy HtoD")) == len(batches), copies
    assert all("Pinned" in key for key in copies if key.startswith("Memcpy HtoD")), copies
    assert sum(count for key, count in copies.items() if key.startswith("Memcpy DtoH")) == 1, copies


def test_cached_and_uncached_greedy_generation_agree(exact_float32):
    model = small_model(vocab_size=256, block_size=32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # decisive argmaxes: no near-tie for float32's last bits to flip
    idx = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    # 60 new tokens on a context of 32: the context slides twice, and the cache starts over each time.
    cached = torch.stack(list(model.generate(idx, 60, temperature=0, use_cache=True)), dim=1)
    uncached = torch.stack(list(model.generate(idx, 60, temperature=0, use_cache=False)), dim=1)
    assert cached.shape == (3, 60) and cached.device.type == torch.device(DEVICE).type
    assert torch.equal(cached, uncached)
