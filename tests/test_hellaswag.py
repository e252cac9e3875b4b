"""
hellaswag.py, specified by its results: the batched, distributed evaluator scores every ending as
build-nanogpt's one-example-at-a-time loop does with transformers' GPT-2, whatever the batch size,
the padding or the number of processes; bad input gets one line and a non-zero exit.

Offline: the tests write a tiny random GPT-2 and a small file in HellaSwag's format with invented sentences.
"""

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: these tests never need the hub

import common  # noqa: E402
import hellaswag  # noqa: E402
from common import UserError  # noqa: E402
from conftest import ROOT, run_script  # noqa: E402
from train_gpt2 import GPT, get_tokenizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

WORDS = ("the a man woman dog child team cook player kite ladder river garden kitchen ball bike rope paint "
         "walks runs jumps holds throws climbs paints cuts pours smiles waves lifts turns opens closes "
         "slowly quickly again then while near under over beside into onto with after before").split()
NUM_EXAMPLES = 25
BLOCK_SIZE = 64


def invented_sentence(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def invented_record(rng, index):
    """One record in HellaSwag's format, with its fields, made of random words."""
    ctx_a, ctx_b = invented_sentence(rng, rng.randint(5, 7)), invented_sentence(rng, rng.randint(2, 3))
    return {"ind": index, "activity_label": "Invented", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "endings": [invented_sentence(rng, rng.randint(1, 12)) for _ in range(4)], "label": rng.randrange(4),
            "source_id": f"invented~{index}", "split": "val", "split_type": "indomain"}


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    rng = random.Random(0)
    return [invented_record(rng, i) for i in range(NUM_EXAMPLES)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, records):
    return write_jsonl(tmp_path_factory.mktemp("data") / "hellaswag_val.jsonl", records)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model"))
    config = GPT2Config(n_positions=BLOCK_SIZE, n_embd=64, n_layer=2, n_head=4, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def examples(data_file):
    return hellaswag.load_examples(get_tokenizer(), data_file)


@pytest.fixture(scope="module")
def reference(model_dir, records):
    """build-nanogpt's evaluation with transformers' GPT-2, one example at a time:
    (total loss, mean loss) of every ending, each (examples, 4)."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    enc = get_tokenizer()
    totals, means = [], []
    for record in records:
        context = enc.encode(record["ctx"])
        rows = [context + enc.encode(" " + ending) for ending in record["endings"]]
        assert max(map(len, rows)) <= BLOCK_SIZE, "the reference cannot score rows longer than the model's context"
        tokens = torch.zeros(4, max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros(4, tokens.size(1))
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(context):len(row)] = 1
        with torch.no_grad():
            logits = hf(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        total = (losses * mask[:, 1:]).sum(dim=1)
        totals.append(total)
        means.append(total / mask[:, 1:].sum(dim=1))
    return torch.stack(totals), torch.stack(means)


def accuracies(total, mean, labels):
    labels = torch.tensor(labels)
    return ((total.argmin(dim=1) == labels).sum().item() / len(labels),
            (mean.argmin(dim=1) == labels).sum().item() / len(labels))


def assert_same_losses(scores, expected):
    """Per-token (mean) losses to 1e-5; totals, sums of up to ~15 losses near 11, to 1e-5 of their value."""
    torch.testing.assert_close(scores[0], expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(scores[1], expected[1], rtol=0, atol=1e-5)


def run_main(capsys, *argv):
    """hellaswag.main(argv) in this process: (exit status, stdout lines, stderr)."""
    try:
        hellaswag.main(list(argv))
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out.splitlines(), err

# -----------------------------------------------------------------------------
# The same scores as transformers' GPT-2, one example at a time


def score_all(model, examples, batch_size):
    """score_batch over the batches plan_batches makes: total and mean losses, (examples, 4), in order."""
    total, mean = torch.empty(len(examples), 4), torch.empty(len(examples), 4)
    for batch in hellaswag.plan_batches(examples, BLOCK_SIZE, batch_size):
        total[batch], mean[batch] = hellaswag.score_batch(model, [examples[i] for i in batch], "cpu", torch.float32)
    return total, mean


def test_scores_match_transformers_one_example_at_a_time(model, examples, records, reference):
    total, mean = score_all(model, examples, NUM_EXAMPLES)
    assert_same_losses((total, mean), reference)
    assert torch.equal(total.argmin(dim=1), reference[0].argmin(dim=1))
    assert torch.equal(mean.argmin(dim=1), reference[1].argmin(dim=1))

    acc, acc_norm, count = hellaswag.evaluate(model, examples, "cpu", torch.float32)
    assert (acc, acc_norm) == accuracies(*reference, [record["label"] for record in records])
    assert count == NUM_EXAMPLES


def test_the_one_at_a_time_baseline_agrees(model, examples, records, reference):
    acc, acc_norm, count = hellaswag.evaluate_one_at_a_time(model, examples, "cpu", torch.float32)
    assert (acc, acc_norm, count) == (*accuracies(*reference, [r["label"] for r in records]), NUM_EXAMPLES)


@pytest.mark.parametrize("batch_size", [2, 7])
def test_batch_size_changes_no_score(model, examples, records, reference, batch_size):
    one_at_a_time, batched = score_all(model, examples, 1), score_all(model, examples, batch_size)
    assert_same_losses(batched, one_at_a_time)
    assert torch.equal(batched[0].argmin(dim=1), one_at_a_time[0].argmin(dim=1))
    assert torch.equal(batched[1].argmin(dim=1), one_at_a_time[1].argmin(dim=1))
    acc, acc_norm, _ = hellaswag.evaluate(model, examples, "cpu", torch.float32, batch_size=batch_size)
    assert (acc, acc_norm) == accuracies(*reference, [record["label"] for record in records])


def test_padding_changes_no_score(model):
    # One context length, endings of 1 to 40 tokens: in a batch together, the short ones are padded far.
    rng = random.Random(1)
    examples = [hellaswag.Example([rng.randrange(50257) for _ in range(12)],
                                  [[rng.randrange(50257) for _ in range(rng.randint(1, 40))] for _ in range(4)], 0)
                for _ in range(6)]
    alone = [hellaswag.score_batch(model, [example], "cpu", torch.float32) for example in examples]
    assert_same_losses(hellaswag.score_batch(model, examples, "cpu", torch.float32),
                       [torch.cat(scores) for scores in zip(*alone)])


def test_a_batch_goes_to_the_device_as_views_of_one_buffer():
    contexts, inputs, lengths = [[5, 6, 7], [8, 9, 10]], np.arange(12).reshape(4, 3), [3, 1, 2, 3]
    on_device = common.to_device([contexts, inputs, lengths], "cpu")
    assert [t.tolist() for t in on_device] == [contexts, inputs.tolist(), lengths]
    assert all(t.dtype == torch.int64 for t in on_device)
    # One buffer, so one copy on CUDA (tests/test_cuda.py counts the copies there).
    assert len({t.untyped_storage().data_ptr() for t in on_device}) == 1


def test_a_long_example_loses_its_oldest_context_tokens(model):
    context = list(range(1000, 1100))  # 100 tokens; the model's window is 64
    endings = [[7, 8, 9], list(range(2000, 2030)), [11], list(range(3000, 3010))]
    # All four endings follow the same context: the one that leaves room for the longest.
    cut = hellaswag.Example(context[-(BLOCK_SIZE - 30):], endings, 0)
    assert hellaswag.fit(hellaswag.Example(context, endings, 0), BLOCK_SIZE) == cut
    assert_same_losses(hellaswag.score_batch(model, [hellaswag.Example(context, endings, 0)], "cpu", torch.float32),
                       hellaswag.score_batch(model, [cut], "cpu", torch.float32))
    # An ending longer than the window keeps its last 63 tokens, after one token of context.
    endings[3] = list(range(3000, 3000 + BLOCK_SIZE + 5))
    assert (hellaswag.fit(hellaswag.Example(context, endings, 0), BLOCK_SIZE)
            == hellaswag.Example(context[-1:], endings[:3] + [endings[3][-(BLOCK_SIZE - 1):]], 0))

# -----------------------------------------------------------------------------
# On its own, in one process and in two


def test_command_line_prints_the_counts_last(capsys, model_dir, data_file, records, reference):
    status, out, err = run_main(capsys, "--model", model_dir, "--data", data_file, "--device", "cpu",
                                "--batch_size", "4", "--benchmark", "--baseline_examples", "10")
    assert status == 0, err
    acc, acc_norm = accuracies(*reference, [record["label"] for record in records])
    assert out[-1] == f"acc {acc:.4f} acc_norm {acc_norm:.4f} n {NUM_EXAMPLES}"
    assert re.fullmatch(rf"{NUM_EXAMPLES} examples in [\d.]+ s, batch_size 4", out[-2])
    # The batched evaluator is timed on every example, the slow baseline on the first few only.
    assert re.fullmatch(rf"benchmark: batched [\d.]+ examples/s \(all {NUM_EXAMPLES}\), one at a time [\d.]+ examples/s "
                        r"\(the first 10\), [\d.]+x", out[-3])


def test_limit_and_a_checkpoint_of_ours(capsys, tmp_path, model, data_file, examples):
    path = str(tmp_path / "ckpt_0000000.pt")
    torch.save({"format": 2, "model": model.state_dict(), "config": asdict(model.config), "step": 0}, path)
    status, out, err = run_main(capsys, "--model", path, "--data", data_file, "--device", "cpu", "--limit", "10")
    assert status == 0, err
    acc, acc_norm, _ = hellaswag.evaluate(model, examples[:10], "cpu", torch.float32)
    assert out[-1] == f"acc {acc:.4f} acc_norm {acc_norm:.4f} n 10"


def test_two_processes_count_like_one(capsys, model_dir, data_file, examples):
    assert len(hellaswag.plan_batches(examples, BLOCK_SIZE, 4)) % 2 == 1  # so the two shares differ
    argv = ["--model", model_dir, "--data", data_file, "--device", "cpu", "--batch_size", "4"]
    status, one, err = run_main(capsys, *argv)
    assert status == 0, err
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "hellaswag.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    assert two.stdout.splitlines()[-1] == one[-1]

# -----------------------------------------------------------------------------
# Data: download into the cache, and every record checked


def test_download_writes_the_cache_whole(monkeypatch, tmp_path, records):
    served = write_jsonl(tmp_path / "hellaswag_val.jsonl", records)
    monkeypatch.setattr(hellaswag, "DATA_URL", (tmp_path.as_uri() + "/"))
    monkeypatch.setenv(hellaswag.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(hellaswag.SPLIT_SIZES, "val", NUM_EXAMPLES + 1)
    with pytest.raises(UserError, match=rf"has {NUM_EXAMPLES} lines, not the {NUM_EXAMPLES + 1}"):
        hellaswag.download("val")
    assert os.listdir(tmp_path / "cache") == []  # nothing half-written left behind

    monkeypatch.setitem(hellaswag.SPLIT_SIZES, "val", NUM_EXAMPLES)
    examples = hellaswag.load_examples(get_tokenizer(), "")
    cached = tmp_path / "cache" / "hellaswag_val.jsonl"
    assert os.listdir(tmp_path / "cache") == ["hellaswag_val.jsonl"]
    assert cached.read_text() == open(served).read() and len(examples) == NUM_EXAMPLES


def test_offline_without_data_says_where_to_get_it(capsys, monkeypatch, tmp_path, model_dir):
    monkeypatch.setattr(hellaswag, "DATA_URL", "http://127.0.0.1:9/")  # the discard port: nothing listens
    monkeypatch.setenv(hellaswag.CACHE_DIR_ENV, str(tmp_path))
    status, out, err = run_main(capsys, "--model", model_dir, "--device", "cpu")
    assert status == 2 and out == []
    assert err.count("\n") == 1 and "http://127.0.0.1:9/hellaswag_val.jsonl" in err and "--data" in err


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    ('["A man sits.", "a", "b", "c", "d"]', "a HellaSwag record is a JSON object"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c"], "label": 1}', "3 endings; a HellaSwag record has 4"),
    ('{"ctx": "A man sits.", "endings": "a b c d", "label": 1}', "'endings' must be a list of 4 strings"),
    ('{"ctx_a": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 1}', "no context"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be 0, 1, 2 or 3, found 4"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": ""}', "found ''"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"]}', "test split is unlabelled"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path, records, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        hellaswag.load_examples(get_tokenizer(), str(path))


def test_bad_input_is_one_line_and_a_non_zero_exit(capsys, tmp_path, model_dir, data_file):
    status, _, err = run_main(capsys, "--model", model_dir, "--data", str(tmp_path / "nowhere.jsonl"))
    assert status == 2 and err.count("\n") == 1 and "nowhere.jsonl does not exist" in err
    status, _, err = run_main(capsys, "--model", str(tmp_path / "nothing"), "--data", data_file, "--device", "cpu")
    assert status == 2 and err.count("\n") == 1 and "nothing is neither a checkpoint" in err
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not a model")
    status, _, err = run_main(capsys, "--model", str(not_a_model), "--data", data_file, "--device", "cpu")
    assert status == 2 and err.count("\n") == 1 and "notes.txt is not a checkpoint (not a file that torch.save wrote)" in err and "delete" not in err

    # The same from a shell: one line on stderr, exit status 2, no traceback.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "A man sits.", "endings": ["a", "b"], "label": 0}\n')
    result = run_script("hellaswag.py", "--model", model_dir, "--data", bad, "--device", "cpu")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {bad}:1: 2 endings; a HellaSwag record has 4\n"


@pytest.mark.parametrize("flag, message", [("--limit=-1", "--limit=-1: it takes 0 or more"),
                                           ("--batch_size=0", "--batch_size=0: it takes 1 or more")])
def test_a_number_out_of_range_is_one_line(capsys, flag, message):
    status, out, err = run_main(capsys, flag)
    assert status == 2 and err == f"error: {message}\n"
