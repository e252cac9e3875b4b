"""
HellaSwag: which of four endings follows a context? The benchmark that compares a model in training
with GPT-2 and GPT-3.

    python hellaswag.py --model gpt2                      # OpenAI's GPT-2 124M: acc 0.2859 acc_norm 0.2955
    python hellaswag.py --model log/ckpt_0019073.pt       # a checkpoint of train_gpt2.py
    python hellaswag.py --model DIR --data hellaswag_val.jsonl --benchmark   # examples/s against build-nanogpt's loop
    torchrun --standalone --nproc_per_node=8 hellaswag.py --model gpt2-xl

The method is build-nanogpt's, so the figures compare with its published ones: each ending is scored
by the cross-entropy of its own tokens (" " + ending) after the context; acc counts the examples whose
lowest total loss is the right ending, acc_norm those whose lowest loss per token is.
train_gpt2.py calls load_for_training() once and evaluate() at every evaluation, with its own model and
tokenizer: this module needs nothing from it but for its command line, which loads a model.
"""

import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from common import UserError, get_tokenizer, run_main
from configurator import check_ranges, parse_command_line, settings_of

# -----------------------------------------------------------------------------
# Settings of the command line (python hellaswag.py --help)

model = "gpt2"                   # gpt2[-medium|-large|-xl], a Hugging Face directory, or a checkpoint of train_gpt2.py
data = ""                        # a local hellaswag_{split}.jsonl; empty: download into the cache
split = "val"                    # the split to download: val, train (the test split has no labels)
device = ""                      # cuda, cuda:N, mps or cpu; empty: the best available
dtype = ""                       # bfloat16, float16 or float32 (autocast); empty: what training would pick
limit = 0                        # evaluate the first N examples only (0: all)
batch_size = 32                  # examples per forward pass (4 rows each)
benchmark = False                # also time build-nanogpt's one-example-at-a-time loop and print examples/s of both
baseline_examples = 400          # with --benchmark: the one-at-a-time loop times the first N examples only (0: all)

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"  # + hellaswag_{split}.jsonl
SPLIT_SIZES = {"train": 39905, "val": 10042, "test": 10003}  # lines per file, to check a download
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")  # downloads go here...
CACHE_DIR_ENV = "HELLASWAG_DIR"  # ...or into the directory this environment variable names
NUM_ENDINGS = 4
CPU_LOSS_ROWS = 32  # scored tokens per cross-entropy call on a CPU: about 6 MB of logits, in cache



# -----------------------------------------------------------------------------
# Data


