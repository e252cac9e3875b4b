"""
Train GPT-2 from scratch, or from OpenAI's weights, on uint16 token shards.

    python train_gpt2.py config/fast.py config/shakespeare.py   # a small model on input.txt, a few CPU minutes
    python train_gpt2.py                              # GPT-2 124M on FineWeb-Edu 10B (python fineweb.py first)
    torchrun --nproc_per_node=8 train_gpt2.py         # the same on 8 GPUs
    python train_gpt2.py --init_from=resume --out_dir=log/shakespeare   # go on where a run stopped
    python train_gpt2.py --help                       # every setting, its default and what it does

The settings are the constants just below: config files (config/*.py, applied in order) and then --name=value
flags rewrite them before anything runs, so that all code in this file reads the values the run prints.
config/fast.py is the fast recipe (Muon, an untied head), config/shakespeare.py the quick start's data and size.
The file reads top to bottom: settings, model, data, schedule and optimizers, the training loop, evaluation,
main. The run directory and checkpoint files are checkpoints.py's; --fsdp is fsdp.py's; OpenAI's weights and
--export_hf are huggingface.py's.
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
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
from common import (UserError, atomic_write, check_token_ids, check_writable_dir, download, first_on_each_node,
                    get_tokenizer, open_shard, run_main, split_text_tokens, to_device)
from configurator import check_ranges, parse_command_line, settings_of
from hellaswag import evaluate as hellaswag_evaluate, load_for_training as load_hellaswag_examples
from plot import RunLog, WandbRun

# -----------------------------------------------------------------------------
# Settings. The defaults are the GPT-2 124M recipe on FineWeb-Edu 10B; the comment after each is its --help text.

# data and output
data_dir = "edu_fineweb10B"      # directory of token shards (*train*/*val*, .bin or .npy), or a .txt file
partial_data = False             # train on a shard directory that fineweb.py has not finished (its manifest says so)
shuffle = True                   # a new random order of the training chunks each epoch (from seed); False: file order
out_dir = "log"                  # checkpoints, log.txt and samples go here; one run per directory
init_from = "scratch"            # scratch, resume, gpt2[-medium|-large|-xl], a Hugging Face directory or a checkpoint
# model (taken from the model when init_from loads one)
n_layer = 12                     # transformer blocks
n_head = 12                      # attention heads per block
n_embd = 768                     # width of the residual stream
block_size = 1024                # context length in tokens
vocab_size = 50257               # GPT-2's vocabulary; the embedding is padded to a multiple of 64 for speed
dropout = 0.0                    # dropout probability (0 for pretraining, ~0.1 for fine-tuning)
tie_head = True                  # the output head is the token embedding, as in GPT-2; False: a head of its own
zero_init = False                # the blocks' output projections start at zero: each block starts as the identity
activation_checkpointing = False # recompute activations in the backward pass: less memory, ~30% more compute
# batch
batch_size = 64                  # sequences per micro-batch and process; auto: the largest that fits (on CUDA)
total_batch_size = 524288        # tokens per optimizer step, across all processes (2**19)
# optimizer and schedule
max_steps = 19073                # optimizer steps: 10B tokens / 2**19 tokens per step
warmup_steps = 715               # linear warmup from 0 to max_lr, then a cosine decay to min_lr at max_steps
max_lr = 6e-4                    # peak learning rate
min_lr = 6e-5                    # learning rate at the end of the decay
embedding_lr = 0.0               # AdamW's peak rate for an untied model's embeddings; 0 (and a tied one): max_lr
weight_decay = 0.1               # AdamW decay on matrices and embeddings only
beta1 = 0.9                      # AdamW first-moment decay
beta2 = 0.95                     # AdamW second-moment decay
adam_eps = 1e-8                  # AdamW epsilon
grad_clip = 1.0                  # clip the global gradient norm to this (0 to disable)
optimizer = "adamw"              # adamw, or muon: Muon on the blocks' weight matrices, AdamW (as above) on the rest
muon_lr = 4e-3                   # Muon's peak learning rate, in AdamW's units (updates of an AdamW-sized RMS)
muon_momentum = 0.95             # Muon's Nesterov momentum
muon_weight_decay = 0.1          # Muon's decoupled weight decay
muon_momentum_warmup = 0         # steps over which Muon's momentum rises from 0.85 to muon_momentum
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
fsdp = False                     # under torchrun: shard weights, gradients and optimizer state (FSDP2), not copy them
seed = 1337                      # seeds every random number generator (each rank adds its rank)
peak_flops = 0.0                 # FLOP/s of one device, for MFU; 0: from the GPU's name (H100, A100, ...)
# modes
eval_only = False                # evaluate the model (validation loss, HellaSwag, samples) and exit
benchmark = False                # time training steps on random tokens and print tokens/s, MFU, memory
profile = ""                     # with benchmark: write a torch.profiler trace of 3 steps into this directory
export_hf = ""                   # write the model as a Hugging Face directory here and exit
SETTINGS = settings_of(globals())  # as written above; main() rewrites the constants themselves for the run

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
    tie_head: bool = True    # the output head is the token embedding, as in GPT-2

    @property
    def padded_vocab_size(self):
        # Matmuls over a multiple of 64 run faster; the extra rows are never read or predicted.
        return (self.vocab_size + 63) // 64 * 64


class KVCache:
    """The keys and values of the positions seen so far, so that each new position costs the model one: per layer
    (keys, values), each (B, nh, length, hs), made at the first write in the dtype of the keys (autocast's or
    the weights'), filled up to pos."""

    def __init__(self, n_layer, length):
        self.layers, self.length, self.pos = [None] * n_layer, length, 0


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_index):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer_index = layer_index

    def forward(self, x, cache=None):
        """x (B, T, C); in generation and HellaSwag, cache is a KVCache of the positions before these T."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        else:
            if cache.layers[self.layer_index] is None:
                shape = (B, self.n_head, cache.length, C // self.n_head)
                cache.layers[self.layer_index] = (k.new_empty(shape), v.new_empty(shape))
            keys, values = cache.layers[self.layer_index]
            start, end = cache.pos, cache.pos + T
            keys[:, :, start:end], values[:, :, start:end] = k, v
            # New query i sits at position start + i and may see every position up to it.
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)
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
        if config.tie_head:
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
        """(..., n_embd) -> (..., vocab_size): only the real rows of the padded head, so that no padded id is
        ever predicted, and the logits come out whole rather than as a slice to be copied."""
        return F.linear(hidden, self.lm_head.weight[:self.config.vocab_size])

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab_size), and the mean cross-entropy if targets (B, T) are given."""
        # Through the class: under FSDP the instance's own hidden_states and logits gather the root's weights (for
        # generation and HellaSwag), which forward has done already; again would double the root's all-gathers.
        logits = GPT.logits(self, GPT.hidden_states(self, idx))
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls with the weights (an untied token embedding is a lookup,
        no matmul), 12 L H Q T for attention."""
        c = self.config
        matmul_params = self.num_params() - (0 if c.tie_head else self.transformer.wte.weight.numel())
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def kv_cache(self, length):
        """An empty KVCache for up to length positions (generation, HellaSwag's contexts and endings)."""
        return KVCache(self.config.n_layer, length)

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 (gpt2[-medium|-large|-xl]) from the Hugging Face hub, or a directory save_pretrained wrote."""
        from huggingface import load_gpt2
        return load_gpt2(cls, GPTConfig, name_or_dir, dropout)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 generator=None, use_cache=True):
        """Continue the (B, T) token ids idx: yield max_new_tokens times a (B,) tensor of next tokens. Run the
        model in eval mode.

        temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose probability
        reaches p; repetition_penalty > 1 makes every token already in the text less likely (as CTRL and
        transformers do it). With use_cache=False every token recomputes the whole context: the reference that
        the cache must equal. Past block_size the context restarts from its last block_size // 2 tokens (one
        prefill, then one position a token again): the positions are learned, so a token's keys and values depend
        on where it sits, and the cache cannot just drop its oldest position."""
        seen = None  # (B, vocab_size): which tokens the text holds so far, for the repetition penalty
        if repetition_penalty != 1.0:
            seen = torch.zeros(idx.size(0), self.config.vocab_size, dtype=torch.bool, device=idx.device)
            seen.scatter_(1, idx, True)
        context, cache = idx, None
        for _ in range(max_new_tokens):
            if context.size(1) > self.config.block_size:
                context, cache = context[:, -(self.config.block_size // 2):], None
            if cache is not None:
                hidden = self.hidden_states(context[:, -1:], cache)  # only the newest token: the rest is cached
            else:
                cache = self.kv_cache(self.config.block_size) if use_cache else None
                hidden = self.hidden_states(context, cache)
            logits = self.logits(hidden[:, -1]).float()  # only the last position predicts: (B, vocab_size)
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
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(mass_before >= top_p, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)

# -----------------------------------------------------------------------------
# Data: uint16 token shards, memory-mapped, or a .txt file tokenized in memory

# Where tiny Shakespeare comes from when input.txt is missing, and what it must hash to.
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def find_data(data_dir, vocab_size, partial_data=False):
    """(train, val): lists of token sources, each a shard path or an in-memory uint16 array (of a .txt file)."""
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
        train, val = split_text_tokens(tokens)  # the last tenth validates, as with fineweb.py --input FILE.txt
        return [train], [val]
    if os.path.isfile(data_dir):
        raise UserError(f"data_dir {data_dir} is a file but not a .txt file; give a text file (.txt) or a directory "
                        f"of token shards (python fineweb.py --input {data_dir} makes one from most formats)")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist; make the shards with python fineweb.py, "
                        f"or point --data_dir at a shard directory or a .txt file")
    manifest = os.path.join(data_dir, "manifest.json")  # fineweb.py's, marked complete at its end
    try:
        complete = json.load(open(manifest)).get("complete", True) if os.path.isfile(manifest) else True
    except (OSError, ValueError) as e:
        raise UserError(f"{manifest} cannot be read ({e}); run fineweb.py again to remake it") from None
    if not complete and not partial_data:
        raise UserError(f"{data_dir} is unfinished: its manifest.json lists shards of a corpus that fineweb.py has "
                        f"not finished; run the same fineweb.py command again to finish it (it resumes), or train on "
                        f"what is there with --partial_data")
    shards = sorted(os.path.join(data_dir, name) for name in os.listdir(data_dir) if name.endswith((".bin", ".npy")))
    train, val = ([s for s in shards if split in os.path.basename(s)] for split in ("train", "val"))
    if not train or not val:
        raise UserError(f"data_dir {data_dir} has {len(train)} training and {len(val)} validation shards (.bin or "
                        f".npy with 'train' or 'val' in the name); it needs at least one of each (python fineweb.py "
                        f"makes them)")
    for shard in shards:
        open_shard(shard, vocab_size, check_ids=False)  # headers and sizes now; the token ids as each is read
    return train, val


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
            raise UserError(f"every shard is shorter than one micro-batch of batch_size x block_size + 1 = "
                            f"{B * T + 1:,} tokens; lower --batch_size or --block_size")
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
# Schedule and optimizers


def get_lr(step, end=None):
    """Linear warmup to max_lr, then a cosine decay to min_lr at max_steps (or at end, if given)."""
    end = max_steps if end is None else end
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= end:
        return min_lr
    progress = (step - warmup_steps) / max(1, end - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizers(model, device_type):
    """The optimizers of a run, stepped together: [AdamW], or with optimizer=muon [Muon, AdamW], Muon taking
    the weight matrices inside the blocks and AdamW the embeddings, the head, biases and LayerNorm gains.
    AdamW decays its matrices and embeddings; biases and gains stay free. Each group keeps its peak rate as
    peak_lr: the schedule scales them all alike. On CUDA the fused AdamW updates every parameter in one launch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = []
    if optimizer == "muon":
        matrices = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        optimizers.append(Muon(matrices, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay))
        params = [p for p in params if not any(p is m for m in matrices)]
    # An untied model's embeddings have a group of their own only at a rate of their own. A tied embedding is the
    # head, and trains at the head's rate, max_lr.
    untied = embedding_lr and not model.config.tie_head
    embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight] if untied else []
    params = [p for p in params if not any(p is q for q in embeddings)]
    groups = [{"params": embeddings, "weight_decay": weight_decay, "lr": embedding_lr or max_lr},
              {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizers.append(torch.optim.AdamW([group for group in groups if group["params"]], lr=max_lr,
                                        betas=(beta1, beta2), eps=adam_eps, fused=device_type == "cuda"))
    for group in (group for opt in optimizers for group in opt.param_groups):
        group["peak_lr"] = group["lr"]
    return optimizers


def newton_schulz(G, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to G, roughly: five steps of a quintic Newton-Schulz iteration in bfloat16,
    whose coefficients push small singular values up fast rather than converge (they land in about 0.7-1.2,
    which trains as well as exactly 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T  # the Gram matrix of the short side is the smaller one
    X.div_(X.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
    return X.T if G.size(0) > G.size(1) else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum whose update is orthogonalized (newton_schulz), then scaled to the
    RMS of an AdamW update, 0.2 sqrt(max(rows, columns)), so that its rate and decoupled weight decay read like
    AdamW's. The arithmetic of torch.optim.Muon with adjust_lr_fn="match_rms_adamw". Under FSDP a process holds
    some rows of each matrix: the momentum is elementwise and stays sharded, the update is gathered whole to be
    orthogonalized, and each process keeps its own rows of the result, with no more communication."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True))

    @torch.no_grad()
    def step(self, closure=None):  # closure: as torch.optim's signature has it (FSDP's state loading passes None)
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                momentum.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(momentum, group["momentum"])
                if hasattr(update, "full_tensor"):  # an FSDP shard
                    from torch.distributed.tensor import distribute_tensor
                    update = distribute_tensor(newton_schulz(update.full_tensor()), p.device_mesh, p.placements,
                                               src_data_rank=None)
                else:
                    update = newton_schulz(update)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * (0.2 * math.sqrt(max(p.shape))))


def set_lr(optimizers, step):
    """The schedule's rate for this step, each group at its own peak; Muon's momentum warming up."""
    lr = get_lr(step)
    rise = min(1.0, (step + 1) / muon_momentum_warmup) if muon_momentum_warmup else 1.0
    for group in (group for opt in optimizers for group in opt.param_groups):
        group["lr"] = lr * group["peak_lr"] / max_lr
        if "nesterov" in group:  # Muon's
            group["momentum"] = 0.85 + rise * (muon_momentum - 0.85)
    return lr

# -----------------------------------------------------------------------------
# Training: processes and devices, and the loop


def setup_system(device_name="", dtype_name="", shard=False):
    """Processes, device and precision from torchrun's environment and the settings, as a namespace:
    rank, local_rank, world_size, master, say (print on rank 0), device, device_type, dtype, autocast, fsdp
    (whether training shards the model: shard under torchrun; one process has nothing to shard)."""
    rank, local_rank, world_size = (int(os.environ.get(k, 0 if k != "WORLD_SIZE" else 1))
                                    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = device_name or next(name for name, ok in available.items() if ok)
    device_type = device.split(":")[0]
    if device_type not in available:
        raise UserError(f"--device takes cuda, cuda:N, mps or cpu, not '{device}'")
    if not available[device_type]:
        raise UserError(f"--device={device} is not available on this machine; try --device=cpu")
    if device_type == "cuda":
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process: DDP and NCCL
        # device_id binds NCCL to this process's GPU at once, so that no collective guesses the device. The others
        # wait at a collective while rank 0 alone writes a checkpoint (19 GB for gpt2-xl): an hour, not 10 minutes.
        cuda = device_type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None,
                                timeout=timedelta(hours=1))
    if dtype_name not in ("", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype={dtype_name}: choose bfloat16, float16 or float32")
    precision = dtype_name or ("float32" if device_type != "cuda" else  # V100, T4: fp16 with loss scaling
                               "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    fsdp_on = shard and dist.is_initialized()
    if fsdp_on and precision == "float16":
        raise UserError("--fsdp trains in bfloat16 or float32, not float16 (whose loss scaler would judge each "
                        "process's shard of the gradients apart): set --dtype=bfloat16, or float32 on older GPUs")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    # float32: no mixed precision. Under FSDP the gathered weights themselves are cast (shard_model): no autocast.
    dtype = getattr(torch, precision)
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32 and not fsdp_on)
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device,
                           say=print if rank == 0 else (lambda *args, **kwargs: None), device_type=device_type,
                           dtype=dtype, autocast=autocast, fsdp=fsdp_on)


def wrap_for_training(model, system):
    """(the module the training steps run through, its DDP wrapper or None). DDP first, then compile: the compiler
    then splits the graph at DDP's buckets, so that the gradient all-reduce overlaps the backward pass. Under
    FSDP the model is sharded in place and compiled block by block. Evaluation, sampling and checkpoints use
    the plain model (the sharded one, under FSDP)."""
    system.compiled = compile if compile is not None else system.device_type == "cuda"
    if system.fsdp:
        from fsdp import shard_model
        return shard_model(model, system.compiled, system.dtype), None
    ddp_model = None
    if dist.is_initialized():
        model = ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[system.local_rank] if system.device_type == "cuda" else None,
            gradient_as_bucket_view=True)
    return (torch.compile(model) if system.compiled else model), ddp_model


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) as a flag that the loop reads: the run then saves its last
    finished step at once and exits with status 0. Under torchrun every process must read it alike, in an
    all-reduce that waits for the device: a step's end reads it together with the loss (read), and a long
    step or evaluation looks at it every few seconds' worth of micro-batches (poll)."""
    SECONDS = 5.0  # torchrun kills its workers 30 s after the signal: a look at the flag at least this often

    def __init__(self, world_size, device):
        self.requested, self.world_size, self.device, self.every = False, world_size, device, 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        self.requested = True

    def read(self, loss_sum=None, seconds_per_micro_step=0.0):
        """(whether any process got a signal, the processes' mean loss_sum) in one all-reduce and one wait; the
        micro-batches between looks at the flag are set from the processes' mean time per micro-batch."""
        packed = torch.tensor([float(self.requested), seconds_per_micro_step], device=self.device)
        if loss_sum is not None:
            packed = torch.cat([packed, loss_sum.float().view(1)])
        if self.world_size > 1:
            dist.all_reduce(packed)  # summed: the loss and the time are means once divided, the flag is any
            packed /= self.world_size
        stop, seconds, *loss = packed.tolist()
        if self.world_size > 1 and seconds:
            self.every = max(1, int(self.SECONDS / max(seconds, 1e-6)))
        return stop > 0, (loss[0] if loss else None)

    def poll(self, i):
        """Before the i-th micro-batch of a step or an evaluation: whether a signal came. The first goes on
        without a look; under torchrun, the flag is read every `every` micro-batches, alike on every process."""
        if i == 0 or (self.world_size > 1 and i % self.every):
            return False
        return self.requested if self.world_size == 1 else self.read()[0]


class Stopped(Exception):
    """A stop signal reached the run: it saves its last finished step and exits."""


def forward_backward(step_model, ddp_model, x, y, micro_step, grad_accum_steps, scaler, autocast):
    """One micro-batch forward and backward, its gradients added to the step's; returns its share of the step's
    mean loss, detached (no wait for the device)."""
    if ddp_model is not None:
        # All-reduce the gradients only once they are complete, on the last micro-step's backward. FSDP
        # reduce-scatters at every micro-step instead: holding them whole until the last would put a full
        # float32 copy of the gradients on every process, the memory that sharding is there to save.
        ddp_model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
    with autocast:
        _, loss = step_model(x, y)  # the logits are not kept: (B, T, vocab) would live on into the next micro-step
    # Gradients add up over micro-steps: dividing makes the sum the mean over the whole batch.
    loss = loss / grad_accum_steps
    scaler.scale(loss).backward()
    return loss.detach()


def clip_gradients(model, optimizers, scaler):
    """Unscale (fp16) and clip the gradients to grad_clip; returns their global norm (a tensor: no wait)."""
    for opt in optimizers:
        scaler.unscale_(opt)
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the shards' norms summed
    torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip if grad_clip > 0 else float("inf"), norm)
    return norm


def train(model, step_model, ddp_model, checkpoint, system, grad_accum_steps):
    """The training loop: max_steps optimizer steps of total_batch_size tokens each, from step 0 or from where
    the checkpoint stopped, evaluating every eval_interval steps and saving every checkpoint_interval."""
    say, vocab, settings = system.say, model.config.vocab_size, run_settings()
    train_sources, val_sources = find_data(data_dir, vocab, partial_data)
    train_loader = DataLoader(train_sources, batch_size, block_size, system.rank, system.world_size, vocab,
                              shuffle=shuffle, seed=seed)
    val_loader = DataLoader(val_sources, batch_size, block_size, system.rank, system.world_size, vocab)
    hella = load_hellaswag_examples(hellaswag_data) if hellaswag else None
    optimizers = configure_optimizers(model, system.device_type)  # after sharding: the shards are the parameters
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)  # float16 only
    run = SimpleNamespace(model=model, optimizers=optimizers, scaler=scaler, train_loader=train_loader, step=0,
                          best_val_loss=float("inf"), best=None, good=None, pending=None, lowest_loss=float("inf"),
                          run_id=secrets.token_hex(4), wandb_id=None, checkpoints=checkpoints.checkpoint_paths(out_dir))
    if checkpoint is not None:
        checkpoints.restore_training_state(run, checkpoint, system)
        say(f"resuming from step {run.step} of {out_dir}")
        del checkpoint  # free the host copy of the weights and optimizer state
    wandb_run = None
    if system.master:  # run.json: the settings, the run's id, and the tokens per step that plot.py needs
        atomic_write(os.path.join(out_dir, "run.json"), lambda f: f.write(json.dumps(
            {"tokens_per_step": total_batch_size, "run_id": run.run_id, "settings": settings}, indent=1).encode()))
        if wandb_project:  # the same W&B run as before the checkpoint, if there was one
            wandb_run = WandbRun(wandb_project, wandb_run_name, config=settings, resume_id=run.wandb_id)
            run.wandb_id = wandb_run.id
    log = RunLog(os.path.join(out_dir, "log.txt"), system.master, wandb_run, curves=True)
    stops = StopSignals(system.world_size, system.device)
    say(f"{model.num_params():,} parameters | {system.world_size} processes x {grad_accum_steps} micro-steps x "
        f"{batch_size} x {block_size} tokens = {total_batch_size:,} tokens per step | {system.device}, "
        f"{str(system.dtype).removeprefix('torch.')}, compile {system.compiled}")
    say(memory_line(model, optimizers, system))
    if system.master:  # a checkpoint is about the weights and two AdamW moments
        checkpoints.check_room(out_dir, 3 * 4 * model.num_params(), keep_checkpoints, len(run.checkpoints))
    first_step, began, clock, failures = run.step, time.time(), None, 0
    try:
        if run.step == 0:
            run.best_val_loss = evaluate(0, model, val_loader, hella, system, log, stops)  # the baseline
        while run.step < max_steps:
            t0, start = time.time(), (train_loader.state_dict(), checkpoints.rng_state())
            lr = set_lr(optimizers, run.step)
            loss_sum = torch.zeros((), device=system.device)
            try:
                for micro_step in range(grad_accum_steps):
                    if stops.poll(micro_step):  # the unfinished step is dropped: back to its start, then save
                        rewind(run, start)
                        raise Stopped
                    x, y = to_device(train_loader.next_batch(), system.device)
                    loss_sum += forward_backward(step_model, ddp_model, x, y, micro_step, grad_accum_steps, scaler,
                                                 system.autocast)
            except UserError as e:  # a bad shard met on the way: keep the steps done so far, then stop with its message
                rewind(run, start)
                saved = checkpoints.save_checkpoint(run, settings, system)
                saved = f"the steps up to {run.step} are saved: " if saved else ""
                raise UserError(f"{e}; {saved}remake that shard, then resume with --init_from=resume "
                                f"--out_dir={out_dir}") from None
            norm = clip_gradients(model, optimizers, scaler)
            # The mean loss over the processes and whether any got a stop signal: the one wait for the device.
            stop, loss = stops.read(loss_sum, (time.time() - t0) / grad_accum_steps)
            norm = norm.item()
            updated = math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())
            if updated:
                for opt in optimizers:
                    scaler.step(opt)  # with fp16, the scaler itself skips steps whose gradients overflowed
            scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            checkpoints.judge_pending(run, loss, vocab)
            failures = 0 if updated else failures + 1
            if not updated:
                say(f"loss {loss}, gradient norm {norm}: update skipped")
                if failures >= 3:
                    raise UserError("non-finite loss or gradient norm for 3 steps in a row; "
                                    + checkpoints.resume_advice(run, out_dir, max_lr))
            if system.device_type == "cuda":
                torch.cuda.synchronize()  # so that the time below includes the optimizer step
            dt = time.time() - t0
            clock = clock or (time.time(), run.step + 1)  # the first step compiles: the time left from the others
            done_since = run.step + 1 - clock[1]
            left = (time.time() - clock[0]) / done_since * (max_steps - run.step - 1) if done_since else None
            tokens_per_second, mfu = total_batch_size / dt, estimate_mfu(model, total_batch_size / dt, system)
            unit = "GPU" if system.device_type == "cuda" else "process"
            log.record(run.step, "train", loss, [
                f"step {run.step + 1} of {max_steps}", f"lr {lr:.4e}",
                *([f"muon lr {lr * muon_lr / max_lr:.4e}"] if optimizer == "muon" else []),
                f"norm {norm:.4f}", f"{1000 * dt:.0f} ms", f"{tokens_per_second:,.0f} tok/s",
                *([f"{tokens_per_second / system.world_size:,.0f} tok/s per {unit}"] if system.world_size > 1 else []),
                *([f"mfu {mfu:.1f}%"] if mfu else []), *([f"{duration(left)} left"] if left is not None else [])],
                {"lr": lr, "grad_norm": norm, "tokens_per_second": tokens_per_second, **({"mfu": mfu} if mfu else {})})
            run.step += 1
            last = run.step == max_steps
            if stop:  # no evaluation: torchrun kills its workers 30 s after the signal, so save at once
                raise Stopped
            val_loss = None
            if run.step % eval_interval == 0 or last:
                val_loss = evaluate(run.step, model, val_loader, hella, system, log, stops)
                run.best_val_loss = min(run.best_val_loss, val_loss)
            if (run.step % checkpoint_interval == 0 or last) and \
                    not checkpoints.save_checkpoint(run, settings, system, val_loss) and last:
                raise UserError(f"step {run.step}: the model has non-finite weights, so no checkpoint was written; "
                                + checkpoints.resume_advice(run, out_dir, max_lr))
        steps = run.step - first_step
        say(f"done: {steps} steps, {steps * total_batch_size:,} tokens in {duration(time.time() - began)}; "
            f"best validation loss {run.best_val_loss:.4f}; checkpoints in {out_dir}")
    except Stopped:
        checkpoints.save_checkpoint(run, settings, system)
        say(f"stopped by a signal after step {run.step}; continue with: python train_gpt2.py --init_from=resume "
            f"--out_dir={shlex.quote(out_dir)}")
    say(next_commands(out_dir))
    if wandb_run is not None:
        wandb_run.finish()


