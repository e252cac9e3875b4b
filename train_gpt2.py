"""
Train GPT-2 from scratch, or from OpenAI's weights, on uint16 token shards.

    python train_gpt2.py config/shakespeare.py        # a small model on input.txt, a few CPU minutes
    python train_gpt2.py                              # GPT-2 124M on FineWeb-Edu 10B (python fineweb.py first)
    torchrun --nproc_per_node=8 train_gpt2.py         # the same on 8 GPUs
    python train_gpt2.py --init_from=resume --out_dir=log/shakespeare   # go on where a run stopped
    python train_gpt2.py --help                       # every setting, its default and what it does

The file reads top to bottom: settings, model, data, schedule and optimizers, training, evaluation, checkpoints,
main. What every script shares is in common.py; what serves one mode or backend has a file of its own: fsdp.py,
huggingface.py (OpenAI's weights, --export_hf), bench/speed.py (--benchmark, --batch_size=auto).
"""

import json
import math
import os
import secrets
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bench.speed as bench_speed
from common import (StopSignals, Stopped, UserError, atomic_write, check_ranges, check_room, check_token_ids,
                    check_writable_dir, checkpoint_paths, claim_out_dir, device_type_of, download, duration, every_rank,
                    first_on_each_node, get_tokenizer, judge_pending, list_shards, load_torch_file, next_commands,
                    on_rank_zero, open_shard, parse_command_line, pick_device, pick_dtype, release_out_dir,
                    resume_advice, rng_state, rotate_checkpoints, run_main, set_rng_state, settings_for_run,
                    settings_of, split_text_tokens)
from fsdp import all_finite, full_state_dicts, load_optimizer_state, memory_per_process, muon, shard_model, whole
from hellaswag import evaluate as hellaswag_evaluate, load_for_training as load_hellaswag_examples
from plot import RunLog, WandbRun
from sample import generate

# -----------------------------------------------------------------------------
# Settings. The defaults are the GPT-2 124M recipe on FineWeb-Edu 10B.
# The comment after each constant is its --help text. Edit them here, set them in a config file of
# `name = value` lines (config/shakespeare.py), or pass --name=value: the flags win, then the config files.

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
recipe = "gpt2"                  # gpt2: the settings as written here; fast: FAST below in place of those it names
max_steps = 19073                # optimizer steps: 10B tokens / 2**19 tokens per step
warmup_steps = 715               # linear warmup from 0 to max_lr
schedule = "cosine"              # cosine: warmup, then a cosine to min_lr; wsd: warmup, max_lr, then linear to min_lr
warmdown = 0.5                   # with schedule=wsd: the last fraction of max_steps, spent decaying to min_lr
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
SETTINGS = settings_of(globals())

