"""
FSDP2 for train_gpt2.py's --fsdp: shard the model across the processes of torchrun, and gather its state
into the one checkpoint format that every run loads (one process, DDP or FSDP, on any number of processes).

    torchrun --standalone --nproc_per_node=8 train_gpt2.py --fsdp

Each process keeps 1/processes of the weights, gradients and optimizer state; each block's weights are
gathered just before its forward and backward pass and freed after. Muon (--optimizer=muon, --recipe=fast)
steps the shards with ShardedMuon. Only train_gpt2.py imports this file.
"""

import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def local(tensor):
    """This process's part of a tensor: its shard, under FSDP; the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor):
    """A tensor made whole across the processes: a sharded or partial DTensor gathered or summed."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_finite(parameters, device):
    """Whether every weight is finite on every process: under FSDP each process sees only its own shards."""
    finite = torch.tensor(float(all(torch.isfinite(local(p)).all() for p in parameters)), device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def shard_model(model, compile_blocks, dtype):
    """FSDP2, in place: each block is one unit, whose weights are gathered from every process just before its
    forward and its backward pass and freed after, and whose gradients are reduce-scattered back into shards;
    the root unit holds the rest (the embeddings with the tied head, the last LayerNorm). With dtype below
    float32, the gathered weights are cast to it, and the gradients are reduced in float32 into the float32
    shards that the optimizers step."""
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
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


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP2's shards, step for step the same arithmetic. The momentum is elementwise, so each
    process keeps that of its own rows; the orthogonalization is not, so each matrix's update is gathered whole,
    orthogonalized as one process would, and each process keeps its own rows of the result."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "ShardedMuon takes no closure"
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"],
                                                     group["ns_steps"], group["eps"])
                # Every process holds the whole result: each takes its own rows, with no communication.
                update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))


def muon(params, **options):
    """torch.optim.Muon, or ShardedMuon for the parameters of a model that FSDP has sharded."""
    return (ShardedMuon if any(isinstance(p, DTensor) for p in params) else torch.optim.Muon)(params, **options)


def memory_per_process(model, optimizers, device, sharded):
    """(bytes of the whole model's weights, the line that says the memory of the process holding the most):
    weights, gradients and optimizer state, from the shapes of its parameters (of its shards, under FSDP). A
    gradient is as large as its weight; AdamW keeps two moments of each of its parameters and Muon one of each
    matrix, from the first step on."""
    def size(p):
        return local(p).numel() * local(p).element_size()
    weights = sum(size(p) for p in model.parameters())
    gradients = sum(size(p) for p in model.parameters() if p.requires_grad)
    state = sum((2 if isinstance(o, torch.optim.AdamW) else 1) * size(p)
                for o in optimizers for group in o.param_groups for p in group["params"])
    largest = torch.tensor([weights, gradients, state], dtype=torch.float64, device=device)
    whole_model = torch.tensor([weights], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        dist.all_reduce(whole_model, op=dist.ReduceOp.SUM if sharded else dist.ReduceOp.MAX)
    (weights, gradients, state), whole_model = largest.tolist(), whole_model.item()
    return int(whole_model), (
        f"memory per process: {weights / 1e9:.3g} GB weights + {gradients / 1e9:.3g} GB gradients + "
        f"{state / 1e9:.3g} GB optimizer state = {(weights + gradients + state) / 1e9:.3g} GB before activations "
        f"({'sharded by FSDP' if sharded else 'a whole copy on each process'}; from the shapes)")


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order that numbers them in its state dict."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model, optimizers, sharded):
    """(the model's state dict, [each optimizer's]) in the one format every checkpoint has: whole tensors, the
    optimizers' state keyed by parameter number as torch.optim writes it. A sharded model's are gathered from
    every process (all must call this) onto rank 0's CPU, one tensor at a time; the other ranks get empty ones."""
    if not sharded:
        return model.state_dict(), [o.state_dict() for o in optimizers]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    first_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head is the embedding: one tensor
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
    """Load an optimizer's state dict as full_state_dicts writes it. A sharded model's optimizer takes it keyed
    by parameter name, and each process keeps its shards of it."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    names = parameter_names(model, optimizer)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