def rewind(run, start):
    """Back to the start of a step that is dropped: its data position, random states and no gradients."""
    run.train_loader.load_state_dict(start[0])
    checkpoints.set_rng_state(start[1])
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)


def duration(seconds):
    """4h05m, 12m30s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def next_commands(out_dir):
    """What to do with a run once it ends: the commands for its own out_dir."""
    d, hf = shlex.quote(out_dir), shlex.quote(os.path.join(out_dir, "hf"))
    return "\n".join([
        "next:",
        f"  python sample.py --out_dir={d}                                   # sample from the newest checkpoint",
        f"  python plot.py {d}                                               # draw the curves",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} --max_steps=N   # train further: the cosine "
        f"is stretched to end at N",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} --export_hf={hf}   # a Hugging Face model"])

# -----------------------------------------------------------------------------
# Speed: MFU and memory, the benchmark, the micro-batch search

# Peak dense bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets (no sparsity), for MFU. The first
# name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12, "V100": 125e12,
              "T4": 65e12}


def estimate_mfu(model, tokens_per_second, system):
    """One device's model FLOPs utilization in %, or None when its peak is unknown: each process does
    1/world_size of the work on its own device."""
    peak = peak_flops or (next((flops for name, flops in PEAK_FLOPS.items()
                                if name in torch.cuda.get_device_name(system.device)), None)
                          if system.device_type == "cuda" else None)
    return 100 * model.flops_per_token() * tokens_per_second / system.world_size / peak if peak else None


def memory_line(model, optimizers, system):
    """The memory of the process holding the most: weights, gradients and optimizer state, from the shapes of its
    parameters (of its shards, under FSDP). AdamW keeps two moments of each of its parameters, Muon one."""
    def size(p):
        p = p.to_local() if hasattr(p, "to_local") else p
        return p.numel() * p.element_size()
    state = sum((2 if isinstance(opt, torch.optim.AdamW) else 1) * size(p)
                for opt in optimizers for group in opt.param_groups for p in group["params"])
    largest = torch.tensor([sum(map(size, model.parameters())), sum(size(p) for p in model.parameters()
                                                                   if p.requires_grad), state], device=system.device)
    if dist.is_initialized():
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    weights, gradients, state = largest.tolist()
    return (f"memory per process: {weights / 1e9:.3g} GB weights + {gradients / 1e9:.3g} GB gradients + "
            f"{state / 1e9:.3g} GB optimizer state = {(weights + gradients + state) / 1e9:.3g} GB before activations "
            f"({'sharded by FSDP' if system.fsdp else 'a whole copy on each process'}; from the shapes)")


def random_token_steps(model, step_model, ddp_model, system, batch, grad_accum_steps, moves=True):
    """A function that runs one real training step (the loop's, without its log) on one chunk of random tokens,
    again and again, and returns its loss: the benchmark's step, and the micro-batch search's (moves=False:
    learning rate 0, so the weights stay). Its optimizers are its own, their state made at the first update."""
    optimizers = configure_optimizers(model, system.device_type)
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, batch * block_size + 1, dtype=np.uint16)
    loader = DataLoader([tokens], batch, block_size, 0, 1, model.config.vocab_size)

    def step():
        set_lr(optimizers, warmup_steps)
        for group in (group for opt in optimizers for group in opt.param_groups):
            group["lr"] *= moves
        loss_sum = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = to_device(loader.next_batch(), system.device)
            loss_sum += forward_backward(step_model, ddp_model, x, y, micro_step, grad_accum_steps, scaler,
                                         system.autocast)
        clip_gradients(model, optimizers, scaler)
        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        return loss_sum.item()
    return step


def run_benchmark(step, model, system, warmup=3, measured=10):
    """--benchmark: time the real training step on random tokens after `warmup` steps of compilation and
    warm-up; print tokens/s, MFU and peak memory; with --profile, then trace three more steps."""
    def synchronize():
        if system.device_type == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        step()
    synchronize()
    if system.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(measured):
        loss = step()
    synchronize()
    seconds = (time.time() - t0) / measured
    tokens, unit = total_batch_size / seconds, "GPU" if system.device_type == "cuda" else "process"
    mfu = estimate_mfu(model, tokens, system)
    mfu = f"{mfu:.1f}% per {unit}" if mfu else "n/a (no peak FLOP/s known for this device: set --peak_flops)"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if system.device_type == "cuda" else "n/a (CPU)"
    system.say(f"benchmark: {model.num_params():,} parameters, {total_batch_size:,} tokens per step, loss {loss:.4f}")
    system.say(f"benchmark: {1000 * seconds:.1f} ms/step | {tokens:,.0f} tok/s | {tokens / system.world_size:,.0f} "
               f"tok/s per {unit} | mfu {mfu} | peak memory {memory}")
    if profile:
        from torch.profiler import ProfilerActivity, profile as profiler_of
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if system.device_type == "cuda" else [])
        with profiler_of(activities=activities) as profiler:
            for _ in range(3):
                step()
            synchronize()
        if system.master:
            os.makedirs(profile, exist_ok=True)
            profiler.export_chrome_trace(os.path.join(profile, "trace.json"))
            sort_by = "self_device_time_total" if system.device_type == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=10))
            print(f"profile: 3 steps, trace in {os.path.join(profile, 'trace.json')}")


def micro_batches(world_size):
    """The micro-batches that keep total_batch_size with gradient accumulation: the powers of two that divide
    each process's sequences per step, largest first."""
    sequences, rest = divmod(total_batch_size, block_size * world_size)
    return [] if rest else [b for b in (2 ** i for i in range(sequences.bit_length(), -1, -1)) if sequences % b == 0]


def search_batch_size(model, ddp_model, system):
    """--batch_size=auto: the largest micro-batch that keeps total_batch_size and fits on every process. On CUDA
    each candidate, largest first, gets two real training steps (eager, through DDP where it runs; the second
    holds AdamW's moments, made at the first). Elsewhere no search: the default, or the largest below it."""
    candidates, default = micro_batches(system.world_size), SETTINGS["batch_size"]
    if not candidates:
        raise UserError(f"total_batch_size {total_batch_size:,} is not a multiple of block_size x processes = "
                        f"{block_size} x {system.world_size}; --batch_size=auto needs one")
    if system.device_type != "cuda":
        batch = next((b for b in candidates if b <= default), 1)
        system.say(f"auto batch_size: {batch} (the default {default} or the largest below it that keeps "
                   f"total_batch_size: the search runs on CUDA only)")
        return batch
    rng, out_of_memory = checkpoints.rng_state(), []
    for batch in candidates:
        try:
            step = random_token_steps(model, ddp_model or model, ddp_model, system, batch, 1, moves=False)
            step(), step()
            fits = torch.tensor(1.0, device=system.device)
        except torch.OutOfMemoryError:
            fits = torch.tensor(0.0, device=system.device)
        torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # it must fit on every process
        if fits.item():
            checkpoints.set_rng_state(rng)
            tried = ", ".join(f"{b}: out of memory" for b in out_of_memory) or \
                "the largest candidate; a larger one may fit"
            system.say(f"auto batch_size: {batch} ({tried})")
            return batch
        out_of_memory.append(batch)
    raise UserError(f"not even a micro-batch of 1 sequence fits on {system.device}; try --activation_checkpointing, "
                    f"a shorter --block_size or a smaller model")

# -----------------------------------------------------------------------------
# Evaluation: validation loss, samples, HellaSwag


@torch.no_grad()
def validation_loss(model, loader, steps, system, stops=None):
    """Mean loss over the first `steps` micro-batches of the validation data: the same ones every time."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=system.device)
    for i in range(steps):
        if stops is not None and stops.poll(i):
            raise Stopped
        x, y = to_device(loader.next_batch(), system.device)
        with system.autocast:
            total += model(x, y)[1]
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    model.train()
    return total.item() / steps


def samples(model, system):
    """A few top-k 50 samples from the prompt (an empty one starts a new document), as text. The generator is
    seeded alike every time, so the training's random state is untouched and the samples of two evaluations
    differ only by the weights."""
    enc = get_tokenizer()
    tokens = enc.encode(sample_prompt, allowed_special="all") if sample_prompt else [enc.eot_token]
    if max(tokens) >= model.config.vocab_size:
        raise UserError(f"the samples' prompt holds GPT-2 token {max(tokens)}, outside the model's vocab_size "
                        f"{model.config.vocab_size}; set --num_samples=0 for a model of another vocabulary")
    idx = torch.tensor(tokens[-model.config.block_size // 2:], device=system.device).repeat(num_samples, 1)
    generator = torch.Generator(device=system.device).manual_seed(seed + system.rank)
    model.eval()
    # Under FSDP the blocks are compiled in place: a cache one position longer at each token would recompile them.
    with system.autocast, torch.compiler.set_stance("force_eager"):
        tokens = torch.stack(list(model.generate(idx, sample_length, top_k=50, generator=generator)), dim=1)
    model.train()
    return [enc.decode(row) for row in torch.cat([idx, tokens], dim=1).tolist()]


def evaluate(step, model, val_loader, hellaswag_examples, system, log, stops=None):
    """Validation loss, HellaSwag and samples of the plain (uncompiled, unwrapped) model after `step` steps,
    recorded in `log`. Returns the validation loss. A stop signal meanwhile raises Stopped."""
    val_loss = validation_loss(model, val_loader, math.ceil(eval_iters / system.world_size), system, stops)
    perplexity = math.exp(min(val_loss, 50))
    log.record(step, "val", val_loss, [f"perplexity {perplexity:.2f}"], {"perplexity": perplexity})
    if hellaswag_examples is not None:
        model.eval()
        with torch.compiler.set_stance("force_eager"):  # FSDP's compiled blocks would recompile at each batch shape
            result = hellaswag_evaluate(model, hellaswag_examples, system.device, system.dtype, rank=system.rank,
                                        world_size=system.world_size, stop=stops.poll if stops else None)
        model.train()
        if result is None:
            raise Stopped
        acc, acc_norm, count = result
        log.record(step, "hella", acc_norm, [f"acc {acc:.4f} over {count} examples"], {"acc": acc})
    # Rank 0 samples; under FSDP every rank takes part, each forward pass gathering the weights from them all.
    texts = samples(model, system) if num_samples > 0 and (system.master or system.fsdp) else []
    for i, text in enumerate(texts if system.master else []):
        print(f"sample {i}: {text}")
    log.evaluated(step, texts)
    return val_loss

# -----------------------------------------------------------------------------
# Main: the settings, the model, then the mode asked for

# What this invocation does, as opposed to what the run is: a resumed run takes the rest from its checkpoint.
MODES = ("init_from", "eval_only", "benchmark", "profile", "export_hf")
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "tie_head")
# The settings that take a number within a range (configurator.check_ranges says the words).
RANGES = {**dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
                           "eval_interval", "eval_iters", "checkpoint_interval", "keep_checkpoints"), ">= 1"),
          **dict.fromkeys(("max_steps", "warmup_steps", "num_samples", "sample_length", "min_lr", "weight_decay",
                           "grad_clip", "muon_weight_decay", "peak_flops", "embedding_lr",
                           "muon_momentum_warmup"), ">= 0"),
          **dict.fromkeys(("max_lr", "muon_lr", "adam_eps"), "> 0"),
          **dict.fromkeys(("dropout", "beta1", "beta2", "muon_momentum"), "[0, 1)")}


def run_settings():
    """The run's settings, as the constants now hold them (the names of SETTINGS, and any added since)."""
    return {name: globals()[name] for name in SETTINGS}


def parse_settings(argv):
    """The settings from the command line and config files: (settings, {name: where its value came from})."""
    configs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "*.py")))
    doc = f"{__doc__.strip()}\n\nconfig files: {', '.join('config/' + os.path.basename(path) for path in configs)}"
    return parse_command_line(argv, SETTINGS, doc, __file__, auto=("batch_size",), config_files=True)


