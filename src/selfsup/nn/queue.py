"""MoCo's dictionary as a queue (He et al. 2020, §3.2; facebookresearch/moco ``moco/builder.py``).

K keys of dimension D, the negatives of the contrastive loss. After each step the keys of the current
(global) batch replace the oldest ones (``_dequeue_and_enqueue``):

    Q[(p + i) mod K] ← k_i   for i = 0 … B − 1,      p ← (p + B) mod K

with B the global batch: under torch.distributed every rank first gathers all ranks' keys, concatenated in
rank order (MoCo's ``concat_all_gather``), so every rank holds the same queue. MoCo requires K mod B = 0
(``assert self.K % batch_size == 0``), so a batch is never split across the wrap; ``check_batch`` refuses
other sizes with the fix, and a method can call it before training starts.

Layout: the buffer ``queue`` is K × D, row i one key (MoCo stores D × K); logits are ``q @ queue.keys().T``.
It starts as rows of N(0, 1) noise L2-normalised along D (MoCo: ``randn`` then ``normalize(dim=0)``), drawn
from ``seed``. ``queue`` and the long pointer ``queue_ptr`` are buffers, so ``state_dict()`` resumes exactly.

Example::

    check_batch(65536, global_batch)                            # at setup: K = 65536 (MoCo's default)
    self.queue = KeyQueue(65536, 128)
    l_neg = q @ self.queue.keys().T                              # in forward: B × K
    self.queue.enqueue(k)                                        # in after_step, after backward
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import UserError
from selfsup.nn.distributed import gather_with_grad, is_distributed, rank_and_world


def check_batch(size: int, global_batch: int, why: str = "") -> None:
    """Refuse a queue of ``size`` keys that whole global batches of ``global_batch`` keys do not tile; ``why``
    says where the batch's count comes from when it is not the images' (e.g. two keys per image)."""
    if global_batch < 1:
        raise UserError(f"the global batch written to the key queue must be at least 1, got {global_batch}")
    if size % global_batch:
        suggestion = max(1, (size + global_batch // 2) // global_batch) * global_batch
        raise UserError(f"the key queue size K={size} is not a multiple of the global batch {global_batch}{why} "
                        f"(MoCo writes whole batches into the queue, K % batch == 0): choose a queue size that "
                        f"is a multiple of the global batch, e.g. {suggestion}, or a global batch that divides {size}")


class KeyQueue(nn.Module):
    """A FIFO of ``size`` keys × ``dim`` (buffer ``queue``, K × D) with its write pointer ``queue_ptr``."""

    def __init__(self, size: int, dim: int, seed: int | None = None):
        super().__init__()
        if size < 1 or dim < 1:
            raise UserError(f"a key queue needs at least one key of at least one dimension, got K={size}, D={dim}")
        self.size, self.dim = size, dim
        if seed is None:  # from the global RNG, which the loop seeds identically on every rank
            seed = int(torch.randint(0, 2**62, ()).item())
        noise = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(noise, dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    def keys(self) -> Tensor:
        """The K × D queue, detached. A view, not a copy: ``enqueue`` after the backward pass (``after_step``)
        or autograd refuses the in-place write to a tensor it still needs."""
        return self.queue.detach()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write every rank's ``keys`` (B_local × D; equal B_local on all ranks) at the pointer and advance it.
        A collective when distributed: every rank must call it at the same time."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"enqueue() takes B × {self.dim} keys, got shape {tuple(keys.shape)}")
        keys = gather_with_grad(keys.detach().to(self.queue).contiguous())
        batch = keys.shape[0]
        check_batch(self.size, batch)
        rows = (self.queue_ptr + torch.arange(batch, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, rows, keys)
        self.queue_ptr.add_(batch).remainder_(self.size)


class LocalQueue(nn.Module):
    """SwAV's feature queue (facebookresearch/swav main_swav.py): per process, ``streams`` FIFOs of ``length``
    local rows × ``dim`` (buffer ``queue``, streams × length × dim), newest first, zeros until written.

    ``push(i, rows)`` shifts stream i down by len(rows) and writes the rows at the top (``queue[i, bs:] =
    queue[i, :-bs]; queue[i, :bs] = rows``); ``full(i)`` is the code's "use the queue" test, its last row
    non-zero. Unlike :class:`KeyQueue` nothing is gathered: each rank keeps its own rows, so the queue is a
    :class:`~selfsup.nn.distributed.ShardedState`. A checkpoint holds every rank's queue (``full_state``); a run
    resumed on as many processes gets its own back exactly; on another number of processes the rows of all ranks
    are concatenated in rank order and split evenly again (the FIFO order within a rank's part is kept).
    """

    sharded_buffers = ("queue",)

    def __init__(self, streams: int, length: int, dim: int):
        super().__init__()
        if streams < 1 or length < 1 or dim < 1:
            raise UserError(f"a feature queue needs streams, length and dim >= 1, got {streams}, {length}, {dim}")
        self.register_buffer("queue", torch.zeros(streams, length, dim))

    def extra_repr(self) -> str:
        s, n, d = self.queue.shape
        return f"streams={s}, length={n} per process, dim={d}"

    def full(self, i: int) -> bool:
        return bool(self.queue[i, -1].ne(0).any())

    @torch.no_grad()
    def push(self, i: int, rows: Tensor) -> None:
        b = rows.shape[0]
        if b > self.queue.shape[1]:
            raise UserError(f"a feature queue of {self.queue.shape[1]} rows per process cannot take a batch of {b}: "
                            f"make the queue at least one local batch long")
        self.queue[i, b:] = self.queue[i, :-b].clone()
        self.queue[i, :b] = rows.detach().to(self.queue)

    def full_state(self) -> dict[str, Tensor] | None:
        """ShardedState: every rank's queue, world × streams × length × dim, on rank 0 (a collective)."""
        parts = [self.queue]
        if is_distributed():
            parts = [torch.empty_like(self.queue) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, self.queue.contiguous())
        return {"queue": torch.stack(parts).cpu()} if rank_and_world()[0] == 0 else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "queue"
        saved = state_dict.get(key)
        if saved is not None and saved.dim() == 4:          # a whole queue: this rank's part of it
            rank, world = rank_and_world()
            if saved.shape[0] == world:
                mine = saved[rank]
            else:   # another number of processes: the ranks' rows in rank order, split evenly again
                rows = saved.permute(1, 0, 2, 3).reshape(saved.shape[1], -1, saved.shape[3])
                mine = rows.tensor_split(world, dim=1)[rank]
            state_dict = {**state_dict, key: mine}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