# --recipe=fast: these values in place of the constants above; a flag or a config file still wins. Each choice and
# the measurement behind it: docs/optimizers.md.
FAST = dict(optimizer="muon", max_lr=4e-3, min_lr=4e-4, beta1=0.8, embedding_lr=5e-2, tie_head=False, zero_init=True,
            muon_momentum_warmup=300)

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
        """x (B, T, C); in generation, cache is a KVCache (sample.py) of the positions before these T."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
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

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, vocab_size), and the mean cross-entropy if targets (B, T) are given."""
        # Through the class: under FSDP the instance's own hidden_states and logits gather the root's weights (for
        # generation and HellaSwag), which forward has done already; again would double the root's all-gathers.
        logits = GPT.logits(self, GPT.hidden_states(self, idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls with the weights (an untied token embedding is a lookup,
        no matmul), 12 L H Q T for attention."""
        c = self.config
        untied = 0 if c.tie_head else self.transformer.wte.weight.numel()
        return 6 * (self.num_params() - untied) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 (gpt2[-medium|-large|-xl]) from the Hugging Face hub, or a directory save_pretrained wrote."""
        from huggingface import load_gpt2
        return load_gpt2(cls, GPTConfig, name_or_dir, dropout)

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
    return list_shards(data_dir, vocab_size, partial_data)


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
        if "position" in state:  # written before epochs were counted: {"shard", "position": token offset}
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
# Schedule and optimizers


def get_lr(step, warmup_steps, max_steps, max_lr, min_lr, warmdown=None):
    """Linear warmup to max_lr, then a cosine decay to min_lr at max_steps; or, given warmdown, max_lr until the
    last warmdown fraction of max_steps, and a straight line down to min_lr over it (warmup-stable-decay)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if warmdown is not None:
        left = (max_steps - step) / max(1, round(warmdown * max_steps))
        return min_lr + min(1.0, left) * (max_lr - min_lr)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizers(model, cfg, device_type):
    """The optimizers of a run, stepped together: [AdamW], or with --optimizer=muon [Muon, AdamW], Muon taking
    the weight matrices inside the blocks and AdamW the embeddings, the head, biases and LayerNorm gains.
    AdamW decays its matrices and embeddings; biases and gains stay free. Each group keeps its peak rate as
    peak_lr: the schedule scales them all alike. On CUDA the fused AdamW updates every parameter in one launch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = []
    if cfg.optimizer == "muon":
        matrices = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        # match_rms_adamw scales each matrix's orthogonalized update to the RMS of an AdamW update, so that
        # Muon's learning rate and weight decay read like AdamW's.
        optimizers.append(muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                               weight_decay=cfg.muon_weight_decay, adjust_lr_fn="match_rms_adamw"))
        params = [p for p in params if not any(p is m for m in matrices)]
    # An untied model's embeddings have a group of their own only at a rate of their own: a checkpoint written
    # without one holds the groups below. A tied embedding is the head, and trains at the head's rate, max_lr.
    untied = cfg.embedding_lr and not model.config.tie_head
    embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight] if untied else []
    params = [p for p in params if not any(p is q for q in embeddings)]
    groups = [{"params": embeddings, "weight_decay": cfg.weight_decay, "lr": cfg.embedding_lr or cfg.max_lr},
              {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    optimizers.append(torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                        fused=device_type == "cuda"))
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["peak_lr"] = group["lr"]
    return optimizers

# -----------------------------------------------------------------------------
# Training: processes and devices, the step, and the loop


def setup_system(cfg):
    """Processes, device and precision from torchrun's environment and the settings, as a namespace:
    rank, local_rank, world_size, master, device, device_type, dtype, autocast, fsdp (whether training shards
    the model: --fsdp under torchrun; one process started without torchrun has nothing to shard)."""
    rank, local_rank, world_size = (int(os.environ.get(k, 0 if k != "WORLD_SIZE" else 1))
                                    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(cfg.device)
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process: DDP and NCCL
        # device_id binds NCCL to this process's GPU at once, so that no collective guesses the device. The others
        # wait at a collective while rank 0 alone writes a checkpoint (19 GB for gpt2-xl): an hour, not 10 minutes.
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None,
                                timeout=timedelta(hours=1))
    device_type = device_type_of(device)
    dtype = pick_dtype(cfg.dtype, device_type)
    # sample.py and hellaswag.py share this set-up and have no fsdp setting: they never shard.
    fsdp = getattr(cfg, "fsdp", False) and dist.is_initialized() and not (cfg.eval_only or cfg.export_hf)
    if fsdp and dtype == torch.float16:
        raise UserError("--fsdp trains in bfloat16 or float32, not float16 (whose loss scaler would judge each "
                        "process's shard of the gradients apart): set --dtype=bfloat16, or float32 on older GPUs")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    # float32: no mixed precision. Under FSDP the gathered weights themselves are cast (shard_model): no autocast.
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32 and not fsdp)
    return SimpleNamespace(rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device,
                           device_type=device_type, dtype=dtype, autocast=autocast, fsdp=fsdp)


def grad_accum_steps_for(cfg, world_size):
    """Micro-steps per optimizer step, so that processes x micro-steps x batch_size x block_size = total_batch_size."""
    micro_batch = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % micro_batch:
        raise UserError(f"total_batch_size {cfg.total_batch_size:,} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {cfg.block_size} x {world_size} = {micro_batch:,}; change one")
    return cfg.total_batch_size // micro_batch


def compiles(cfg, system):
    return cfg.compile if cfg.compile is not None else system.device_type == "cuda"