def settings_for_run(settings, sources, saved):
    """(settings, lines to print). A new run prints each setting that differs from the constants as written,
    with where its value came from. A resumed run goes on with the settings saved in its checkpoint, but for
    MODES (what this invocation does); flags and config files override them, and each change is said."""
    if saved is None:
        lines = [f"  {name} = {settings[name]!r}".ljust(44) + f"# {sources[name]}" for name in SETTINGS
                 if name in sources and settings[name] != SETTINGS[name]]
        head = f"settings that differ from the top of {os.path.basename(__file__)}:"
        return settings, [head, *lines] if lines else []
    saved = {name: value for name, value in saved.items() if name in SETTINGS and name not in MODES}
    if "optimizer" in sources and settings["optimizer"] != saved["optimizer"]:
        raise UserError(f"the run used --optimizer={saved['optimizer']} (given {settings['optimizer']}); its "
                        f"checkpoint holds that optimizer's state: leave out --optimizer to resume")
    changes = [f"changed: --{name} {saved[name]} -> {settings[name]}" for name in sorted(sources)
               if name in saved and saved[name] != settings[name] and name not in SHAPE]
    return {**settings, **saved, **{name: settings[name] for name in sources}}, changes


def check_settings():
    """Refuse settings that cannot make a model or a run, with one line that says what to change."""
    check_ranges(run_settings(), RANGES)
    if n_embd % n_head:
        nearest = min((h for h in range(1, n_embd + 1) if n_embd % h == 0), key=lambda h: abs(h - n_head))
        raise UserError(f"--n_head={n_head} does not divide --n_embd={n_embd}: each head takes "
                        f"n_embd / n_head channels; try --n_head={nearest}")
    if optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer takes adamw or muon, not '{optimizer}'")
    if fsdp and batch_size == "auto":
        raise UserError("--batch_size=auto does not search under --fsdp (it tries the whole model on one GPU); "
                        "give --batch_size=N")
    if profile and not benchmark:
        raise UserError(f"--profile={profile} profiles the benchmark's steps: add --benchmark, or leave out --profile")


