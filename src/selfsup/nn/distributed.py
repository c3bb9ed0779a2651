"""Collective helpers for losses that see other ranks' samples.

``gather_with_grad`` concatenates a tensor from every rank along dim 0 and lets gradients flow back
to the rank that produced each slice: the backward pass sums, over ranks, the gradient each rank's
loss sends to a slice (an all-reduce), then returns this rank's part. With each rank averaging its
loss over its own anchors and DDP averaging parameter gradients over ranks, the result is exactly
the gradient of the single-process loss on the global batch (tested on 2 gloo processes).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad.chunk(world, 0)[rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (identity on one process). Equal sizes per rank."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@runtime_checkable
class ShardedState(Protocol):
    """State that differs between processes, declared (a sharded memory bank, a cluster memory).

    ``sharded_buffers`` names the module's buffers that hold this rank's part: DDP must not broadcast rank 0's
    over them. ``full_state()`` is a collective returning, on rank 0, state-dict entries (names relative to the
    module) that hold the state whole, so a checkpoint resumes on any number of processes; None elsewhere.
    """

    sharded_buffers: tuple[str, ...]

    def full_state(self) -> dict[str, torch.Tensor] | None: ...


def _sharded(module: nn.Module):
    return [(f"{name}." if name else "", m) for name, m in module.named_modules() if isinstance(m, ShardedState)]


def full_state_dict(module: nn.Module) -> dict | None:
    """``module.state_dict()`` with every :class:`ShardedState` whole, on rank 0; None on the other ranks. A
    collective: every rank must call it."""
    state = module.state_dict()
    for prefix, m in _sharded(module):
        whole = m.full_state()
        if whole is not None:
            state.update({prefix + k: v for k, v in whole.items()})
    return state if rank_and_world()[0] == 0 else None


def exclude_sharded_from_ddp(module: nn.Module) -> None:
    """Keep DDP from overwriting every rank's shards with rank 0's (it broadcasts buffers from rank 0 when it
    wraps the module and before each forward): list them in the attribute DDP reads,
    ``_ddp_params_and_buffers_to_ignore`` (names relative to ``module``, the module DDP will wrap)."""
    names = {prefix + b for prefix, m in _sharded(module) for b in m.sharded_buffers}
    module._ddp_params_and_buffers_to_ignore = sorted(set(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
                                                      | names)
