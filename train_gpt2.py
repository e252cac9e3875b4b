"""
Train GPT-2 from scratch, or from OpenAI's weights, on uint16 token shards.

    python train_gpt2.py --preset=shakespeare         # a small model on input.txt, a few CPU minutes
    python train_gpt2.py                              # GPT-2 124M on FineWeb-Edu 10B (python fineweb.py first)
    torchrun --nproc_per_node=8 train_gpt2.py         # the same on 8 GPUs
    python train_gpt2.py --init_from=resume --out_dir=log/shakespeare   # go on where a run stopped
    python train_gpt2.py --help                       # every setting, its default and what it does

The constants below are the interface: edit them, or override any of them as --name=value or --name value.
The file reads top to bottom: settings, model, data, schedule and optimizer, training, evaluation,
checkpoints, the other modes (evaluation only, benchmark, --batch_size=auto), main. What every script shares
(the command line, errors, file writes, devices, the tokenizer) is in common.py.
"""

import glob
import json
import math
import os
import secrets
import shlex
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from common import (UserError, atomic_write, check_token_ids, check_writable_dir, device_type_of, download,
                    first_on_each_node, free_bytes, get_tokenizer, gpt2_bpe_files, lock_dir, open_shard,
                    parse_command_line, pick_device, pick_dtype, run_main, settings_of, sweep_temporary_files)
from hellaswag import evaluate as hellaswag_evaluate, load_examples as load_hellaswag_examples
from plot import WandbRun, refresh_curves

# -----------------------------------------------------------------------------
# Settings. The defaults are the GPT-2 124M recipe on FineWeb-Edu 10B.
# The comment after each constant is its --help text.

preset = ""                      # a named bundle of settings applied first: shakespeare
# data and output
data_dir = "edu_fineweb10B"      # directory of token shards (*train*/*val*, .bin or .npy), or a .txt file
partial_data = False             # train on a shard directory that fineweb.py has not finished (its manifest says so)
shuffle = True                   # read the training chunks in a new random order each epoch (from seed); False: in file order
out_dir = "log"                  # checkpoints, log.txt and samples go here; one run per directory
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
batch_size = 64                  # sequences per micro-batch, per process; auto: the largest that fits (on CUDA; elsewhere the default)
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
sample_prompt = "Hello, I'm a language model,"  # what the samples start from; empty: a new document
wandb_project = ""               # log the run to this Weights & Biases project (pip install wandb); empty: no W&B
wandb_run_name = ""              # the W&B run's name; empty: W&B picks one
# checkpoints
checkpoint_interval = 1000       # save every this many steps, at the last step and on SIGTERM/SIGINT
keep_checkpoints = 3             # how many of the newest checkpoints to keep in out_dir, besides the best one
# system
device = ""                      # cuda, cuda:N, mps or cpu; empty: the best available
dtype = ""                       # bfloat16, float16 or float32; empty: the best the device supports
compile = None                   # torch.compile the model; None: on for CUDA, off elsewhere
fsdp = False                     # under torchrun, shard weights, gradients and AdamW state across processes (FSDP2), not copy them (DDP)
seed = 1337                      # seeds every random number generator (each rank adds its rank)
peak_flops = 0.0                 # FLOP/s of one device, for MFU; 0: from the GPU's name (H100, A100, ...)
# modes
eval_only = False                # evaluate the model (validation loss, HellaSwag, samples) and exit
benchmark = False                # time training steps on random tokens and print tokens/s, MFU, memory
profile = ""                     # with benchmark: write a torch.profiler trace of 3 steps into this directory
export_hf = ""                   # write the model as a Hugging Face directory here and exit

PRESETS = {
    # A 7M-parameter model (6.4M of it the embedding) on tiny Shakespeare, sized for a 2-core CPU.
    "shakespeare": dict(
        data_dir="input.txt", out_dir="log/shakespeare", n_layer=4, n_head=4, n_embd=128,
        block_size=128, batch_size=4, total_batch_size=1024, max_steps=250, warmup_steps=25,
        max_lr=2e-3, min_lr=2e-4, eval_interval=50, eval_iters=8, checkpoint_interval=250,
        hellaswag=False, num_samples=1, sample_length=64, sample_prompt="ROMEO:",
    ),
}
SETTINGS = settings_of(globals())
# What a run is, as opposed to what this invocation does: a resumed run takes these from its checkpoint.
MODES = ("preset", "init_from", "eval_only", "benchmark", "profile", "export_hf")
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")

# Where tiny Shakespeare comes from when input.txt is missing, and what it must hash to.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

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


def quiet_transformers():
    """transformers' progress bars and notes would bury our own messages."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

# -----------------------------------------------------------------------------
# Data: uint16 token shards, memory-mapped, or a .txt file tokenized in memory


def find_data(data_dir, vocab_size, partial_data=False):
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
        split = int(0.9 * len(tokens))  # the first 90% for training, the last 10% for validation (as fineweb.py)
        return [tokens[:split]], [tokens[split:]]
    if os.path.isfile(data_dir):
        raise UserError(f"data_dir {data_dir} is a file but not a .txt file; give a text file (.txt) or a "
                        f"directory of token shards (python fineweb.py --input {data_dir} makes one from most formats)")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist; make the shards with python fineweb.py, "
                        f"or point --data_dir at a shard directory or a .txt file")
    check_manifest(data_dir, partial_data)
    shards = sorted(glob.glob(os.path.join(glob.escape(data_dir), "*.bin")) + glob.glob(os.path.join(glob.escape(data_dir), "*.npy")))
    train = [s for s in shards if "train" in os.path.basename(s)]
    val = [s for s in shards if "val" in os.path.basename(s)]
    if not train or not val:
        raise UserError(f"data_dir {data_dir} has {len(train)} training and {len(val)} validation shards (.bin or .npy "
                        f"with 'train' or 'val' in the name); it needs at least one of each (python fineweb.py makes them)")
    for shard in shards:
        open_shard(shard, vocab_size, check_ids=False)  # headers and sizes now; token ids when each is opened
    return train, val


def check_manifest(data_dir, partial_data):
    """fineweb.py writes manifest.json beside its shards and marks it complete at the end: an interrupted
    corpus is refused, unless partial_data says that what is there will do."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return  # shards made by another tool
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); run fineweb.py again to remake it") from None
    if not manifest.get("complete", True) and not partial_data:
        raise UserError(f"{data_dir} is unfinished: its manifest.json lists {len(manifest.get('shards', []))} shards "
                        f"of a corpus that fineweb.py has not finished; run the same fineweb.py command again to "
                        f"finish it (it resumes), or train on what is there with --partial_data")