def load_model(init_from, out_dir="log", dropout=None, checkpoint=None):
    """(model, checkpoint) for init_from = resume, a checkpoint file, a GPT-2 name or a Hugging Face
    directory; checkpoint is None for the last two. dropout, if given, replaces the model's own."""
    if init_from == "scratch":
        raise UserError("--init_from=scratch has no model to load; give resume, a checkpoint file, "
                        "a GPT-2 name or a Hugging Face directory")
    checkpoint = checkpoint or checkpoints.checkpoint_of(init_from, out_dir)
    if checkpoint is None:
        return GPT.from_pretrained(init_from, dropout=dropout or 0.0), None
    model = GPT(GPTConfig(**{**checkpoint["config"], **({} if dropout is None else {"dropout": dropout})}))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def make_model(sources, checkpoint):
    """The model the settings ask for: new, or loaded from init_from. A loaded model's shape is its own: the shape
    settings take its values; one that a config file set yields with a line, one given as a flag is refused."""
    if init_from == "scratch":
        model = GPT(GPTConfig(**{name: globals()[name] for name in SHAPE}, dropout=dropout,
                              activation_checkpointing=activation_checkpointing))
        for module in model.modules() if zero_init else []:
            if getattr(module, "RESIDUAL_SCALE", False):
                nn.init.zeros_(module.weight)
        return model
    model, _ = load_model(init_from, out_dir, dropout=dropout, checkpoint=checkpoint)
    for name in SHAPE:
        own, value, source = getattr(model.config, name), globals()[name], sources.get(name, "")
        if value == own or (name == "block_size" and value < own):  # a shorter context is fine, to fine-tune say
            continue
        if source.startswith("--"):
            raise UserError(f"--block_size={value} is longer than the model's context of {own} tokens; set "
                            f"--block_size={own} or less" if name == "block_size" else
                            f"the model of --init_from={init_from} has --{name}={own} (given {value}); "
                            f"leave out --{name}: a loaded model keeps its shape")
        if source:
            print(f"{name} = {value!r} ({source}) yields to the loaded model's {own!r}")
        globals()[name] = own
    check_settings()
    model.config.activation_checkpointing = activation_checkpointing
    return model


