"""FSDP2 for MoE-LoRA: shard the frozen base across processes, keep the adapters whole on every process.

The Riemannian preconditioner solves with each expert's whole factors, (BᵢᵀBᵢ + δI) and (AᵢAᵢᵀ + δI), so
an adapter tensor cut across processes would need its shards gathered at every optimizer step.  The
adapters are also small (a few MB) next to the frozen base (hundreds of MB), so riemix shards only the
base: ``fully_shard`` (``torch.distributed.fsdp``, FSDP2) is applied to every transformer block and to the
root module with the trainable parameters passed as ``ignored_params``.  Each process then holds 1/N of
the base weights (gathered block by block for the forward and backward), and a full copy of the adapters
(and of a trainable head).  Their gradients are averaged across processes after the backward
(``average_gradients``, one all-reduce), so every process takes the same optimizer step with the
unchanged, local Riemannian preconditioner, and any riemix optimizer works.  Checkpoints and adapter files
hold the full adapter tensors (saved by rank 0): a run saved sharded loads in one process unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_gradients", "shard_base", "transformer_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the children of its longest ``nn.ModuleList`` of same-typed
    modules (``model.layers``, ``transformer.h``, ``encoder.layer`` ...).

    Raises:
        ValueError: the model has no such list.
    """
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    if not best:
        raise ValueError(f"fsdp: found no list of transformer blocks in {type(model).__name__} to shard")
    return best


def shard_base(model: nn.Module, device: torch.device) -> int:
    """Shard ``model``'s frozen parameters over the process group with FSDP2; trainable ones stay whole.

    Args:
        model: The adapted model (``add_moe_lora`` applied), on ``device``.
        device: This process's device (the device mesh's type).

    Returns:
        The number of blocks sharded.

    Raises:
        ValueError: no process group of several processes, or no transformer blocks.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError("fsdp needs several processes: launch with torchrun --nproc_per_node N (or accelerate launch)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    trainable = {p for p in model.parameters() if p.requires_grad}
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return len(blocks)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over the processes (one all-reduce of them all)."""
    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:  # the same list on every process: a parameter without gradient here counts as zero
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