def wrap_for_training(model, cfg, system):
    """(the module the training steps run through, its DDP wrapper or None). DDP first, then compile: the compiler
    then splits the graph at DDP's buckets, so that the gradient all-reduce overlaps the backward pass. Under
    FSDP the model is sharded in place and compiled block by block. Evaluation, sampling and checkpoints use
    the plain model (the sharded one, under FSDP)."""
    if system.fsdp:
        return shard_model(model, compiles(cfg, system), system.dtype), None
    ddp_model = None
    if dist.is_initialized():
        model = ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[system.local_rank] if system.device_type == "cuda" else None,
            gradient_as_bucket_view=True)
    return (torch.compile(model) if compiles(cfg, system) else model), ddp_model


def train_step(step, model, ddp_model, optimizers, scaler, loader, cfg, system, grad_accum_steps, stops):
    """One optimizer step, all of it: the schedule's learning rate, grad_accum_steps micro-batches forward and
    backward, the gradients clipped, then the update, skipped if the loss or the gradient norm is not finite.
    Returns (loss, gradient norm, learning rate, whether a stop signal came, whether the weights were updated),
    or None when a signal comes between two micro-steps: that unfinished step is dropped, its gradients
    discarded."""
    lr = get_lr(step, cfg.warmup_steps, cfg.max_steps, cfg.max_lr, cfg.min_lr,
                cfg.warmdown if cfg.schedule == "wsd" else None)
    rise = min(1.0, (step + 1) / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup else 1.0
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["lr"] = lr * group["peak_lr"] / cfg.max_lr  # one schedule, each group at its own peak
        if "nesterov" in group:  # Muon's
            group["momentum"] = 0.85 + rise * (cfg.muon_momentum - 0.85)
    loss_sum, t0 = torch.zeros((), device=system.device), time.time()
    for micro_step in range(grad_accum_steps):
        if stops is not None and stops.poll(micro_step):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            return None
        x, y = to_device(loader.next_batch(), system.device)
        if ddp_model is not None:
            # All-reduce the gradients only once they are complete, on the last micro-step's backward. FSDP
            # reduce-scatters at every micro-step instead: holding them whole until the last would put a full
            # float32 copy of the gradients on every process, the memory that sharding is there to save.
            ddp_model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        with system.autocast:
            loss = model(x, y)[1]  # the logits are not kept: (B, T, vocab) would live on into the next micro-step
        # Gradients add up over micro-steps: dividing makes the sum the mean over the whole batch.
        loss = loss / grad_accum_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    parameters = [p for p in model.parameters() if p.grad is not None]
    # Under FSDP each process holds shards: whole() sums their partial norms across the processes.
    norm = whole(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
    torch.nn.utils.clip_grads_with_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), norm)
    seconds = (time.time() - t0) / grad_accum_steps
    loss, stop = (loss_sum.item(), False) if stops is None else stops.step_end(loss_sum, seconds)
    norm = norm.item()  # with the loss: the one wait for the device in a step
    updated = math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())
    if updated:
        for optimizer in optimizers:
            scaler.step(optimizer)  # with fp16, the scaler itself skips steps whose gradients overflowed
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss, norm, lr, stop, updated


