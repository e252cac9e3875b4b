"""--recipe=fast: the recipe's values in place of the constants', a given setting winning over them, and each lever
it pulls (the stable-then-decay schedule, the AdamW groups' own rates, the untied head, the zero-initialized
projections, Muon's momentum warm-up) doing what it says."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import train_gpt2
from conftest import TINY
from train_gpt2 import FAST, SETTINGS, configure_optimizers, get_lr, make_model


def test_the_stable_then_decay_schedule():
    args = dict(warmup_steps=10, max_steps=100, max_lr=1e-2, min_lr=0.0, warmdown=0.4)
    assert get_lr(0, **args) == pytest.approx(1e-3) and get_lr(9, **args) == pytest.approx(1e-2)
    assert get_lr(10, **args) == get_lr(60, **args) == pytest.approx(1e-2)  # stable until the last 40 steps
    assert get_lr(80, **args) == pytest.approx(5e-3) and get_lr(99, **args) == pytest.approx(2.5e-4)
    assert get_lr(100, **args) == 0.0  # straight to zero
    assert get_lr(55, **{**args, "warmdown": 1.0}) == pytest.approx(4.5e-3)  # warmdown 1: a line from step 0


def fast_model(**settings):
    cfg = SimpleNamespace(**{**SETTINGS, **FAST, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
                             "vocab_size": 256, **settings})
    return make_model(cfg, {}, None), cfg


def test_fast_model_and_optimizers():
    torch.manual_seed(0)
    model, cfg = fast_model()
    assert model.lm_head.weight is not model.transformer.wte.weight  # a head of its own
    tied, _ = fast_model(tie_head=True)  # the same matmuls: an untied embedding is a lookup, not FLOPs for MFU
    assert model.num_params() > tied.num_params() and model.flops_per_token() == tied.flops_per_token()
    for block in model.transformer.h:  # each block starts as the identity on the residual stream
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    muon, adamw = configure_optimizers(model, cfg, "cpu")
    groups = {tuple(map(id, group["params"])): group for group in adamw.param_groups}
    embeddings = groups[id(model.transformer.wte.weight), id(model.transformer.wpe.weight)]
    head = groups[(id(model.lm_head.weight),)]  # the only matrix that Muon leaves to AdamW
    assert (embeddings["peak_lr"], head["peak_lr"]) == (FAST["embedding_lr"], FAST["max_lr"])
    assert embeddings["weight_decay"] == head["weight_decay"] == SETTINGS["weight_decay"]
    assert adamw.param_groups[-1]["peak_lr"] == FAST["max_lr"] and adamw.param_groups[-1]["weight_decay"] == 0
    assert all(p.dim() == 1 for p in adamw.param_groups[-1]["params"])  # biases and gains
    assert len(muon.param_groups[0]["params"]) == 4 * 2  # the blocks' four matrices


def test_a_setting_given_wins_over_the_recipe(shard_dir, tmp_path, capsys):
    (tmp_path / "my.py").write_text("embedding_lr = 0.01\n")
    out = tmp_path / "out"
    train_gpt2.main([str(tmp_path / "my.py"), *TINY, "--recipe=fast", "--schedule=wsd", "--warmdown=0.3",
                     f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=2", "--eval_interval=2"])
    printed = capsys.readouterr().out
    settings = json.load(open(out / "run.json"))["settings"]
    assert (settings["warmdown"], settings["embedding_lr"]) == (0.3, 0.01)  # the flag's and the config file's
    assert all(settings[name] == value for name, value in FAST.items() if name != "embedding_lr")
    assert "  optimizer = 'muon'" in printed and "# --recipe=fast" in printed  # what the recipe set, said
    assert "  warmdown = 0.3" in printed and "# --warmdown" in printed


def test_a_loaded_model_keeps_its_tied_head(shard_dir, tmp_path):
    """Fine-tuning a GPT-2 (here a tied checkpoint) with --recipe=fast: the recipe's training, the model's shape."""
    train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'a'}", "--max_steps=1"])
    checkpoint = tmp_path / "a" / "ckpt_0000001.pt"
    train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'b'}", "--max_steps=1",
                     f"--init_from={checkpoint}", "--recipe=fast"])
    saved = torch.load(tmp_path / "b" / "ckpt_0000001.pt", weights_only=True)
    assert saved["config"]["tie_head"] is True and saved["settings"]["optimizer"] == "muon"
    # Its embedding is its head: no rate of its own (embedding_lr is for an untied model), AdamW's at max_lr.
    assert [group["peak_lr"] for group in saved["optimizers"][1]["param_groups"]] == [FAST["max_lr"]] * 2


@pytest.mark.parametrize("flag, message", [
    ("--recipe=slow", "error: --recipe takes gpt2 or fast, not 'slow'"),
    ("--schedule=linear", "error: --schedule takes cosine or wsd, not 'linear'"),
    ("--warmdown=0", "error: --warmdown=0.0: it takes a number above 0 and at most 1"),
    ("--embedding_lr=-1", "error: --embedding_lr=-1.0: it takes 0 or more"),
])
def test_bad_recipe_settings(shard_dir, tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'out'}", flag])
    assert exit.value.code == 2 and capsys.readouterr().err == message + "\n"
    assert not os.path.exists(tmp_path / "out")