def run(argv):
    """Read the settings, make or load the model, and run the mode asked for."""
    settings, sources = parse_settings(argv)
    checkpoint = checkpoints.checkpoint_of(settings["init_from"], settings["out_dir"])
    resuming = checkpoints.resumes(settings["init_from"], settings["out_dir"], checkpoint)
    settings, lines = settings_for_run(settings, sources, checkpoint["settings"] if resuming else None)
    globals().update(settings)  # from here on, every constant of this file holds the run's value
    if resuming and max_steps != checkpoint["settings"]["max_steps"]:  # training further stretches the cosine
        step, before = checkpoint["step"], checkpoint["settings"]["max_steps"]
        lines.append(f"the cosine now ends at step {max_steps}, not {before}: the rate at step {step} goes from "
                     f"{get_lr(step, before):.4e} to {get_lr(step):.4e}")
    check_settings()  # before anything slow; again once a loaded model gives the shape
    training = not (export_hf or benchmark or eval_only)
    system = setup_system(device, dtype, fsdp and (training or benchmark))
    owned, succeeded = (None, False), False  # rank 0's (lock, whether it made out_dir) while it trains
    if training and system.master:
        owned = checkpoints.claim_out_dir(out_dir, resuming, checkpoint["step"] if resuming else None)
    elif (eval_only or export_hf) and system.master:  # where they write, before the model is built
        check_writable_dir(*((export_hf, "export_hf") if export_hf else (out_dir, "out_dir")))
    for line in lines:
        system.say(line)
    if fsdp and (training or benchmark) and not system.fsdp:
        print("--fsdp: one process has nothing to shard, so it runs as a single process; "
              "start it with torchrun --nproc_per_node=N to shard the model across N")
    try:
        torch.manual_seed(seed + system.rank)
        model = make_model(sources, checkpoint)
        if export_hf:
            from huggingface import save_hf
            save_hf(model, export_hf)
            return print(f"wrote {export_hf}")
        model.to(system.device)
        step_model, ddp_model = wrap_for_training(model, system)
        if batch_size == "auto":
            globals()["batch_size"] = search_batch_size(model, ddp_model, system)
        micro_batch = batch_size * block_size * system.world_size
        if total_batch_size % micro_batch:  # before any data is read
            raise UserError(f"total_batch_size {total_batch_size:,} is not a multiple of batch_size x block_size x "
                            f"processes = {batch_size} x {block_size} x {system.world_size} = {micro_batch:,}; "
                            f"change one")
        grad_accum_steps = total_batch_size // micro_batch
        if benchmark:
            step = random_token_steps(model, step_model, ddp_model, system, batch_size, grad_accum_steps)
            return run_benchmark(step, model, system)
        if eval_only:
            step = checkpoint["step"] if checkpoint else 0
            val_loader = DataLoader(find_data(data_dir, vocab_size)[1], batch_size, block_size, system.rank,
                                    system.world_size, vocab_size)
            system.say(f"evaluating --init_from={init_from} (after {step} steps); the results go to "
                       f"{out_dir}/evals.txt")
            # evals.txt, not log.txt: that stays the record of training, where each step appears once.
            return evaluate(step, model, val_loader, load_hellaswag_examples(hellaswag_data) if hellaswag else None,
                            system, RunLog(os.path.join(out_dir, "evals.txt"), system.master))
        train(model, step_model, ddp_model, checkpoint if resuming else None, system, grad_accum_steps)
        succeeded = True
    except torch.OutOfMemoryError:
        if batch_size == "auto":  # out of memory before the search: the model alone does not fit
            raise UserError(f"out of memory on {system.device} before any micro-batch was tried; try "
                            f"--activation_checkpointing or a smaller model") from None
        smaller = [b for b in micro_batches(system.world_size) if b < batch_size]
        hint = f"try --batch_size={smaller[0]} or --batch_size=auto" if smaller else \
            "try --activation_checkpointing, a shorter --block_size or a smaller model"
        raise UserError(f"out of memory on {system.device} with micro-batch {batch_size} x {block_size} tokens; "
                        f"{hint} (gradient accumulation keeps total_batch_size={total_batch_size:,})") from None
    finally:
        if training and system.master:
            checkpoints.release_out_dir(out_dir, *owned, succeeded)


def main(argv=None):
    # Until the training loop takes the stop signals over, SIGTERM ends the run as Ctrl-C does.
    run_main(run, sys.argv[1:] if argv is None else argv, sigterm_exits=True)


if __name__ == "__main__":
    main()