def train(model, step_model, ddp_model, checkpoint, cfg, system, grad_accum_steps):
    """The training loop: cfg.max_steps optimizer steps of cfg.total_batch_size tokens each, from step 0 or
    from where the checkpoint stopped, evaluating every eval_interval steps and saving every checkpoint_interval."""
    say = print if system.master else (lambda *args, **kwargs: None)
    vocab = model.config.vocab_size
    train_sources, val_sources = find_data(cfg.data_dir, vocab, cfg.partial_data)
    train_loader = DataLoader(train_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab,
                              shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = DataLoader(val_sources, cfg.batch_size, cfg.block_size, system.rank, system.world_size, vocab)
    hella = load_hellaswag_examples(cfg.hellaswag_data) if cfg.hellaswag else None
    optimizers = configure_optimizers(model, cfg, system.device_type)  # after sharding: the shards are the parameters
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)  # float16 only
    run = SimpleNamespace(model=model, optimizers=optimizers, scaler=scaler, train_loader=train_loader, step=0,
                          best_val_loss=float("inf"), best=None, good=None, pending=None, lowest_loss=float("inf"),
                          run_id=secrets.token_hex(4), wandb_id=None,
                          checkpoints=checkpoint_paths(cfg.out_dir))  # a new run's out_dir holds none
    if checkpoint is not None:
        restore_training_state(run, checkpoint, cfg, system, say)
        say(f"resuming from step {run.step} of {cfg.out_dir}")
        del checkpoint  # free the host copy of the weights and optimizer state
    wandb_run = None
    if system.master:  # run.json: the settings, the run's id, and the tokens per step that plot.py needs
        atomic_write(os.path.join(cfg.out_dir, "run.json"), lambda f: f.write(json.dumps(
            {"tokens_per_step": cfg.total_batch_size, "run_id": run.run_id, "settings": vars(cfg)}, indent=1).encode()))
        if cfg.wandb_project:  # the same W&B run as before the checkpoint, if there was one
            wandb_run = WandbRun(cfg.wandb_project, cfg.wandb_run_name, config=vars(cfg), resume_id=run.wandb_id)
            run.wandb_id = wandb_run.id
    log = RunLog(os.path.join(cfg.out_dir, "log.txt"), system.master, wandb_run, curves=True)
    stops = StopSignals(system)
    flops, peak = model.flops_per_token(), bench_speed.device_peak_flops(system.device, cfg.peak_flops)
    say(f"{model.num_params():,} parameters | {system.world_size} processes x {grad_accum_steps} micro-steps x "
        f"{cfg.batch_size} x {cfg.block_size} tokens = {cfg.total_batch_size:,} tokens per step | {system.device}, "
        f"{str(system.dtype).removeprefix('torch.')}, compile {compiles(cfg, system)}")
    weights, line = memory_per_process(model, optimizers, system.device, system.fsdp)
    say(line)
    if system.master:  # a checkpoint is about the weights and two AdamW moments
        check_room(cfg.out_dir, 3 * weights, cfg.keep_checkpoints, len(run.checkpoints))
    unit = "GPU" if system.device_type == "cuda" else "process"
    first_step, began, clock, failures = run.step, time.time(), None, 0
    try:
        if run.step == 0:
            run.best_val_loss = evaluate(0, model, val_loader, hella, cfg, system, log, stops)  # the baseline
        while run.step < cfg.max_steps:
            t0, start = time.time(), (train_loader.state_dict(), rng_state(system.device_type))
            try:
                result = train_step(run.step, step_model, ddp_model, optimizers, scaler, train_loader, cfg, system,
                                    grad_accum_steps, stops)
            except UserError as e:  # a bad shard met on the way: keep the steps done so far, then stop with its message
                rewind(run, start)
                saved = f"the steps up to {run.step} are saved: " if save_checkpoint(run, cfg, system, say) else ""
                raise UserError(f"{e}; {saved}remake that shard, then resume with --init_from=resume "
                                f"--out_dir={cfg.out_dir}") from None
            if result is None:  # a stop signal between micro-steps: the unfinished step is dropped
                rewind(run, start)
                raise Stopped
            loss, norm, lr, stop, updated = result
            judge_pending(run, loss, vocab)
            failures = 0 if updated else failures + 1
            if not updated:
                say(f"loss {loss}, gradient norm {norm}: update skipped")
                if failures >= 3:
                    raise UserError("non-finite loss or gradient norm for 3 steps in a row; " + resume_advice(run, cfg))
            if system.device_type == "cuda":
                torch.cuda.synchronize()  # so that the time below includes the optimizer step
            dt = time.time() - t0
            if clock is None:  # the first step's time includes compilation and warm-up: estimate from the others
                clock = (time.time(), run.step + 1)
            done_since = run.step + 1 - clock[1]
            left = (time.time() - clock[0]) / done_since * (cfg.max_steps - run.step - 1) if done_since else None
            tokens_per_second, per_process, mfu = bench_speed.speed(cfg.total_batch_size, dt, system.world_size,
                                                                    flops, peak)
            log.record(run.step, "train", loss, [
                f"step {run.step + 1} of {cfg.max_steps}", f"lr {lr:.4e}",
                *([f"muon lr {lr * cfg.muon_lr / cfg.max_lr:.4e}"] if cfg.optimizer == "muon" else []),
                f"norm {norm:.4f}", f"{1000 * dt:.0f} ms",
                f"{tokens_per_second:,.0f} tok/s",
                *([f"{per_process:,.0f} tok/s per {unit}"] if system.world_size > 1 else []),
                *([f"mfu {mfu:.1f}%"] if mfu else []), *([f"{duration(left)} left"] if left is not None else [])],
                {"lr": lr, "grad_norm": norm, "tokens_per_second": tokens_per_second, **({"mfu": mfu} if mfu else {})})
            run.step += 1
            last = run.step == cfg.max_steps
            if stop:  # no evaluation: torchrun kills its workers 30 s after the signal, so save at once
                raise Stopped
            val_loss = None
            if run.step % cfg.eval_interval == 0 or last:
                val_loss = evaluate(run.step, model, val_loader, hella, cfg, system, log, stops)
                run.best_val_loss = min(run.best_val_loss, val_loss)
            if run.step % cfg.checkpoint_interval == 0 or last:
                if not save_checkpoint(run, cfg, system, say, val_loss) and last:
                    raise UserError(f"step {run.step}: the model has non-finite weights, so no checkpoint was written; "
                                    + resume_advice(run, cfg))
        steps = run.step - first_step
        say(f"done: {steps} steps, {steps * cfg.total_batch_size:,} tokens in {duration(time.time() - began)}; "
            f"best validation loss {run.best_val_loss:.4f}; checkpoints in {cfg.out_dir}")
    except Stopped:
        save_checkpoint(run, cfg, system, say)
        say(f"stopped by a signal after step {run.step}; continue with: python train_gpt2.py --init_from=resume "
            f"--out_dir={shlex.quote(cfg.out_dir)}")
    say(next_commands(cfg.out_dir))
    if wandb_run is not None:
        wandb_run.finish()


