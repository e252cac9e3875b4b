"""config/fast.py, the fast recipe, as a config file: its values in place of the constants', a config file after it
or a flag winning over them, a loaded model keeping its shape, and each lever it pulls (the AdamW groups' own rates,
the untied head, the zero-initialized projections) doing what it says."""
import json
import os

import pytest
import torch

import train_gpt2
from configurator import read_config_file
from conftest import ROOT, TINY
from train_gpt2 import SETTINGS, configure_optimizers, make_model

FAST = read_config_file(os.path.join(ROOT, "config", "fast.py"), SETTINGS)


@pytest.fixture
def fast_settings(monkeypatch):
    """The constants of train_gpt2 as config/fast.py and a tiny model set them, put back after the test."""
    def apply(**settings):
        for name, value in {**FAST, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 256,
                            **settings}.items():
            monkeypatch.setattr(train_gpt2, name, value)
        return make_model({}, None)
    return apply


def test_fast_model_and_optimizers(fast_settings):
    torch.manual_seed(0)
    tied = fast_settings(tie_head=True)  # the same matmuls: an untied embedding is a lookup, not FLOPs for MFU
    model = fast_settings()
    assert model.lm_head.weight is not model.transformer.wte.weight  # a head of its own
    assert model.num_params() > tied.num_params() and model.flops_per_token() == tied.flops_per_token()
    for block in model.transformer.h:  # each block starts as the identity on the residual stream
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    muon, adamw = configure_optimizers(model, "cpu")
    groups = {tuple(map(id, group["params"])): group for group in adamw.param_groups}
    embeddings = groups[id(model.transformer.wte.weight), id(model.transformer.wpe.weight)]
    head = groups[(id(model.lm_head.weight),)]  # the only matrix that Muon leaves to AdamW
    assert (embeddings["peak_lr"], head["peak_lr"]) == (FAST["embedding_lr"], FAST["max_lr"])
    assert embeddings["weight_decay"] == head["weight_decay"] == SETTINGS["weight_decay"]
    assert adamw.param_groups[-1]["peak_lr"] == FAST["max_lr"] and adamw.param_groups[-1]["weight_decay"] == 0
    assert all(p.dim() == 1 for p in adamw.param_groups[-1]["params"])  # biases and gains
    assert len(muon.param_groups[0]["params"]) == 4 * 2  # the blocks' four matrices


def test_a_file_after_the_recipe_and_a_flag_win_over_it(shard_dir, tmp_path, capsys):
    (tmp_path / "my.py").write_text("embedding_lr = 0.01\nmax_lr = 2e-3\n")
    out = tmp_path / "out"
    train_gpt2.main([os.path.join(ROOT, "config", "fast.py"), str(tmp_path / "my.py"), *TINY, "--max_lr=3e-3",
                     f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=2", "--eval_interval=2"])
    printed = capsys.readouterr().out
    settings = json.load(open(out / "run.json"))["settings"]
    assert (settings["max_lr"], settings["embedding_lr"]) == (3e-3, 0.01)  # the flag's and the later file's
    assert all(settings[name] == value for name, value in FAST.items() if name not in ("embedding_lr", "max_lr"))
    assert "  optimizer = 'muon'" in printed and "config/fast.py" in printed  # what the recipe set, and where from
    assert "  max_lr = 0.003" in printed and "# --max_lr" in printed


def test_a_loaded_model_keeps_its_tied_head_with_one_line(shard_dir, tmp_path, capsys):
    """Fine-tuning a GPT-2 (here a tied checkpoint) with config/fast.py: the recipe's training, the model's shape."""
    train_gpt2.main([*TINY, f"--data_dir={shard_dir}", f"--out_dir={tmp_path / 'a'}", "--max_steps=1"])
    checkpoint = tmp_path / "a" / "ckpt_0000001.pt"
    capsys.readouterr()
    train_gpt2.main([os.path.join(ROOT, "config", "fast.py"), *TINY, f"--data_dir={shard_dir}",
                     f"--out_dir={tmp_path / 'b'}", "--max_steps=1", f"--init_from={checkpoint}"])
    assert f"tie_head = False ({os.path.join(ROOT, 'config', 'fast.py')}) yields to the loaded model's True" in \
        capsys.readouterr().out
    saved = torch.load(tmp_path / "b" / "ckpt_0000001.pt", weights_only=True)
    assert saved["config"]["tie_head"] is True and saved["settings"]["optimizer"] == "muon"
    assert saved["settings"]["tie_head"] is True  # the settings say what the run did
    # Its embedding is its head: no rate of its own (embedding_lr is for an untied model), AdamW's at max_lr.
    assert [group["peak_lr"] for group in saved["optimizers"][1]["param_groups"]] == [FAST["max_lr"]] * 2
