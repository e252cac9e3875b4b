"""
FSDP2 for train_gpt2.py's --fsdp: shard the model across the processes of torchrun, and gather its state
into the one checkpoint format that every run loads (one process, DDP or FSDP, on any number of processes).

    torchrun --standalone --nproc_per_node=8 train_gpt2.py --fsdp

Each process keeps 1/processes of the weights, gradients and optimizer state; each block's weights are
gathered just before its forward and backward pass and freed after. train_gpt2.py imports this file only
under --fsdp (and checkpoints.py only for a sharded model).
"""

import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


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


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order that numbers them in its state dict."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model, optimizers):
    """(the model's state dict, [each optimizer's]) in the one format every checkpoint has: whole tensors, the
    optimizers' state keyed by parameter number as torch.optim writes it, gathered from every process (all must
    call this) onto rank 0's CPU, one tensor at a time; the other ranks get empty ones."""
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


def load_optimizer_state(model, optimizer, state):
    """Load an optimizer's state dict as full_state_dicts writes it: keyed by parameter name for the sharded
    model's optimizer, and each process keeps its shards of it."""
    names = parameter_names(model, optimizer)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