def rewind(run, start):
    """Back to the start of a step that is dropped: its data position and random states."""
    loader_state, rng = start
    run.train_loader.load_state_dict(loader_state)
    set_rng_state(rng)
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Evaluation: validation loss, samples, HellaSwag


@torch.no_grad()
def validation_loss(model, loader, steps, autocast, device, stops=None):
    """Mean loss over the first `steps` micro-batches of the validation data: the same ones every time."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for i in range(steps):
        if stops is not None and stops.poll(i):
            raise Stopped
        x, y = to_device(loader.next_batch(), device)
        with autocast:
            total += model(x, y)[1]
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    model.train()
    return total.item() / steps


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


def evaluate(step, model, val_loader, hellaswag_examples, cfg, system, log, stops=None):
    """Validation loss, HellaSwag and samples of the plain (uncompiled, unwrapped) model after `step` steps,
    recorded in `log`. Returns the validation loss. A stop signal meanwhile raises Stopped."""
    val_loss = validation_loss(model, val_loader, math.ceil(cfg.eval_iters / system.world_size), system.autocast,
                               system.device, stops)
    perplexity = math.exp(min(val_loss, 50))
    log.record(step, "val", val_loss, [f"perplexity {perplexity:.2f}"], {"perplexity": perplexity})
    if hellaswag_examples is not None:
        model.eval()
        stop = stops.poll if stops is not None else None
        with torch.compiler.set_stance("force_eager"):  # FSDP's compiled blocks would recompile at each batch shape
            result = hellaswag_evaluate(model, hellaswag_examples, system.device, system.dtype, rank=system.rank,
                                        world_size=system.world_size, stop=stop)
        model.train()
        if result is None:
            raise Stopped
        acc, acc_norm, count = result
        log.record(step, "hella", acc_norm, [f"acc {acc:.4f} over {count} examples"], {"acc": acc})
    # Rank 0 samples; under FSDP every rank takes part, each forward pass gathering the weights from them all.
    texts = samples(model, cfg, system) if cfg.num_samples > 0 and (system.master or system.fsdp) else []
    for i, text in enumerate(texts if system.master else []):
        print(f"sample {i}: {text}")
    log.evaluated(step, texts)
    return val_loss

# -----------------------------------------------------------------------------
# Checkpoints: everything a run needs to go on, written whole or not at all; loading a model from init_from

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def save_checkpoint(run, cfg, system, say, val_loss=None):
    """A checkpoint of everything the run needs to go on exactly where it is; never of non-finite weights.
    Keeps the newest keep_checkpoints of this run's checkpoints, its best (the lowest validation loss) and
    its last good one (one whose weights' training loss was below a uniform guess's), whatever the intervals:
    a run that blows up never pushes out the checkpoint to go back to. Returns whether one was written."""
    if not all_finite(run.model.parameters(), system.device):
        say(f"step {run.step}: the model has non-finite weights; no checkpoint written")
        return False
    rng = every_rank(rng_state(system.device_type))
    model_state, optimizer_states = full_state_dicts(run.model, run.optimizers, system.fsdp)  # every rank takes part
    if not system.master:
        return True
    path = os.path.join(cfg.out_dir, f"ckpt_{run.step:07d}.pt")
    if val_loss is not None and (run.best is None or val_loss <= run.best["val_loss"]):
        run.best = {"file": os.path.basename(path), "val_loss": val_loss, "max_lr": cfg.max_lr}
    run.pending = {"file": os.path.basename(path), "max_lr": cfg.max_lr}  # good or not: its next step's loss says
    state = {"model": model_state, "optimizers": optimizer_states, "scaler": run.scaler.state_dict(),
             "config": asdict(run.model.config), "settings": vars(cfg), "step": run.step,
             "loader": run.train_loader.state_dict(), "rng": rng, "val_loss": val_loss,
             "best_val_loss": run.best_val_loss, "best": run.best, "good": run.good, "lowest_loss": run.lowest_loss,
             "run_id": run.run_id, "wandb_id": run.wandb_id}
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-write leaves the previous checkpoint whole
    kept = {os.path.join(cfg.out_dir, good["file"]) for good in (run.best, run.good) if good}
    run.checkpoints = rotate_checkpoints(sorted(set(run.checkpoints) | {path}), cfg.keep_checkpoints, kept)
    say(f"saved {path}")
    return True


def restore_training_state(run, checkpoint, cfg, system, say):
    """Optimizers, loss scaler, data position, step and random states from a checkpoint of this run."""
    if "optimizers" not in checkpoint:
        raise UserError("the newest checkpoint holds a model but no training state to resume; start a new run "
                        "from its weights with --init_from=PATH_OF_THE_CHECKPOINT")
    for optimizer, state in zip(run.optimizers, checkpoint["optimizers"], strict=True):
        peaks = [group["peak_lr"] for group in optimizer.param_groups]  # this run's settings, not the saved ones
        load_optimizer_state(run.model, optimizer, state, system.fsdp)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["peak_lr"] = peak
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.train_loader.load_state_dict(checkpoint["loader"])
    run.step, run.best_val_loss, run.best, run.good = map(checkpoint.get, ("step", "best_val_loss", "best", "good"))
    run.run_id, run.wandb_id = checkpoint.get("run_id", run.run_id), checkpoint.get("wandb_id")
    run.lowest_loss = checkpoint.get("lowest_loss", float("inf"))
    rate = checkpoint.get("settings", {}).get("max_lr", cfg.max_lr)  # the rate that made the checkpoint
    run.pending = {"file": f"ckpt_{run.step:07d}.pt", "max_lr": rate}
    for good in (run.best, run.good):
        if good is not None:
            good.setdefault("max_lr", rate)
    rng = checkpoint["rng"]
    if len(rng) == system.world_size:
        set_rng_state(rng[system.rank])
    else:
        say(f"note: the checkpoint was written by {len(rng)} processes, not {system.world_size}: random states "
            f"start afresh")


def load_checkpoint(path):
    """A checkpoint dict of this script, loaded safely and mapped from its file (common.load_torch_file)."""
    checkpoint = load_torch_file(path)
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
    if not init_from.endswith(".pt") and not os.path.isfile(init_from):
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

# -----------------------------------------------------------------------------
# Main: settings, model, then the mode asked for

# What a run is, as opposed to what this invocation does: a resumed run takes these from its checkpoint.
MODES = ("init_from", "eval_only", "benchmark", "profile", "export_hf")
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "tie_head")


def parse_settings(argv):
    """train_gpt2.py's settings from its command line and config files: (settings, {name: where it came from})."""
    fast = f"--recipe=fast sets {', '.join(f'{k}={v}' for k, v in FAST.items())}: docs/optimizers.md says why"
    return parse_command_line(argv, SETTINGS, f"{__doc__.strip()}\n\n{fast}", __file__, auto=("batch_size",),
                              config_files=True)


