"""What a reading of the CUDA path found, checked where a CPU reaches it: MFU per device under several
processes, --batch_size=auto and out-of-memory errors, checkpoints mapped rather than read."""
import re
import signal
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, run_script
import checkpoints
import train_gpt2
from train_gpt2 import GPT, GPTConfig


def test_mfu_is_per_device(monkeypatch):
    # GPT-2 124M's 524,288 tokens a step in 0.1 s on 8 H100s: 655k tokens/s per GPU, ~49% MFU, not 8 x that.
    model = GPT(GPTConfig())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    system = SimpleNamespace(device="cuda:0", device_type="cuda", world_size=8)
    mfu = train_gpt2.estimate_mfu(model, 5_242_880, system)
    assert mfu == pytest.approx(100 * model.flops_per_token() * 655_360 / 989e12)
    assert train_gpt2.estimate_mfu(model, 5_242_880, SimpleNamespace(**{**vars(system), "world_size": 1})) == \
        pytest.approx(8 * mfu)
    assert train_gpt2.estimate_mfu(model, 5_242_880, SimpleNamespace(device="cpu", device_type="cpu", world_size=8)) \
        is None


def test_peak_flops_setting_gives_an_mfu_on_any_device(tmp_path):
    result = run_script("train_gpt2.py", *TINY, "--benchmark", "--peak_flops=1e9", "--device=cpu")
    assert result.returncode == 0, result.stderr
    line = [line for line in result.stdout.splitlines() if "ms/step" in line][-1]
    ms, tokens, per_process, mfu = re.match(
        r"benchmark: ([\d.]+) ms/step \| ([\d,]+) tok/s \| ([\d,]+) tok/s per process \| mfu ([\d.]+)% per process", line).groups()
    flops_per_token = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)).flops_per_token()
    assert tokens == per_process  # one process
    # The printed MFU is the printed speed's FLOPs over the given peak, to the rounding of the figures.
    assert float(mfu) == pytest.approx(100 * flops_per_token * 256 / (float(ms) / 1000) / 1e9, rel=0.02, abs=0.06)


def test_the_micro_batches_that_keep_the_total_are_the_powers_of_two_that_divide_it(monkeypatch):
    monkeypatch.setattr(train_gpt2, "block_size", 1024)
    monkeypatch.setattr(train_gpt2, "total_batch_size", 524288)
    assert train_gpt2.micro_batches(1) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert train_gpt2.micro_batches(8) == [64, 32, 16, 8, 4, 2, 1]
    monkeypatch.setattr(train_gpt2, "total_batch_size", 3 * 1024 * 4)  # 12 sequences: 4, 2 and 1 divide it; 8 not
    assert train_gpt2.micro_batches(1) == [4, 2, 1]
    monkeypatch.setattr(train_gpt2, "total_batch_size", 1000)  # not whole sequences
    assert train_gpt2.micro_batches(1) == []


def test_batch_size_auto_on_a_cpu_takes_the_configured_default(shard_dir, tmp_path):
    result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--max_steps=1",
                        "--batch_size=auto")
    assert result.returncode == 0, result.stderr
    # The default, 64 sequences, is more than TINY's 256-token step holds (8 of 32): 8, in one micro-step.
    assert "auto batch_size: 8 (the default 64 or the largest below it that keeps total_batch_size" in result.stdout
    assert "1 processes x 1 micro-steps x 8 x 32 tokens = 256 tokens per step" in result.stdout
    help_text = run_script("train_gpt2.py", "--help").stdout
    assert "auto: the largest that fits (on CUDA)" in help_text


def test_batch_size_auto_with_a_config_file_takes_the_largest_micro_batch_up_to_the_default(input_txt, tmp_path):
    result = run_script("train_gpt2.py", "config/shakespeare.py", "--batch_size=auto", "--benchmark", "--device=cpu",
                        "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--total_batch_size=256")
    assert result.returncode == 0, result.stderr
    assert "auto batch_size: 8 (the default 64 or" in result.stdout