def download(split):
    """The path of hellaswag_{split}.jsonl in the cache, downloaded first if it is not there."""
    directory = os.environ.get(CACHE_DIR_ENV) or CACHE_DIR
    path = os.path.join(directory, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    url = f"{DATA_URL}hellaswag_{split}.jsonl"
    os.makedirs(directory, exist_ok=True)
    try:
        common.download(url, path)
    except UserError as e:
        raise UserError(f"{e}; without internet, fetch that file elsewhere and pass its path as --data "
                        f"(hellaswag.py) or --hellaswag_data (train_gpt2.py)") from None
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if lines != SPLIT_SIZES[split]:
        os.remove(path)
        raise UserError(f"{url} has {lines} lines, not the {SPLIT_SIZES[split]} of HellaSwag's {split} split; "
                        f"try again, or pass a good copy as --data")
    return path


def check_record(line, where):
    """(ctx, endings, label) of one line of a HellaSwag .jsonl file; `where` is file:line for the message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); is this a HellaSwag .jsonl file?") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: a HellaSwag record is a JSON object, found {type(record).__name__}")
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise UserError(f"{where}: no context: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or not all(isinstance(ending, str) for ending in endings):
        raise UserError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if len(endings) != NUM_ENDINGS:
        raise UserError(f"{where}: {len(endings)} endings; a HellaSwag record has {NUM_ENDINGS}")
    if "label" not in record:
        raise UserError(f"{where}: no 'label'; HellaSwag's test split is unlabelled, evaluate val or train instead")
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, found {label!r}")
    return ctx, endings, label


@dataclass
class Example:
    context: list  # token ids of ctx
    endings: list  # NUM_ENDINGS lists of token ids, each of " " + ending
    label: int     # index of the right ending


def load_examples(tokenizer, path="", split="val"):
    """The examples of a HellaSwag .jsonl file, tokenized by `tokenizer` (tiktoken's GPT-2 encoding, or one with
    its encode_ordinary_batch); path "" downloads the split into the cache."""
    path = path or download(split)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    records.append(check_record(line, f"{path}:{line_number}"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give the path of a hellaswag_{split}.jsonl, "
                        f"or no path to download it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; is this a HellaSwag .jsonl file?") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not records:
        raise UserError(f"{path} holds no examples")
    # encode_ordinary: a "<|endoftext|>" in the text is text, not the special token.
    contexts = tokenizer.encode_ordinary_batch([ctx for ctx, _, _ in records])
    endings = tokenizer.encode_ordinary_batch([" " + ending for _, four, _ in records for ending in four])
    return [Example(context, endings[i * NUM_ENDINGS:(i + 1) * NUM_ENDINGS], label)
            for i, (context, (_, _, label)) in enumerate(zip(contexts, records))]

def load_for_training(path=""):
    """The trainer's examples: the validation split (path, or downloaded into the cache), tokenized by GPT-2's
    tokenizer; one process per node downloads, the others then find the file."""
    with common.first_on_each_node():
        try:
            return load_examples(get_tokenizer(), path)
        except UserError as e:
            raise UserError(f"{e}; or turn HellaSwag off with --hellaswag=False") from None

# -----------------------------------------------------------------------------
# Scoring


def mixed_precision(device, dtype):
    """Autocast to dtype on the device's kind; float32 means none."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def fit(example, block_size):
    """The example cut to the model's context window. The context loses its oldest tokens until it and
    its longest ending fit in block_size, so all four endings follow the same context; an ending that
    fills the window alone keeps its last block_size - 1 tokens (a scored token needs one before it)."""
    endings = [ending[-(block_size - 1):] for ending in example.endings]
    return Example(example.context[-(block_size - max(map(len, endings))):], endings, example.label)


def plan_batches(examples, block_size, batch_size):
    """Indices of examples in batches of at most batch_size. The contexts in a batch are of one length,
    so they go through the model side by side; within a length, the examples are sorted by their
    longest ending, so that the endings pad little."""
    fitted = [fit(example, block_size) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: (len(fitted[i].context), max(map(len, fitted[i].endings))))
    batches = []
    for _, same_length in itertools.groupby(order, key=lambda i: len(fitted[i].context)):
        same_length = list(same_length)
        batches += [same_length[i:i + batch_size] for i in range(0, len(same_length), batch_size)]
    return batches


def hidden_states_of_endings(model, contexts, endings):
    """Each context (E, context_length) goes through the model once, into a KV cache; the cache is
    copied for each of its NUM_ENDINGS endings, right-padded to (NUM_ENDINGS * E, width), which
    continue from it together. With causal attention no real token attends to the padding after it,
    so padding changes nothing. Returns (NUM_ENDINGS * E, 1 + width, n_embd): per ending, the hidden
    state of the context's last token, then of its own tokens; position j predicts its token j."""
    cache = model.kv_cache(contexts.size(1) + endings.size(1))  # as long as this batch needs
    last = model.hidden_states(contexts, cache)[:, -1:]  # (E, 1, n_embd)
    cache.layers = [tuple(t.repeat_interleave(NUM_ENDINGS, dim=0) for t in layer) for layer in cache.layers]
    return torch.cat([last.repeat_interleave(NUM_ENDINGS, dim=0), model.hidden_states(endings, cache)], dim=1)


def score_batch(model, examples, device, dtype):
    """Total and per-token loss of every ending of the examples, whose contexts are of one length
    (plan_batches makes such batches): two (E, NUM_ENDINGS) float32 tensors.
    Only the hidden states of scored positions go through the output head, the costliest part."""
    examples = [fit(example, model.config.block_size) for example in examples]
    assert len({len(example.context) for example in examples}) == 1, "one context length per batch"
    endings = [ending for example in examples for ending in example.endings]
    width = max(map(len, endings))
    inputs = np.zeros((len(endings), width), dtype=np.int64)
    predict_from, targets, slots = [], [], []
    for r, ending in enumerate(endings):
        inputs[r, :len(ending)] = ending
        # Flat indices: ending token j is predicted from position j of its row of hidden states,
        # and its loss goes to slot j of its row of a (rows, width) grid.
        predict_from.extend(range(r * (width + 1), r * (width + 1) + len(ending)))
        targets.extend(ending)
        slots.extend(range(r * width, r * width + len(ending)))
    contexts = [example.context for example in examples]
    contexts, inputs, predict_from, targets, slots, ending_lengths = common.to_device(
        [contexts, inputs, predict_from, targets, slots, list(map(len, endings))], device)
    with torch.no_grad(), mixed_precision(device, dtype):
        hidden = hidden_states_of_endings(model, contexts, inputs)
        logits = model.logits(hidden.flatten(0, 1)[predict_from]).float()  # (scored tokens, vocab_size)
    # A CPU computes the cross-entropy several times faster a few rows at a time, each piece in its caches,
    # than over logits of hundreds of MB; a GPU is fastest in one go.
    rows = CPU_LOSS_ROWS if logits.device.type == "cpu" else len(logits)
    losses = torch.cat([F.cross_entropy(piece, piece_targets, reduction="none")
                        for piece, piece_targets in zip(logits.split(rows), targets.split(rows))])
    # A sum per row of the grid, zeros where a row has no token: unlike index_add_ on a GPU, the order
    # of the additions is the same on every run.
    total = torch.zeros(len(endings) * width, device=device).scatter_(0, slots, losses).view(len(endings), -1).sum(1)
    return total.view(-1, NUM_ENDINGS), (total / ending_lengths).view(-1, NUM_ENDINGS)


def _progress_bar(total, enabled):
    from tqdm import tqdm
    return tqdm(total=total, unit="ex", desc="hellaswag", disable=not enabled, file=sys.stderr)


def evaluate(model, examples, device, dtype, rank=0, world_size=1, batch_size=batch_size, progress=False,
             stop=None):
    """(acc, acc_norm, number of examples) over all examples, on every rank; None if stop(i), asked before
    the i-th batch (i > 0) alike on every rank, says to stop (the trainer's stop signals).

    model: the uncompiled, unwrapped module in eval mode (a compiled one would recompile for each new
    batch shape). With world_size > 1, torch.distributed must be initialized: each rank scores its
    share of the batches and the counts are summed. Each batch goes to the device in one asynchronous
    copy, and the choices come back in one copy at the end: until then the host never synchronizes with
    the device, so it prepares the next batches while the device scores this one.
    """
    every_batch = plan_batches(examples, model.config.block_size, batch_size)
    batches = every_batch[rank::world_size]
    # A model sharded by FSDP gathers its weights from every rank at each forward pass: a rank with one batch
    # fewer than the others scores one more, the first, and drops it, so that all make as many passes.
    spare = every_batch[:1] * (-(-len(every_batch) // world_size) - len(batches))
    choices = []  # per batch, (E, 2): the ending of lowest total loss, of lowest loss per token
    with _progress_bar(sum(map(len, batches)), progress and rank == 0) as bar:
        for i, batch in enumerate(batches + spare):
            if i > 0 and stop is not None and stop(i):
                return None
            total, mean = score_batch(model, [examples[j] for j in batch], device, dtype)
            if i < len(batches):
                choices.append(torch.stack([total.argmin(dim=1), mean.argmin(dim=1)], dim=1))
                bar.update(len(batch))  # handed to the device, which may be a few batches behind
    labels = torch.tensor([examples[i].label for batch in batches for i in batch], dtype=torch.long)
    chosen = torch.cat(choices).cpu() if choices else torch.zeros(0, 2, dtype=torch.long)
    counts = torch.cat([(chosen == labels[:, None]).sum(dim=0), torch.tensor([len(labels)])])  # by total, by mean, all
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
    correct, correct_norm, count = counts.tolist()
    return correct / max(count, 1), correct_norm / max(count, 1), count


# -----------------------------------------------------------------------------
# Benchmark: the batched evaluator against build-nanogpt's loop


def evaluate_one_at_a_time(model, examples, device, dtype, progress=False):
    """(acc, acc_norm, count) by build-nanogpt's loop: per example, its 4 rows padded into a batch, the
    full logits of every position, then the masked losses. The baseline that --benchmark times."""
    correct = correct_norm = 0
    with _progress_bar(len(examples), progress) as bar:
        for example in examples:
            example = fit(example, model.config.block_size)
            rows = [example.context + ending for ending in example.endings]
            tokens = torch.zeros(NUM_ENDINGS, max(map(len, rows)), dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for r, row in enumerate(rows):
                tokens[r, :len(row)] = torch.tensor(row)
                mask[r, len(example.context):len(row)] = 1
            tokens, mask = tokens.to(device), mask.to(device)
            with torch.no_grad(), mixed_precision(device, dtype):
                logits, _ = model(tokens)
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
            total = (losses.view(NUM_ENDINGS, -1) * mask[:, 1:]).sum(dim=1)
            correct += int(total.argmin().item() == example.label)
            correct_norm += int((total / mask[:, 1:].sum(dim=1)).argmin().item() == example.label)
            bar.update(1)
    return correct / max(len(examples), 1), correct_norm / max(len(examples), 1), len(examples)


def benchmark_speed(model, examples, device, dtype, batch_size, baseline_examples=0, rounds=4):
    """(batched, one at a time) examples/s. The batched evaluator scores all the examples; the one-at-a-time
    loop, much slower, the first baseline_examples of them (0: all). The two take turns, so that
    a machine busy with other work slows both alike: each round the batched evaluator scores all its
    examples, and the one-at-a-time loop the next quarter of its own."""
    evaluate(model, examples[:batch_size], device, dtype, batch_size=batch_size)  # warm up kernels, allocator
    baseline = examples[:baseline_examples or None]
    seconds = [0.0, 0.0]
    share = math.ceil(len(baseline) / rounds)
    for r in range(rounds):
        clock = time.perf_counter()
        evaluate(model, examples, device, dtype, batch_size=batch_size)  # both end in a host sync
        seconds[0] += time.perf_counter() - clock
        clock = time.perf_counter()
        evaluate_one_at_a_time(model, baseline[r * share:(r + 1) * share], device, dtype)
        seconds[1] += time.perf_counter() - clock
    return rounds * len(examples) / seconds[0], len(baseline) / seconds[1]

# -----------------------------------------------------------------------------
# The command line


def run(argv):
    """Score a model on HellaSwag; under torchrun every process takes a share of the examples."""
    from train_gpt2 import load_model, setup_system
    args = SimpleNamespace(**parse_command_line(argv, settings_of(globals()), __doc__, __file__)[0])
    check_ranges(vars(args), {"limit": ">= 0", "baseline_examples": ">= 0", "batch_size": ">= 1"})
    if args.split not in SPLIT_SIZES:
        raise UserError(f"--split takes {', '.join(SPLIT_SIZES)}, not '{args.split}'")
    system = setup_system(args.device, args.dtype)
    examples = load_examples(get_tokenizer(), args.data, args.split)[:args.limit or None]
    net, _ = load_model(args.model)
    net.to(system.device).eval()
    if system.master:
        print(f"{args.model}: {net.num_params() / 1e6:.1f}M parameters, {len(examples)} examples, "
              f"{system.world_size} x {system.device}, {str(system.dtype).removeprefix('torch.')}")
    if args.benchmark:
        if system.world_size > 1:
            raise UserError("--benchmark compares two loops in one process: run it without torchrun")
        batched, one_at_a_time = benchmark_speed(net, examples, system.device, system.dtype, args.batch_size,
                                                 args.baseline_examples)
        baseline = min(args.baseline_examples or len(examples), len(examples))
        print(f"benchmark: batched {batched:.1f} examples/s (all {len(examples)}), one at a time "
              f"{one_at_a_time:.1f} examples/s (the first {baseline}), {batched / one_at_a_time:.1f}x")
    clock = time.perf_counter()
    acc, acc_norm, count = evaluate(net, examples, system.device, system.dtype, system.rank, system.world_size,
                                    args.batch_size, progress=True)
    if system.master:
        print(f"{count} examples in {time.perf_counter() - clock:.1f} s, batch_size {args.batch_size}")
        print(f"acc {acc:.4f} acc_norm {acc_norm:.4f} n {count}")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