# The settings that take a number within a range (common.check_ranges says the words): the interface's limits.
RANGES = {**dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "total_batch_size",
                           "eval_interval", "eval_iters", "checkpoint_interval", "keep_checkpoints"), ">= 1"),
          **dict.fromkeys(("max_steps", "warmup_steps", "num_samples", "sample_length", "min_lr", "weight_decay",
                           "grad_clip", "muon_weight_decay", "peak_flops", "embedding_lr",
                           "muon_momentum_warmup"), ">= 0"),
          **dict.fromkeys(("max_lr", "muon_lr", "adam_eps"), "> 0"), "warmdown": "(0, 1]",
          **dict.fromkeys(("dropout", "beta1", "beta2", "muon_momentum"), "[0, 1)")}


def check_settings(cfg):
    """Refuse settings that cannot make a model or a run, with one line that says what to change."""
    check_ranges(vars(cfg), RANGES)
    if cfg.n_embd % cfg.n_head:
        nearest = min((h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0), key=lambda h: abs(h - cfg.n_head))
        raise UserError(f"--n_head={cfg.n_head} does not divide --n_embd={cfg.n_embd}: each head takes "
                        f"n_embd / n_head channels; try --n_head={nearest}")
    allowed = {"recipe": ("gpt2", "fast"), "optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd")}
    for name, choices in allowed.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"--{name} takes {' or '.join(choices)}, not '{getattr(cfg, name)}'")
    if cfg.fsdp and cfg.batch_size == "auto":
        raise UserError("--batch_size=auto does not search under --fsdp (it tries the whole model on one GPU); "
                        "give --batch_size=N")
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer=muon needs torch 2.9 or newer (this is torch {torch.__version__}): "
                        f"pip install -U torch, or train with --optimizer=adamw")
    if cfg.profile and not cfg.benchmark:
        raise UserError(f"--profile={cfg.profile} profiles the benchmark's steps: add --benchmark, or leave out "
                        f"--profile")


