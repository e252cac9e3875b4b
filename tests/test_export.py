"""Export to Hugging Face: save_hf writes a directory that transformers loads offline (model, tokenizer,
pipeline) with our logits, and that GPT.from_pretrained reads back to the same weights."""

import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing here may need the hub

import train_gpt2  # noqa: E402
from conftest import run_script  # noqa: E402
from huggingface import hf_state_dict, save_hf  # noqa: E402
from common import gpt2_bpe_files  # noqa: E402
from train_gpt2 import GPT, GPTConfig, UserError, get_tokenizer  # noqa: E402

TEXTS = ["Hello, I'm a language model,", " naïve café 東京 🤗\n\n  tabs\tand  spaces", "x<|endoftext|>y", "'s 're 123456"]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    """GPT-2's tied head, and the head of its own that --recipe=fast trains (--tie_head=False)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, tie_head=request.param)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # every weight, biases and LayerNorms included, away from its init
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf"))
    save_hf(model, directory)
    return directory


def test_the_directory_holds_config_weights_and_tokenizer(model, exported):
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["vocab_size"], config["n_positions"], config["n_layer"], config["n_embd"]) == (50257, 64, 2, 64)
    assert config["tie_word_embeddings"] is model.config.tie_head
    weights = load_file(os.path.join(exported, "model.safetensors"))
    if model.config.tie_head:
        assert "lm_head.weight" not in weights  # tied: transformers takes it from wte
    else:  # its own, at the real vocabulary's rows
        assert torch.equal(weights["lm_head.weight"], model.lm_head.weight[:50257])
    assert weights["transformer.wte.weight"].shape == (50257, 64)  # padded to 50,304 in our model
    ours = model.state_dict()
    assert torch.equal(weights["transformer.h.0.attn.c_attn.weight"], ours["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(weights["transformer.h.1.mlp.c_proj.weight"], ours["transformer.h.1.mlp.c_proj.weight"].t())
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with open(gpt2_bpe_files()[name], "rb") as source, open(os.path.join(exported, hf_name), "rb") as copy:
            assert copy.read() == source.read()
    assert os.path.isfile(os.path.join(exported, "tokenizer_config.json"))


def test_every_exported_file_has_the_usual_mode_of_new_files(exported):
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(os.path.join(exported, name)).st_mode & 0o777 for name in os.listdir(exported)}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone wrote 0600


def test_round_trip_gives_identical_weights(model, exported):
    loaded = GPT.from_pretrained(exported)
    assert loaded.config == model.config
    ours, theirs = hf_state_dict(model), hf_state_dict(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_transformers_loads_the_model_with_our_logits(model, exported):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) is model.config.tie_head
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits
        ours, _ = model(idx)
    assert theirs.shape == ours.shape == (2, 64, 50257)
    assert (theirs - ours).abs().max() < 1e-4


def test_transformers_tokenizer_encodes_as_ours(exported):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(exported)
    enc = get_tokenizer()
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == enc.eot_token == 50256


def test_pipeline_generates_our_greedy_tokens(model, exported):
    from transformers import pipeline
    generator = pipeline("text-generation", model=exported)
    prompt = "Hello, I'm a language model,"
    text = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    idx = torch.tensor([get_tokenizer().encode(prompt)])
    tokens = torch.cat(list(model.generate(idx, 8, temperature=0))).tolist()
    assert text == get_tokenizer().decode(tokens)


def test_exporting_onto_a_file_is_refused(model, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="it is a file; name a directory"):
        save_hf(model, str(tmp_path / "file"))


@pytest.mark.skipif(not hasattr(train_gpt2, "main"), reason="train_gpt2.py has no main() yet")
def test_train_gpt2_exports_a_checkpoint(model, tmp_path):
    checkpoint = tmp_path / "ckpt_0000000.pt"
    torch.save({"format": 2, "model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0}, checkpoint)
    result = run_script("train_gpt2.py", f"--init_from={checkpoint}", f"--export_hf={tmp_path / 'hf'}", "--device=cpu")
    assert result.returncode == 0, result.stderr
    loaded = GPT.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(a, b) for a, b in zip(hf_state_dict(model).values(), hf_state_dict(loaded).values()))


def changed_model(change):
    """A small model changed as a researcher would change it: its MLPs' activation, or their width."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    for block in model.transformer.h:
        if change == "relu":
            block.mlp.gelu = torch.nn.ReLU()
        elif change == "2x wide":
            block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        elif change == "tanh":
            block.mlp.gelu = torch.nn.Tanh()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("change, activation, width", [("relu", "relu", 128), ("2x wide", "gelu_new", 64)])
def test_a_changed_mlp_exports_with_transformers_words_for_it_and_equal_logits(change, activation, width, tmp_path):
    from transformers import AutoModelForCausalLM
    model = changed_model(change)
    save_hf(model, str(tmp_path / "hf"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["activation_function"], config["n_inner"]) == (activation, width)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-4


def test_a_change_transformers_cannot_say_is_one_line_and_no_directory(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="activation is none that transformers' GPT-2 names"):
        save_hf(changed_model("tanh"), str(tmp_path / "tanh"))
    assert not os.path.exists(tmp_path / "tanh")
    # A change inside forward shows in no module: the logits check finds it, through the command line too.
    checkpoint = tmp_path / "ckpt_0000000.pt"
    model = changed_model("none")
    torch.save({"format": 2, "model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0},
               checkpoint)
    monkeypatch.setattr(train_gpt2.MLP, "forward", lambda self, x: 2 * self.c_proj(self.gelu(self.c_fc(x))))
    with pytest.raises(SystemExit) as exit:
        train_gpt2.main([f"--init_from={checkpoint}", f"--export_hf={tmp_path / 'hf'}", "--device=cpu"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and not os.path.exists(tmp_path / "hf")
    assert err.startswith("error: cannot export this model to Hugging Face: transformers computes other logits")


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_no_file(model, tmpfs, capsys):
    disk = tmpfs("disk", size="256k")  # the tokenizer's files alone take more
    (disk / "mine.txt").write_text("a file of the user's, in the directory exported into")
    with pytest.raises(UserError, match="cannot export this model to Hugging Face: "):
        save_hf(model, str(disk))
    assert os.listdir(disk) == ["mine.txt"]  # the user's file stays, and nothing of the export