def to_device(batch, device):
    """Move (inputs, targets) to the device. From pinned host memory the copy runs asynchronously,
    so the GPU never waits for the next batch."""
    if str(device).startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


class DataLoader:
    """Micro-batches of (B, T) inputs and targets, read from the shards epoch after epoch.

    Each shard is cut into consecutive chunks of B*T+1 tokens (a chunk's last token, the target of its last
    position, is the next chunk's first); a tail shorter than a chunk is skipped. An epoch reads every chunk
    once: the shards in file order and each shard's chunks in order, or with shuffle a new order of the shards
    and of each shard's chunks every epoch, drawn from (seed, epoch). Each micro-step of the whole job takes
    the next world_size chunks of that sequence and rank r keeps the r-th, so ranks never read the same
    tokens, and an optimizer step covers the same tokens for any split of its micro-batches into processes x
    accumulation steps.
    """

    def __init__(self, sources, B, T, rank, world_size, vocab_size, shuffle=False, seed=0):
        self.sources, self.B, self.T = sources, B, T
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.shuffle, self.seed = shuffle, seed % 2**64  # numpy refuses a negative seed that torch takes
        lengths = [len(self.open(i, check_ids=False)) for i in range(len(sources))]
        self.chunks = [max(0, (n - 1) // (B * T)) for n in lengths]  # chunk k: tokens k*B*T to (k+1)*B*T inclusive
        if max(self.chunks) == 0:
            raise UserError(f"every shard is shorter than one micro-batch of batch_size x block_size + 1 = {B * T + 1:,} "
                            f"tokens; lower --batch_size or --block_size")
        self.reset()

    def open(self, i, check_ids=True):
        source = self.sources[i]
        return source if isinstance(source, np.ndarray) else open_shard(source, self.vocab_size, check_ids)

    def order(self, n, *key):
        """0 .. n-1, or with shuffle a permutation of them drawn from (seed, *key) alone."""
        return np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle else np.arange(n)

    def go_to(self, epoch, shard, chunk):
        """Point at the chunk-th chunk in the order of the shard-th shard in the epoch's order of shards."""
        self.epoch, self.shard, self.chunk = epoch, shard, chunk
        file = self.order(len(self.sources), epoch)[shard]
        # 1 + file: numpy's seeding ignores trailing zeros, so (seed, epoch, 0) would draw the shards' order again.
        self.chunk_order = self.order(self.chunks[file], epoch, 1 + file)
        self.tokens = self.open(file)

    def reset(self):
        self.go_to(0, 0, 0)

    def state_dict(self):
        """Where the next chunk comes from: the epoch, the index of its shard in the epoch's order of shards,
        and its index in that shard's order of chunks."""
        return {"epoch": self.epoch, "shard": self.shard, "chunk": self.chunk}

    def load_state_dict(self, state):
        if "position" in state:
            # Written before shuffling, by a loader that read in file order and counted no epochs: {"shard": file,
            # "position": token offset in it}. In file order that is epoch 0, that shard, the chunk at that offset,
            # exactly; with shuffle on, the same place in epoch 0's order, so that the run goes on at the same
            # progress through the epoch (whose rest may then repeat or miss some chunks).
            state = {"epoch": 0, "shard": state["shard"], "chunk": -(-state["position"] // (self.B * self.T))}
        self.go_to(state["epoch"], state["shard"], state["chunk"])

    def next_batch(self):
        size = self.B * self.T + 1  # one extra token: the target of the last position
        for r in range(self.world_size):
            while self.chunk >= len(self.chunk_order):  # this shard is done (or has no chunk): on to the next
                if self.shard + 1 < len(self.sources):
                    self.go_to(self.epoch, self.shard + 1, 0)
                else:
                    self.go_to(self.epoch + 1, 0, 0)
            if r == self.rank:
                start = self.chunk_order[self.chunk] * (size - 1)
                chunk = torch.from_numpy(self.tokens[start:start + size].astype(np.int64))
            self.chunk += 1
        return chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)

# -----------------------------------------------------------------------------
# Schedule and optimizer


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
    """One schedule drives every optimizer, in configure_optimizers' order: with Muon first, at lr scaled to its
    own peak muon_lr; AdamW at lr."""
    scales = ([cfg.muon_lr / cfg.max_lr] if cfg.optimizer == "muon" else []) + [1.0]
    for optimizer, scale in zip(optimizers, scales, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr * scale

# -----------------------------------------------------------------------------
# Training: processes and devices, the step, and the loop


def setup_system(cfg):
    """Processes, device and precision from torchrun's environment and the settings, as a namespace:
    rank, local_rank, world_size, master, device, device_type, dtype, autocast, fsdp (whether training shards
    the model: --fsdp under torchrun; one process started without torchrun has nothing to shard)."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = pick_device(cfg.device)
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process: DDP and NCCL
        # device_id binds NCCL to this process's GPU at once, so that no collective guesses the device.
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    device_type = device_type_of(device)
    dtype = pick_dtype(cfg.dtype, device_type)
    # sample.py and hellaswag.py share this set-up and have no fsdp setting: they never shard.
    fsdp = getattr(cfg, "fsdp", False) and dist.is_initialized() and not (cfg.eval_only or cfg.export_hf)
    if fsdp and dtype == torch.float16:
        raise UserError("--fsdp trains in bfloat16 or float32, not float16 (whose loss scaler would judge each "
                        "process's shard of the gradients apart): set --dtype=bfloat16, or --dtype=float32 on older GPUs")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    # float32: no mixed precision. Under FSDP the gathered weights themselves are cast (shard_model): no autocast.
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32 and not fsdp)
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device,
                           device_type=device_type, dtype=dtype, autocast=autocast, fsdp=fsdp)


def on_rank_zero(function, system):
    """function() on rank 0 only. A UserError there is raised on every process, so that none is left waiting
    at a collective for one that has stopped."""
    result, error = None, None
    if system.master:
        try:
            result = function()
        except UserError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def grad_accum_steps_for(cfg, world_size):
    """Micro-steps per optimizer step, so that processes x micro-steps x batch_size x block_size = total_batch_size."""
    micro_batch = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % micro_batch:
        raise UserError(f"total_batch_size {cfg.total_batch_size:,} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {cfg.block_size} x {world_size} = {micro_batch:,}; change one of them")
    return cfg.total_batch_size // micro_batch


def compiles(cfg, system):
    return cfg.compile if cfg.compile is not None else system.device_type == "cuda"


def shard_model(model, compile_blocks, dtype):
    """FSDP2, in place: each block is one unit, whose weights are gathered from every process just before its
    forward and its backward pass and freed after, and whose gradients are reduce-scattered back into shards;
    the root unit holds the rest (the embeddings with the tied head, the last LayerNorm). Each process keeps
    1/processes of the weights, gradients and optimizer state. With dtype below float32, the gathered weights
    are cast to it, and the gradients are reduced in float32 into the float32 shards the optimizer steps."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    with torch.no_grad():  # every rank initialized its own model: all start from rank 0's, as DDP's do
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    # The logits that forward returns are a slice of the padded vocabulary: FSDP warns that an in-place change
    # to such a view would escape its hooks, and nothing here changes them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()  # before sharding, so that the compiled code runs between FSDP's hooks, not through them
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for method in ("hidden_states", "logits"):  # generation and HellaSwag call these, not forward
        register_fsdp_forward_method(model, method)
    return model


def wrap_for_training(model, cfg, system):
    """(the module the training steps run through, its DDP wrapper or None). DDP first, then compile: the
    compiler then splits the graph at DDP's buckets, so that the gradient all-reduce overlaps the backward pass.
    Evaluation, sampling and checkpoints use the plain model. Under FSDP the model is sharded in place (and
    compiled block by block): the training steps, evaluation and checkpoints all go through it."""
    if system.fsdp:
        return shard_model(model, compiles(cfg, system), system.dtype), None
    ddp_model = None
    if dist.is_initialized():
        model = ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[system.local_rank] if system.device_type == "cuda" else None, gradient_as_bucket_view=True)
    if compiles(cfg, system):
        model = torch.compile(model)
    return model, ddp_model


def training_parts(model, cfg, system):
    """What a training step needs: (optimizers, loss scaler (active for float16 only), the module to step
    through, its DDP wrapper or None). The optimizers come after the wrapping: FSDP replaces the parameters
    by their shards (DTensors), and those are what the optimizers must hold."""
    step_model, ddp_model = wrap_for_training(model, cfg, system)
    optimizers = configure_optimizers(model, cfg, system.device_type)
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)
    return optimizers, scaler, step_model, ddp_model


def train_step(model, ddp_model, optimizers, scaler, loader, grad_accum_steps, autocast, device, grad_clip,
               stopped=None):
    """Forward and backward over grad_accum_steps micro-batches, then clip. Returns the mean loss (averaged
    over ranks) and the gradient norm as device tensors; apply_update decides whether to step. Returns None
    if stopped() turns true between two micro-steps: the step is dropped, its gradients discarded."""
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        if micro_step > 0 and stopped is not None and stopped():
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            return None
        x, y = to_device(loader.next_batch(), device)
        if ddp_model is not None:
            # All-reduce the gradients only once they are complete, on the last micro-step's backward. FSDP
            # reduce-scatters at every micro-step instead: holding them whole until the last would put a full
            # float32 copy of the gradients on every process, the memory that sharding is there to save.
            ddp_model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        with autocast:
            loss = model(x, y)[1]  # the logits are not kept: (B, T, vocab) would live on into the next micro-step
        # Gradients add up over micro-steps: dividing makes the sum the mean over the whole batch.
        loss = loss / grad_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if dist.is_initialized():
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    norm = clip_gradients(list(model.parameters()), grad_clip if grad_clip > 0 else float("inf"))
    return loss_sum, norm


def clip_gradients(parameters, max_norm):
    """Scale the gradients down so that their global norm is at most max_norm; returns the norm before, a
    device tensor. Under FSDP each process holds shards: the norm of its shards is a partial one (a DTensor),
    made whole across the processes by full_tensor() before it scales anything."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def apply_update(optimizers, scaler, loss, norm, failures, say):
    """Step the optimizers, unless the loss or the gradient norm is not finite: such an update is skipped.
    Returns how many updates in a row have now been skipped."""
    if math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()):
        for optimizer in optimizers:
            scaler.step(optimizer)  # with fp16, the scaler itself skips steps whose gradients overflowed
        failures = 0
    else:
        failures += 1
        say(f"loss {loss}, gradient norm {norm}: update skipped")
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return failures


def training_bytes(model, optimizers, device):
    """(weights, gradients, optimizer state): the bytes that the process holding the most of them holds, from
    the shapes of its parameters (of its shards, under FSDP). A gradient is as large as its weight; AdamW keeps
    two moments of each of its parameters and Muon one of each matrix, from the first step on."""
    def local_bytes(p):
        p = p.to_local() if isinstance(p, DTensor) else p
        return p.numel() * p.element_size()
    weights = sum(local_bytes(p) for p in model.parameters())
    gradients = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    state = sum((2 if isinstance(o, torch.optim.AdamW) else 1) * local_bytes(p)
                for o in optimizers for group in o.param_groups for p in group["params"])
    sizes = torch.tensor([weights, gradients, state], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    return [int(n) for n in sizes.tolist()]


def stop_signals():
    """A list that SIGTERM (preemption) and SIGINT (Ctrl-C) append to: the loop then saves the last finished
    step at once, without evaluating, and exits with status 0."""
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


def step_start(run, device_type):
    """What a dropped step must go back to: the data position and the random states at its start."""
    return run.train_loader.state_dict(), rng_state(device_type)


def rewind(run, start):
    loader_state, rng = start
    run.train_loader.load_state_dict(loader_state)
    set_rng_state(rng)
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)


# Peak dense bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets (no sparsity), for MFU. The first
# name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
              "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def device_peak_flops(device, setting=0.0):
    """One device's peak FLOP/s: the peak_flops setting if given, else from the GPU's name; None if unknown."""
    if setting:
        return setting
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def speed(tokens_per_step, seconds, processes, flops_per_token, peak):
    """(tokens/s of the whole job, tokens/s of one process, MFU of one device in % or None). Each process
    does 1/processes of the step's work on its own device, so MFU divides one process's FLOPs by one peak."""
    per_process = tokens_per_step / processes / seconds
    return tokens_per_step / seconds, per_process, (100 * flops_per_token * per_process / peak if peak else None)


def duration(seconds):
    """4h05m, 12m30s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def record_step(log, step, loss, lrs, norm, dt, seconds_left, cfg, system, flops_per_token, peak):
    """The step's record: its loss in log.txt; with its progress, speed and MFU on the console and in W&B.
    lrs: {'lr': AdamW's, 'muon_lr': Muon's, if it runs}."""
    tokens_per_second, per_process, mfu = speed(cfg.total_batch_size, dt, system.world_size, flops_per_token, peak)
    unit = "GPU" if system.device_type == "cuda" else "process"
    log.record(step, "train", loss, [f"step {step + 1} of {cfg.max_steps}", f"lr {lrs['lr']:.4e}",
               *([f"muon lr {lrs['muon_lr']:.4e}"] if "muon_lr" in lrs else []), f"norm {norm:.4f}", f"{1000 * dt:.0f} ms", f"{tokens_per_second:,.0f} tok/s",
               *([f"{per_process:,.0f} tok/s per {unit}"] if system.world_size > 1 else []),
               *([f"mfu {mfu:.1f}%"] if mfu else []), *([f"{duration(seconds_left)} left"] if seconds_left is not None else [])],
               {**lrs, "grad_norm": norm, "tokens_per_second": tokens_per_second, **({"mfu": mfu} if mfu else {})})


def train(model, checkpoint, settings, cfg, system, grad_accum_steps):
    """The training loop: cfg.max_steps optimizer steps of cfg.total_batch_size tokens each, from step 0 or
    from where the checkpoint stopped, evaluating every eval_interval steps and saving every checkpoint_interval."""
    say = print if system.master else (lambda *args, **kwargs: None)
    vocab = model.config.vocab_size
    train_sources, val_sources = find_data(cfg.data_dir, vocab, cfg.partial_data)
    train_loader = DataLoader(train_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab,
                              shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = DataLoader(val_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab)
    hellaswag_examples = load_hellaswag(cfg)
    optimizers, scaler, step_model, ddp_model = training_parts(model, cfg, system)
    run = SimpleNamespace(model=model, optimizers=optimizers, scaler=scaler, train_loader=train_loader, step=0,
                          best_val_loss=float("inf"), best=None, run_id=secrets.token_hex(4), wandb_id=None,
                          checkpoints=checkpoint_paths(cfg.out_dir))  # a resumed run's own; a new run's out_dir holds none
    if checkpoint is not None:
        restore_training_state(run, checkpoint, system, say)
        say(f"resuming from step {run.step} of {cfg.out_dir}")
        del checkpoint  # free the host copy of the weights and optimizer state
    wandb_run = open_out_dir(run, settings, cfg) if system.master else None
    log = RunLog(os.path.join(cfg.out_dir, "log.txt"), system.master, wandb_run, curves=True)
    stop_requested = stop_signals()
    stopped = (lambda: bool(stop_requested)) if system.world_size == 1 else \
        (lambda: any_process_stopped(stop_requested, system.device).item() > 0)  # every process stops alike

    tokens_per_step = cfg.total_batch_size
    flops_per_token, peak = model.flops_per_token(), device_peak_flops(system.device, cfg.peak_flops)
    say(f"{model.num_params():,} parameters | {system.world_size} processes x {grad_accum_steps} micro-steps x "
        f"{cfg.batch_size} x {cfg.block_size} tokens = {tokens_per_step:,} tokens per step | {system.device}, "
        f"{str(system.dtype).removeprefix('torch.')}, compile {compiles(cfg, system)}")
    weights, gradients, state = training_bytes(model, optimizers, system.device)
    say(f"memory per process: {weights / 1e9:.3g} GB weights + {gradients / 1e9:.3g} GB gradients + {state / 1e9:.3g} GB "
        f"optimizer state = {(weights + gradients + state) / 1e9:.3g} GB before activations "
        f"({'sharded by FSDP' if system.fsdp else 'a whole copy on each process'}; from the shapes)")
    if system.master:
        check_room(cfg.out_dir, model, cfg.keep_checkpoints, len(run.checkpoints))
    if run.step == 0:
        run.best_val_loss = evaluate(0, model, val_loader, hellaswag_examples, cfg, system, log)  # the baseline
    first_step, began, clock, failures = run.step, time.time(), None, 0
    while run.step < cfg.max_steps:
        t0 = time.time()
        lr = get_lr(run.step, cfg.warmup_steps, cfg.max_steps, cfg.max_lr, cfg.min_lr)
        set_lr(optimizers, lr, cfg)
        start = step_start(run, system.device_type)
        try:
            result = train_step(step_model, ddp_model, optimizers, scaler, train_loader, grad_accum_steps,
                                system.autocast, system.device, cfg.grad_clip, stopped)
        except UserError as e:  # a bad shard met on the way: keep the steps done so far, then stop with its message
            rewind(run, start)
            saved = f"the steps up to {run.step} are saved: " if save_training_state(run, settings, cfg, system, say) else ""
            raise UserError(f"{e}; {saved}remake that shard, then resume with --init_from=resume "
                            f"--out_dir={cfg.out_dir}") from None
        if result is None:  # a stop signal between micro-steps: the unfinished step is dropped
            rewind(run, start)
            stop_now(run, settings, cfg, system, say)
            break
        loss, norm = result
        stop = any_process_stopped(stop_requested, system.device)
        loss, norm, stop = loss.item(), norm.item(), stop.item()  # the one wait for the device in a step
        failures = apply_update(optimizers, scaler, loss, norm, failures, say)
        if failures >= 3:
            raise UserError("non-finite loss or gradient norm for 3 steps in a row; " + resume_advice(run, cfg))
        if system.device_type == "cuda":
            torch.cuda.synchronize()  # so that the time below includes the optimizer step
        if clock is None:  # the first step's time includes compilation and warm-up: estimate from the others
            clock = (time.time(), run.step + 1)
        done_since = run.step + 1 - clock[1]
        seconds_left = (time.time() - clock[0]) / done_since * (cfg.max_steps - run.step - 1) if done_since else None
        lrs = {"lr": lr, **({"muon_lr": lr * cfg.muon_lr / cfg.max_lr} if cfg.optimizer == "muon" else {})}
        record_step(log, run.step, loss, lrs, norm, time.time() - t0, seconds_left, cfg, system, flops_per_token, peak)
        run.step += 1
        last = run.step == cfg.max_steps
        if stop:  # no evaluation: torchrun kills its workers 30 s after the signal, so save at once
            stop_now(run, settings, cfg, system, say)
            break
        val_loss = None
        if run.step % cfg.eval_interval == 0 or last:
            val_loss = evaluate(run.step, model, val_loader, hellaswag_examples, cfg, system, log)
            run.best_val_loss = min(run.best_val_loss, val_loss)
        if run.step % cfg.checkpoint_interval == 0 or last:
            if not save_training_state(run, settings, cfg, system, say, val_loss) and last:
                raise UserError(f"step {run.step}: the model has non-finite weights, so no checkpoint was written; "
                                + resume_advice(run, cfg))
    else:  # the loop ran to max_steps
        say(f"done: {run.step - first_step} steps, {(run.step - first_step) * tokens_per_step:,} tokens in "
            f"{duration(time.time() - began)}; best validation loss {run.best_val_loss:.4f}; checkpoints in {cfg.out_dir}")
    say(next_commands(cfg.out_dir))
    if wandb_run is not None:
        wandb_run.finish()


def stop_now(run, settings, cfg, system, say):
    """After a stop signal: save the last finished step and say how to go on."""
    save_training_state(run, settings, cfg, system, say)
    say(f"stopped by a signal after step {run.step}; continue with: python train_gpt2.py --init_from=resume "
        f"--out_dir={shlex.quote(cfg.out_dir)}")


def resume_advice(run, cfg):
    """Where to go on from after a run went wrong: the checkpoint with the best validation loss."""
    if run.best is None:
        return "lower --max_lr, or resume from the last good checkpoint with --init_from=resume"
    path, val_loss = os.path.join(cfg.out_dir, run.best["file"]), run.best["val_loss"]
    return (f"the best checkpoint is {path} (validation loss {val_loss:.4f}): go on from it with a lower "
            f"learning rate, python train_gpt2.py --init_from={shlex.quote(path)} --out_dir={shlex.quote(cfg.out_dir)} "
            f"--max_lr={cfg.max_lr / 2:g}")


def next_commands(out_dir):
    """What to do with a run once it ends: the commands for its own out_dir."""
    d = shlex.quote(out_dir)
    return "\n".join([
        "next:",
        f"  python sample.py --out_dir={d}                                   # sample from the newest checkpoint",
        f"  python plot.py {d}                                               # draw the curves",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} --max_steps=N   # train further",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} --export_hf={shlex.quote(os.path.join(out_dir, 'hf'))}"
        f"   # a Hugging Face model"])

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
    """A few top-k 50 samples from the prompt (an empty one starts a new document), as text. The generator is
    seeded alike every time, so the training's random state is untouched and the samples of two evaluations
    differ only by the weights."""
    enc = get_tokenizer()
    tokens = enc.encode(cfg.sample_prompt, allowed_special="all") if cfg.sample_prompt else [enc.eot_token]
    if max(tokens) >= model.config.vocab_size:
        raise UserError(f"the samples' prompt holds GPT-2 token {max(tokens)}, outside the model's vocab_size "
                        f"{model.config.vocab_size}; set --num_samples=0 for a model of another vocabulary")
    prompt = torch.tensor(tokens, dtype=torch.long, device=system.device)
    idx = prompt[-model.config.block_size // 2:].repeat(cfg.num_samples, 1)
    generator = torch.Generator(device=system.device).manual_seed(cfg.seed + system.rank)
    model.eval()
    # Under FSDP the blocks are compiled in place: a cache one position longer at each token would recompile them.
    with system.autocast, torch.compiler.set_stance("force_eager"):
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
        except UserError as e:
            raise UserError(f"{e}; or turn HellaSwag off with --hellaswag=False") from None


def evaluate(step, model, val_loader, hellaswag_examples, cfg, system, log):
    """Validation loss, HellaSwag and samples of the plain (uncompiled, unwrapped) model after `step` steps,
    recorded in `log`. Returns the validation loss."""
    val_loss = validation_loss(model, val_loader, math.ceil(cfg.eval_iters / system.world_size), system.autocast, system.device)
    perplexity = math.exp(min(val_loss, 50))
    log.record(step, "val", val_loss, [f"perplexity {perplexity:.2f}"], {"perplexity": perplexity})
    if hellaswag_examples is not None:
        model.eval()
        with torch.compiler.set_stance("force_eager"):  # FSDP's compiled blocks would recompile at each batch shape
            acc, acc_norm, count = hellaswag_evaluate(model, hellaswag_examples, system.device, system.dtype,
                                                      rank=system.rank, world_size=system.world_size)
        model.train()
        log.record(step, "hella", acc_norm, [f"acc {acc:.4f} over {count} examples"], {"acc": acc})
    # Rank 0 samples; under FSDP every rank takes part, each forward pass gathering the weights from them all.
    texts = samples(model, cfg, system) if cfg.num_samples > 0 and (system.master or system.fsdp) else []
    for i, text in enumerate(texts if system.master else []):
        print(f"sample {i}: {text}")
    log.evaluated(step, texts)
    return val_loss

# -----------------------------------------------------------------------------
# Checkpoints: one run per out_dir, written whole or not at all; and loading a model from any init_from value

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")))


def step_of(path):
    """The step of a checkpoint file, from its name ckpt_0000250.pt."""
    return int(os.path.basename(path)[len("ckpt_"):-len(".pt")])


def claim_out_dir(out_dir, resuming, resume_step):
    """Own out_dir for a training run, before anything slow: it must be a writable directory that no other
    run is writing (a lock that the OS releases when the process dies), and that holds no checkpoints of
    another run. Resuming from an older checkpoint sets the later ones aside. Returns (the lock file, whether
    out_dir was made here)."""
    made = not os.path.exists(out_dir)
    check_writable_dir(out_dir, "out_dir")
    lock = lock_dir(out_dir, "another training run")
    try:
        removed = sweep_temporary_files(out_dir)
        if removed:
            print(f"removed {len(removed)} unfinished file(s) of killed processes from {out_dir}")
        paths = checkpoint_paths(out_dir)
        if paths and not resuming:
            raise UserError(f"{out_dir} holds the checkpoints of another run (the newest: {os.path.basename(paths[-1])}); "
                            f"to go on with it: --init_from=resume --out_dir={out_dir}; to start a new run, name "
                            f"another --out_dir or delete {out_dir}")
        later = [path for path in paths if resuming and step_of(path) > resume_step]
        for path in later:
            os.replace(path, path + ".abandoned")
        if later:
            print(f"going back to step {resume_step}: set aside {len(later)} later checkpoint(s) of the run as "
                  f"*.pt.abandoned (delete them when you no longer want them)")
    except BaseException:
        release_out_dir(out_dir, lock, made, succeeded=False)
        raise
    return lock, made


def release_out_dir(out_dir, lock, made, succeeded):
    """Let go of out_dir. One that this run made and that stayed empty (the run failed during set-up) goes too."""
    lock.close()
    if made and not succeeded and set(os.listdir(out_dir)) <= {".lock"}:
        os.remove(os.path.join(out_dir, ".lock"))
        os.rmdir(out_dir)


def check_room(out_dir, model, keep, existing):
    """Warn, before the first save, if the disk cannot hold keep_checkpoints + 1 checkpoints (the newest is
    written before the oldest is removed). A checkpoint is about the weights and two AdamW moments."""
    size = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    needed, free = max(0, keep + 1 - existing) * size, free_bytes(out_dir)
    if free < needed:
        print(f"warning: {out_dir} has {free / 1e9:.2f} GB free, but {keep + 1} checkpoints of ~{size / 1e9:.2f} GB "
              f"need {needed / 1e9:.2f} GB more; free some space or lower --keep_checkpoints")


def rng_state(device_type):
    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(device_type):
    """Every rank's random number generator states, as a list indexed by rank."""
    state = rng_state(device_type)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_training_state(run, settings, cfg, system, say, val_loss=None):
    """A checkpoint of everything the run needs to go on exactly where it is; never of non-finite weights.
    Keeps the newest keep_checkpoints of this run's checkpoints, and the one with the best validation loss.
    Returns whether a checkpoint was written."""
    if not weights_finite(run.model, system.device):
        say(f"step {run.step}: the model has non-finite weights; no checkpoint written")
        return False
    rng = gather_rng_states(system.device_type)  # every rank takes part
    model_state, optimizer_states = full_state_dicts(run.model, run.optimizers, system.fsdp)  # every rank too
    if not system.master:
        return True
    path = os.path.join(cfg.out_dir, f"ckpt_{run.step:07d}.pt")
    if val_loss is not None and (run.best is None or val_loss <= run.best["val_loss"]):
        run.best = {"file": os.path.basename(path), "val_loss": val_loss}
    state = {"model": model_state, "optimizers": optimizer_states,
             "scaler": run.scaler.state_dict(), "config": asdict(run.model.config), "settings": settings,
             "step": run.step, "loader": run.train_loader.state_dict(), "rng": rng, "val_loss": val_loss,
             "best_val_loss": run.best_val_loss, "best": run.best, "run_id": run.run_id, "wandb_id": run.wandb_id}
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-write leaves the previous checkpoint whole
    run.checkpoints = sorted(set(run.checkpoints) | {path})
    best = os.path.join(cfg.out_dir, run.best["file"]) if run.best else None
    for old in run.checkpoints[:-cfg.keep_checkpoints]:  # only ever this run's own, oldest first
        if old != best:
            os.remove(old)
    run.checkpoints = [p for p in run.checkpoints if os.path.exists(p)]
    say(f"saved {path}")
    return True


def weights_finite(model, device):
    """Whether every weight is finite, on every process: under FSDP each process sees only its own shards."""
    finite = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in model.parameters())
    finite = torch.tensor(float(finite), device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order that numbers them in its state dict."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model, optimizers, sharded):
    """(the model's state dict, [each optimizer's]) in the one format every checkpoint has: whole tensors, the
    optimizers' state keyed by parameter number as torch.optim writes it, so that a run of one process, DDP or
    FSDP on any number of processes loads it. A sharded model's are gathered from every process (all must call
    this) onto rank 0's CPU, one tensor at a time; the other ranks get empty ones."""
    if not sharded:
        return model.state_dict(), [o.state_dict() for o in optimizers]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    first_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # the head is the embedding: one tensor again
        first_name.setdefault(p, name)
        if name in model_state:
            model_state[name] = model_state[first_name[p]]
    optimizer_states = []
    for optimizer in optimizers:
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
        names = parameter_names(model, optimizer)
        numbers = iter(range(len(names)))
        optimizer_states.append({
            "state": {i: by_name["state"][name] for i, name in enumerate(names) if name in by_name.get("state", {})},
            "param_groups": [{**group, "params": [next(numbers) for _ in group["params"]]}
                             for group in by_name.get("param_groups", [])]})
    return model_state, optimizer_states


def load_optimizer_state(model, optimizer, state, sharded):
    """Load an optimizer's state dict as full_state_dicts writes it (and every checkpoint before FSDP did).
    A sharded model's optimizer takes it keyed by parameter name, and each process keeps its shards of it."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    names = parameter_names(model, optimizer)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def restore_training_state(run, checkpoint, system, say):
    """Optimizers, loss scaler, data position, step and random states from a checkpoint of this run."""
    if "optimizers" not in checkpoint:
        raise UserError("the newest checkpoint holds a model but no training state to resume; start a new run "
                        "from its weights with --init_from=PATH_OF_THE_CHECKPOINT")
    for optimizer, state in zip(run.optimizers, checkpoint["optimizers"], strict=True):
        load_optimizer_state(run.model, optimizer, state, system.fsdp)
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.train_loader.load_state_dict(checkpoint["loader"])
    run.step, run.best_val_loss, run.wandb_id = checkpoint["step"], checkpoint["best_val_loss"], checkpoint.get("wandb_id")
    run.best, run.run_id = checkpoint.get("best"), checkpoint.get("run_id", run.run_id)
    rng = checkpoint["rng"]
    if len(rng) == system.world_size:
        set_rng_state(rng[system.rank])
    else:
        say(f"note: the checkpoint was written by {len(rng)} processes, not {system.world_size}: random states start afresh")


def open_out_dir(run, settings, cfg):
    """On rank 0: run.json in out_dir (the settings, the run's id, and the tokens per step that plot.py needs
    besides log.txt), and the W&B run if one is asked for: the same as before the checkpoint, if there was one."""
    run_json = {"tokens_per_step": cfg.total_batch_size, "run_id": run.run_id, "settings": settings}
    atomic_write(os.path.join(cfg.out_dir, "run.json"), lambda f: f.write(json.dumps(run_json, indent=1).encode()))
    if not cfg.wandb_project:
        return None
    wandb_run = WandbRun(cfg.wandb_project, cfg.wandb_run_name, config=settings, resume_id=run.wandb_id)
    run.wandb_id = wandb_run.id
    return wandb_run


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: reading it runs no code. The tensors are mapped from
    the file, not read into memory: eight processes resuming GPT-2 XL do not each hold a 19 GB copy."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    if init_from.endswith(".pt") and not os.path.exists(init_from):
        raise UserError(f"checkpoint {init_from} does not exist")
    if not os.path.isfile(init_from):
        raise UserError(f"--init_from={init_from} is neither a checkpoint file, a directory with a config.json, "
                        f"nor one of: scratch, resume, {', '.join(PRETRAINED)}")
    return load_checkpoint(init_from)


def resumes(init_from, out_dir, checkpoint):
    """Whether init_from goes on with the run in out_dir: resume, or one of its own checkpoints named as a file
    (to go back to an earlier step, after the run diverged, say). Any other checkpoint only gives weights."""
    if init_from == "resume":
        return True
    return (checkpoint is not None and "optimizers" in checkpoint and os.path.isdir(out_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(init_from)), out_dir))


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
    check_writable_dir(directory, "export_hf")
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
    # safetensors writes its file private (0600); every file of the export gets the usual mode of new files.
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)

# -----------------------------------------------------------------------------
# The other modes: evaluation only, benchmark (and profile), and the search of --batch_size=auto


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


def run_benchmark(model, cfg, system, grad_accum_steps):
    """Time the real training step on random tokens, after compilation and warm-up; with cfg.profile, then
    profile three more steps."""
    say = print if system.master else (lambda *args, **kwargs: None)
    optimizers, scaler, step_model, ddp_model = training_parts(model, cfg, system)
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
    tokens_per_second, per_process, mfu = speed(tokens_per_step, dt, system.world_size, model.flops_per_token(),
                                                device_peak_flops(system.device, cfg.peak_flops))
    unit = "GPU" if system.device_type == "cuda" else "process"
    mfu = f"{mfu:.1f}% per {unit}" if mfu else "n/a (no peak FLOP/s known for this device: set --peak_flops)"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if system.device_type == "cuda" else "n/a (CPU)"
    say(f"benchmark: {model.num_params():,} parameters, {tokens_per_step:,} tokens per step, loss {loss.item():.4f}")
    say(f"benchmark: {1000 * dt:.1f} ms/step | {tokens_per_second:,.0f} tok/s | {per_process:,.0f} tok/s per {unit} | "
        f"mfu {mfu} | peak memory {memory}")
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


def micro_batches(cfg, world_size):
    """The micro-batches that keep total_batch_size with gradient accumulation: the powers of two that divide
    each process's sequences per step, largest first."""
    sequences = cfg.total_batch_size // (cfg.block_size * world_size) if cfg.total_batch_size % (cfg.block_size * world_size) == 0 else 0
    return [b for b in (2 ** i for i in range(sequences.bit_length(), -1, -1)) if b <= sequences and sequences % b == 0]


def find_batch_size(model, cfg, system, configured):
    """--batch_size=auto: the largest micro-batch that fits, found by real training steps of the model on the
    device, largest first (eager: the compiled model needs no more memory). The steps run at learning rate 0,
    so the weights do not move. On a CPU or MPS, no search: the largest candidate up to the configured default."""
    say = print if system.master else (lambda *args, **kwargs: None)
    candidates = micro_batches(cfg, system.world_size)
    if not candidates:
        raise UserError(f"total_batch_size {cfg.total_batch_size:,} is not a multiple of block_size x processes = "
                        f"{cfg.block_size} x {system.world_size}; --batch_size=auto needs one")
    if system.device_type != "cuda":
        batch = next((b for b in candidates if b <= configured), 1)
        say(f"auto batch_size: {batch} (the default {configured} or the largest below it that keeps total_batch_size: "
            f"the search runs on CUDA only)")
        return batch
    optimizers = configure_optimizers(model, cfg, system.device_type)
    set_lr(optimizers, 0.0, cfg)
    rng, out_of_memory = rng_state(system.device_type), []
    for batch in candidates:
        fits = True
        try:
            x = torch.randint(model.config.vocab_size, (batch, cfg.block_size + 1), device=system.device)
            with system.autocast:
                loss = model(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            fits = False
        x = loss = None
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        fits = torch.tensor(float(fits), device=system.device)
        if dist.is_initialized():
            dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # it must fit on every process
        if fits.item():
            break
        out_of_memory.append(batch)
    else:
        raise UserError(f"not even a micro-batch of 1 x {cfg.block_size} tokens fits on {system.device}; try "
                        f"--activation_checkpointing, a shorter --block_size or a smaller model")
    del optimizers
    torch.cuda.empty_cache()
    set_rng_state(rng)
    tried = ", ".join(f"{b}: out of memory" for b in out_of_memory) or "the largest candidate; a larger one may fit"
    say(f"auto batch_size: {batch} ({tried})")
    return batch


def out_of_memory_advice(cfg, system):
    """The one line for a CUDA out-of-memory error: a smaller micro-batch that keeps total_batch_size."""
    if cfg.batch_size == "auto":  # out of memory before the search: the model alone does not fit
        return (f"out of memory on {system.device} before any micro-batch was tried; try --activation_checkpointing "
                f"or a smaller model")
    smaller = [b for b in micro_batches(cfg, system.world_size) if b < cfg.batch_size]
    hint = f"try --batch_size={smaller[0]} or --batch_size=auto" if smaller else \
        "try --activation_checkpointing, a shorter --block_size or a smaller model"
    return (f"out of memory on {system.device} with micro-batch {cfg.batch_size} x {cfg.block_size} tokens; {hint} "
            f"(gradient accumulation keeps total_batch_size={cfg.total_batch_size:,})")

# -----------------------------------------------------------------------------
# Main: settings, model, then the mode asked for


def parse_settings(argv):
    """train_gpt2.py's settings from its command line: (settings, the names given)."""
    return parse_command_line(argv, SETTINGS, __doc__, __file__, PRESETS, auto=("batch_size",))


def settings_for_run(settings, given, checkpoint, resuming):
    """A resumed run goes on with the settings saved in its checkpoint; the flags given now override them, and
    each change is said. Returns (settings, ["changed: --max_steps 60 -> 250", ...])."""
    if not resuming or "settings" not in checkpoint:
        return settings, []
    saved = {name: value for name, value in checkpoint["settings"].items() if name in SETTINGS and name not in MODES}
    if "optimizer" in given and settings["optimizer"] != saved.get("optimizer", "adamw"):
        raise UserError(f"the run used --optimizer={saved.get('optimizer', 'adamw')} (given {settings['optimizer']}); "
                        f"its checkpoint holds that optimizer's state: leave out --optimizer to resume")
    changes = [f"changed: --{name} {saved[name]} -> {settings[name]}" for name in sorted(given)
               if name in saved and saved[name] != settings[name] and name not in SHAPE]
    return {**settings, **saved, **{name: settings[name] for name in given}}, changes


# Each float setting and the finite values it takes, as the error says it.
FLOAT_RANGES = {
    "max_lr": (lambda v: v > 0, "a learning rate must be above 0"),
    "muon_lr": (lambda v: v > 0, "a learning rate must be above 0"),
    "adam_eps": (lambda v: v > 0, "it takes a number above 0"),
    **{name: (lambda v: v >= 0, "it takes 0 or more")
       for name in ("min_lr", "weight_decay", "grad_clip", "muon_weight_decay", "peak_flops")},
    **{name: (lambda v: 0 <= v < 1, "it takes a number at least 0 and below 1")
       for name in ("dropout", "beta1", "beta2", "muon_momentum")},
}


def check_settings(cfg):
    """Refuse settings that cannot make a model or a run, with one line that says what to change."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
                 "eval_interval", "eval_iters", "checkpoint_interval", "keep_checkpoints"):
        if getattr(cfg, name) != "auto" and getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: it takes 1 or more")
    for name in ("max_steps", "warmup_steps", "num_samples", "sample_length"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name}={getattr(cfg, name)}: it takes 0 or more")
    for name, (good, requirement) in FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if not math.isfinite(value):
            raise UserError(f"--{name}={value}: it takes a finite number ({requirement.removeprefix('it takes ')})")
        if not good(value):
            raise UserError(f"--{name}={value}: {requirement}")
    if cfg.n_embd % cfg.n_head:
        heads = [h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0]
        nearest = min(heads, key=lambda h: abs(h - cfg.n_head))
        raise UserError(f"--n_head={cfg.n_head} does not divide --n_embd={cfg.n_embd}: each head takes "
                        f"n_embd / n_head channels; try --n_head={nearest}")
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer takes adamw or muon, not '{cfg.optimizer}'")
    if cfg.fsdp and cfg.optimizer == "muon":
        raise UserError("--fsdp does not run --optimizer=muon: Muon orthogonalizes whole matrices, and FSDP leaves "
                        "each process a shard of each; use --optimizer=adamw with --fsdp, or Muon without --fsdp")
    if cfg.fsdp and cfg.batch_size == "auto":
        raise UserError("--batch_size=auto does not search under --fsdp (it tries the whole model on one GPU); "
                        "give --batch_size=N")
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer=muon needs torch 2.9 or newer (this is torch {torch.__version__}): "
                        f"pip install -U torch, or train with --optimizer=adamw")


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
    resuming = resumes(settings["init_from"], settings["out_dir"], checkpoint)
    settings, changes = settings_for_run(settings, given, checkpoint, resuming)
    cfg = SimpleNamespace(**settings)
    check_settings(cfg)  # before anything slow; again once a loaded model gives the shape
    system = setup_system(cfg)
    training = not (cfg.export_hf or cfg.benchmark or cfg.eval_only)
    if cfg.fsdp and (training or cfg.benchmark) and not system.fsdp:
        print("--fsdp: one process has nothing to shard, so it runs as a single process; "
              "start it with torchrun --nproc_per_node=N to shard the model across N")
    owned, succeeded = None, False  # owned: rank 0's (lock, whether it made out_dir) while it trains
    if training:
        owned = on_rank_zero(lambda: claim_out_dir(cfg.out_dir, resuming, checkpoint["step"] if resuming else None), system)
    elif cfg.eval_only or cfg.export_hf:  # where they write, before the model is built
        on_rank_zero(lambda: check_writable_dir(cfg.export_hf or cfg.out_dir, "export_hf" if cfg.export_hf else "out_dir"), system)
    try:
        torch.manual_seed(cfg.seed + system.rank)
        model = make_model(cfg, given, checkpoint)
        for change in changes if system.master else []:
            print(change)
        if cfg.export_hf:
            save_hf(model, cfg.export_hf)
            print(f"wrote {cfg.export_hf}")
            return
        model.to(system.device)
        if cfg.batch_size == "auto":
            cfg.batch_size = find_batch_size(model, cfg, system, {**SETTINGS, **PRESETS.get(cfg.preset, {})}["batch_size"])
        grad_accum_steps = grad_accum_steps_for(cfg, system.world_size)  # a bad total_batch_size: before any data
        if cfg.benchmark:
            return run_benchmark(model, cfg, system, grad_accum_steps)
        if cfg.eval_only:
            return evaluate_only(model, checkpoint, cfg, system)
        train(model, checkpoint if resuming else None, vars(cfg), cfg, system, grad_accum_steps)
        succeeded = True
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg, system)) from None
    finally:
        if owned is not None:
            release_out_dir(cfg.out_dir, *owned, succeeded)


def main(argv=None):
    run_main(start, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