def make_model(cfg, given, checkpoint):
    """The model the settings ask for: new, or loaded from init_from. A loaded model's shape is its own: the
    shape settings take its values, and one given on the command line that differs is refused."""
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(**{name: getattr(cfg, name) for name in SHAPE}, dropout=cfg.dropout,
                              activation_checkpointing=cfg.activation_checkpointing))
        for module in model.modules() if cfg.zero_init else []:
            if getattr(module, "RESIDUAL_SCALE", False):
                nn.init.zeros_(module.weight)
        return model
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


def evaluate_only(model, checkpoint, cfg, system):
    """Evaluate the model once. The records go to {out_dir}/evals.txt: log.txt stays the record of training,
    where each step appears once."""
    step = checkpoint["step"] if checkpoint else 0
    vocab = model.config.vocab_size
    val_loader = DataLoader(find_data(cfg.data_dir, vocab)[1], cfg.batch_size, cfg.block_size, system.rank,
                            system.world_size, vocab)
    hella = load_hellaswag_examples(cfg.hellaswag_data) if cfg.hellaswag else None
    if system.master:
        print(f"evaluating --init_from={cfg.init_from} (after {step} steps); the results go to {cfg.out_dir}/evals.txt")
    evaluate(step, model, val_loader, hella, cfg, system, RunLog(os.path.join(cfg.out_dir, "evals.txt"), system.master))


def random_token_steps(model, step_model, ddp_model, cfg, system, batch_size, grad_accum_steps, moves=True):
    """A function that runs one real training step on one chunk of random tokens, again and again, and returns
    its loss: the benchmark's step, and the micro-batch search's (moves=False: learning rate 0, so the weights
    stay). Its optimizers are its own, their state made at the first update, as a run's are."""
    trial = SimpleNamespace(**{**vars(cfg), "batch_size": batch_size})
    optimizers = configure_optimizers(model, trial, system.device_type)
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["peak_lr"] *= moves
    scaler = torch.amp.GradScaler(system.device_type, enabled=system.dtype == torch.float16)
    vocab = model.config.vocab_size
    tokens = np.random.default_rng(cfg.seed).integers(0, vocab, batch_size * cfg.block_size + 1, dtype=np.uint16)
    loader = DataLoader([tokens], batch_size, cfg.block_size, 0, 1, vocab)
    return lambda: train_step(cfg.warmup_steps, step_model, ddp_model, optimizers, scaler, loader, trial, system,
                              grad_accum_steps, None)[0]