def test_out_of_memory_in_a_run_is_one_line_with_a_micro_batch_that_fits_the_total(shard_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.15 GiB")
    monkeypatch.setattr(train_gpt2.GPT, "forward", out_of_memory)
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path}", "--batch_size=4",
                         "--total_batch_size=512"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "out of memory on cpu with micro-batch 4 x 32 tokens; try --batch_size=2 or --batch_size=auto" in err
    assert "(gradient accumulation keeps total_batch_size=512)" in err


def test_a_checkpoint_is_mapped_from_its_file_not_read_whole(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256))
    path = tmp_path / "ckpt_0000001.pt"
    torch.save({"format": 2, "model": model.state_dict(), "config": asdict(model.config), "step": 1}, path)
    checkpoint = checkpoints.load_checkpoint(str(path))
    weight = checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(weight, model.transformer.h[0].mlp.c_fc.weight.detach())
    # The file is mapped into this process: its bytes stay in the page cache, which every process shares.
    assert str(path) in open("/proc/self/maps").read()



@pytest.mark.parametrize("name, flops", [("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12),
                                         ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                         ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_the_peak_flops_of_a_gpu_come_from_its_most_specific_name(name, flops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=256))
    system = SimpleNamespace(device="cuda:0", device_type="cuda", world_size=1)
    assert train_gpt2.estimate_mfu(model, 1e9, system) == pytest.approx(100 * model.flops_per_token() * 1e9 / flops)


def test_the_logits_come_out_whole_not_as_a_slice_of_the_padded_head():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=250))  # padded to 256
    logits, loss = model(torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16)))
    # A slice of (2, 16, 256) would keep the padded columns' memory and be copied whole for the cross-entropy.
    assert logits.shape == (2, 16, 250) and logits.is_contiguous()
    assert logits.untyped_storage().nbytes() == 2 * 16 * 250 * 4
    padded = model.lm_head(model.hidden_states(torch.zeros(1, 1, dtype=torch.long)))  # the same numbers as before
    assert torch.allclose(model.logits(model.hidden_states(torch.zeros(1, 1, dtype=torch.long))), padded[..., :250])


def test_under_torchrun_the_stop_flag_is_read_every_few_seconds_not_at_every_micro_step(monkeypatch):
    stops = train_gpt2.StopSignals(2, "cpu")
    reads = []
    # Two processes whose mean micro-step took 0.5 s: the flag is read every 10 micro-steps (5 s), the first never.
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: reads.append(1) or tensor.mul_(2))
    stop, loss = stops.read(torch.tensor(3.0), 0.5)
    assert (stop, loss, stops.every) == (False, 3.0, 10)
    reads.clear()
    assert not any(stops.poll(i) for i in range(40)) and len(reads) == 3  # at 10, 20 and 30
    one = train_gpt2.StopSignals(1, "cpu")
    assert not one.poll(0) and not one.poll(1)  # one process: a look at a Python flag, every micro-step
    one.request(signal.SIGTERM, None)
    assert not one.poll(0) and one.poll(1) and one.read()[0]
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def test_the_process_group_waits_an_hour_for_a_checkpoint_not_nccls_ten_minutes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    train_gpt2.setup_system("cpu")
    assert calls[0]["timeout"].total_seconds() == 3600


def test_each_micro_batch_try_starts_from_fresh_optimizer_state(monkeypatch):
    """A try that ran out of memory inside the optimizer's step leaves half-made state: the next try must not see it."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=256))
    monkeypatch.setattr(train_gpt2, "block_size", 16)
    monkeypatch.setattr(train_gpt2, "total_batch_size", 64)
    system = train_gpt2.setup_system("cpu", "float32")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    made = []
    real = train_gpt2.configure_optimizers
    monkeypatch.setattr(train_gpt2, "configure_optimizers", lambda *args: made.append(real(*args)) or made[-1])
    for batch in (4, 2):
        step = train_gpt2.random_token_steps(model, model, None, system, batch, 1, moves=False)
        step(), step()
    assert len(made) == 2 and made[0] is not made[1]
    assert all(len(o.state) > 0 for o in made[1])  # AdamW's moments made by the first step, held by the second
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # rate 0: the weights stay
