"""sample.py: generation with the KV cache equals generation without it and transformers' greedy search;
the sampling filters do what they say; the command line streams samples and rejects bad input in one line."""

import dataclasses
import io
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: these tests never need the hub

from conftest import run_script  # noqa: E402
from sample import main  # noqa: E402
from train_gpt2 import choose_token  # noqa: E402
from train_gpt2 import GPT, GPTConfig, load_model  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def away_from_the_repository(tmp_path, monkeypatch):
    """Run in an empty directory: sample.py's default out_dir, log/, is then empty, whatever runs a developer
    keeps in the repository's own log/ (which sample.py would otherwise find and say so)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        # At initialization every context gives nearly the same logits and greedy search repeats one token;
        # larger weights make the next token depend on the context, so that a wrong cache shows.
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "ckpt_0000000.pt"
    torch.save({"format": 2, "model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0}, path)
    return str(path)


def greedy(model, prompt, n, **kwargs):
    """(B, n) greedy tokens from generate()."""
    return torch.stack(list(model.generate(prompt, n, temperature=0, **kwargs)), dim=1)


def prompt_tokens(length, seed=1, batch=1):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# The KV cache


def test_cached_greedy_equals_recomputing_the_whole_sequence_up_to_block_size(model):
    prompt = prompt_tokens(5)
    new = model.config.block_size + 1 - prompt.size(1)  # the last step sees a full block
    sequence = prompt
    with torch.no_grad():
        for _ in range(new):
            logits, _ = model(sequence)
            sequence = torch.cat([sequence, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    cached = greedy(model, prompt, new)
    assert torch.equal(cached, sequence[:, prompt.size(1):])
    assert len(set(cached[0].tolist())) > 10  # a model that repeats one token would prove nothing


def test_past_block_size_the_context_slides_and_cached_still_equals_uncached(model):
    prompt = prompt_tokens(5, batch=2)
    new = 3 * model.config.block_size  # slides several times
    assert torch.equal(greedy(model, prompt, new), greedy(model, prompt, new, use_cache=False))


def test_a_prompt_longer_than_block_size_is_cut_the_same_way(model):
    prompt = prompt_tokens(model.config.block_size + 10)
    assert torch.equal(greedy(model, prompt, 40), greedy(model, prompt, 40, use_cache=False))


def test_each_new_token_costs_one_position(model):
    fed = []
    hook = model.transformer.wte.register_forward_hook(lambda module, args, out: fed.append(args[0].size(1)))
    try:
        list(model.generate(prompt_tokens(10), 20, temperature=0))
        assert fed == [10] + [1] * 19
        fed.clear()
        block_size = model.config.block_size
        list(model.generate(prompt_tokens(10), block_size, temperature=0))
        # The context outgrows the block at the 56th token: one prefill of half a block, then one at a time.
        assert fed == [10] + [1] * (block_size - 10) + [block_size // 2] + [1] * 8
    finally:
        hook.remove()


def test_greedy_equals_transformers_generate(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # initializer_range 0.2 for the same reason as tiny_gpt's scaling: outputs that depend on the context.
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, vocab_size=50257,
                                    initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    ours.eval()
    hf.generation_config.eos_token_id = None  # generate every token, as ours does, even <|endoftext|>
    hf.generation_config.pad_token_id = 50256
    prompt = prompt_tokens(5)
    new = 64 + 1 - prompt.size(1)
    for penalty in (1.0, 1.3):
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                               do_sample=False, repetition_penalty=penalty)[:, prompt.size(1):]
        assert expected.size(1) == new
        assert len(set(expected[0].tolist())) > 10
        assert torch.equal(greedy(ours, prompt, new, repetition_penalty=penalty), expected)

# -----------------------------------------------------------------------------
# Sampling filters


def draws(logits, n=2000, **kwargs):
    generator = torch.Generator().manual_seed(0)
    rows = logits.expand(n, -1)
    return torch.bincount(choose_token(rows, generator=generator, **kwargs), minlength=logits.size(-1))


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    everything = draws(logits, temperature=1.0, top_k=None, top_p=None)
    assert (everything > 0).all()
    assert abs(everything[0].item() / 2000 - 0.4) < 0.05  # temperature 1 draws from the model's probabilities
    assert draws(logits, temperature=1.0, top_k=2, top_p=None)[2:].sum() == 0
    # top_p 0.5: 0.4 is not enough, 0.4 + 0.3 is: two tokens stay.
    top_p = draws(logits, temperature=1.0, top_k=None, top_p=0.5)
    assert top_p[2:].sum() == 0 and (top_p[:2] > 0).all()
    assert draws(logits, temperature=1.0, top_k=None, top_p=1e-9).tolist() == [2000, 0, 0, 0]


def test_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert draws(logits, temperature=0.3, top_k=None, top_p=None)[0] > draws(logits, temperature=1.0, top_k=None, top_p=None)[0]
    assert choose_token(torch.tensor([[0.1, 2.0, 0.5]]), temperature=0, top_k=None, top_p=None).tolist() == [1]


def test_samples_depend_on_the_seed_only(model):
    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack(list(model.generate(prompt_tokens(3), 20, top_k=50, top_p=0.9, generator=generator)))
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))

# -----------------------------------------------------------------------------
# The command line


def test_sample_prints_the_prompt_and_its_greedy_continuation(model, checkpoint, capsys):
    main([f"--init_from={checkpoint}", "--prompt=Hello, world", "--max_new_tokens=12", "--temperature=0",
          "--num_samples=2", "--device=cpu"])
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert samples[2] == "" and samples[0] == samples[1]
    assert samples[0].startswith("Hello, world") and len(samples[0]) > len("Hello, world\n")


def test_resume_and_prompt_file(checkpoint, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time", encoding="utf-8")
    main(["--init_from=resume", f"--out_dir={os.path.dirname(checkpoint)}", f"--prompt_file={prompt_file}",
          "--max_new_tokens=4", "--seed=7"])
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_interactive_reads_prompts_until_end_of_input(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("First prompt\n\nSecond prompt\n"))
    main([f"--init_from={checkpoint}", "--interactive", "--max_new_tokens=4"])
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2  # the blank line is skipped
    assert "> First prompt" in out and "> Second prompt" in out


def test_benchmark_reports_both_speeds(checkpoint, capsys):
    main([f"--init_from={checkpoint}", "--benchmark", "--max_new_tokens=32", "--device=cpu"])
    out = capsys.readouterr().out
    assert "with KV cache:" in out and "without KV cache:" in out
    assert "the two outputs are the same token for token" in out


def refused(args, capsys):
    """The message main() prints for bad input, after checking that it is one line and the exit status 2."""
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("args, message", [
    (["--init_from=missing.pt"], "error: checkpoint missing.pt does not exist\n"),  # not a list of choices
    (["--init_from=gpt3"], "--init_from=gpt3 is neither"),
    (["--init_from=scratch"], "--init_from=scratch would sample from random weights"),
    (["--top_p=0"], "--top_p=0.0: it takes a number above 0 and at most 1"),
    (["--top_p=1.5"], "--top_p=1.5: it takes a number above 0 and at most 1"),
    (["--temperature=-1"], "--temperature=-1.0: it takes 0 or more"),
    (["--temperature=hot"], "--temperature takes a number, not 'hot'"),
    (["--num_samples=0"], "--num_samples=0: it takes 1 or more"),
    (["--interactive=yes"], "--interactive takes True or False, not 'yes'"),
    (["--device=tpu"], "--device takes cuda, cuda:N, mps or cpu, not 'tpu'"),
    (["--dtype=fp8"], "--dtype=fp8: choose bfloat16, float16 or float32"),
    (["--prompt_file=missing.txt"], "cannot read --prompt_file=missing.txt: No such file or directory"),
    (["--tempreature=0"], "unknown setting --tempreature; did you mean --temperature?"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert message in refused(args, capsys)


def test_an_empty_prompt_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    assert "is empty; write a prompt in it" in refused([f"--prompt_file={tmp_path / 'empty.txt'}"], capsys)


def test_a_corrupted_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "ckpt.pt is not a checkpoint (not a file that torch.save wrote)" in refused([f"--init_from={tmp_path / 'ckpt.pt'}"], capsys)


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert "no checkpoint (ckpt_*.pt) in" in refused(["--init_from=resume", f"--out_dir={tmp_path}"], capsys)


def test_the_script_prints_no_traceback():
    result = run_script("sample.py", "--top_p=2")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: --top_p=2.0: it takes a number above 0 and at most 1\n"