def run_mode(argv):
    """Read the settings, make or load the model, and run the mode asked for."""
    settings, given = parse_settings(argv)
    checkpoint = checkpoint_of(settings["init_from"], settings["out_dir"])
    resuming = resumes(settings["init_from"], settings["out_dir"], checkpoint)
    if settings["recipe"] == "fast" and not resuming:  # a resumed run goes on with the settings it was saved with
        # A loaded model keeps its shape (an untied head or not); a given setting wins.
        recipe = {name: value for name, value in FAST.items()
                  if name not in given and (name not in SHAPE or settings["init_from"] == "scratch")}
        settings, given = {**settings, **recipe}, {**given, **dict.fromkeys(recipe, "--recipe=fast")}
    settings, changes = settings_for_run(settings, given, checkpoint["settings"] if resuming else None,
                                         SETTINGS, os.path.basename(__file__), MODES, SHAPE)
    cfg = SimpleNamespace(**settings)
    check_settings(cfg)  # before anything slow; again once a loaded model gives the shape
    system = setup_system(cfg)
    training = not (cfg.export_hf or cfg.benchmark or cfg.eval_only)
    for line in changes if system.master else []:
        print(line)
    if cfg.fsdp and (training or cfg.benchmark) and not system.fsdp:
        print("--fsdp: one process has nothing to shard, so it runs as a single process; "
              "start it with torchrun --nproc_per_node=N to shard the model across N")
    owned, succeeded = (None, False), False  # rank 0's (lock, whether it made out_dir) while it trains
    if training:
        owned = on_rank_zero(lambda: claim_out_dir(cfg.out_dir, resuming, checkpoint["step"] if resuming else None),
                             system.master) or owned
    elif cfg.eval_only or cfg.export_hf:  # where they write, before the model is built
        directory, setting = (cfg.export_hf, "export_hf") if cfg.export_hf else (cfg.out_dir, "out_dir")
        on_rank_zero(lambda: check_writable_dir(directory, setting), system.master)
    try:
        torch.manual_seed(cfg.seed + system.rank)
        model = make_model(cfg, given, checkpoint)
        if cfg.export_hf:
            from huggingface import save_hf
            save_hf(model, cfg.export_hf)
            print(f"wrote {cfg.export_hf}")
            return
        model.to(system.device)
        step_model, ddp_model = wrap_for_training(model, cfg, system)
        if cfg.batch_size == "auto":  # eager (the compiled model needs no more memory), through DDP where it runs
            def steps_at(batch):
                return random_token_steps(model, ddp_model or model, ddp_model, cfg, system, batch, 1, moves=False)
            cfg.batch_size = bench_speed.search_batch_size(steps_at, cfg, system, SETTINGS["batch_size"])
        grad_accum_steps = grad_accum_steps_for(cfg, system.world_size)  # a bad total_batch_size: before any data
        if cfg.benchmark:
            return bench_speed.benchmark(random_token_steps(model, step_model, ddp_model, cfg, system, cfg.batch_size,
                                                            grad_accum_steps), model, cfg, system)
        if cfg.eval_only:
            return evaluate_only(model, checkpoint, cfg, system)
        train(model, step_model, ddp_model, checkpoint if resuming else None, cfg, system, grad_accum_steps)
        succeeded = True
    except torch.OutOfMemoryError:
        raise UserError(bench_speed.out_of_memory_advice(cfg.batch_size, cfg.block_size, cfg.total_batch_size,
                                                         system.world_size, system.device)) from None
    finally:
        if training and system.master:
            release_out_dir(cfg.out_dir, *owned, succeeded)


def main(argv=None):
    # Until the training loop takes the stop signals over, SIGTERM ends the run as Ctrl-C does.
    run_main(run_mode, sys.argv[1:] if argv is None else argv, sigterm_exits=True)


if __name__ == "__main__":
    main()
