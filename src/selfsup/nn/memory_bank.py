"""The memory bank of InstDisc / NPID (Wu et al. 2018, §3.2) and PIRL (Misra & van der Maaten 2020, §3.2).

One L2-normalised vector per training image (``size`` = |D| rows of ``dim`` = 128), initialised at random
and written only from the image branch: after a step, for every image I of the batch,

    m_I ← normalise(μ·m_I + (1 − μ)·f(v_I)),      μ = 0.5   (PIRL §3.2; Wu et al.'s η = 0.5)

with f(v_I) the L2-normalised embedding computed in that step's forward pass. Negatives are bank rows
drawn uniformly at random (``sample_negatives``), so their gradient is zero: the bank is a buffer.

Several processes: the bank is SHARDED, interleaved. Entry i lives on rank ``i % world``, at local row
``i // world``. Interleaving (rather than contiguous blocks) keeps the shards within one row of each other
for any |D|, and spreads the rows a step reads and writes evenly over the ranks. No rank ever holds the
whole bank, not even for a step:

- ``lookup(index)`` is one exchange of only the requested rows. Each rank sorts its requests by owner,
  tells every owner how many it wants (``all_to_all`` of counts), sends the local row numbers, and gets
  the vectors back (two ``all_to_all_single`` with per-rank split sizes): O(B·N·d) traffic per step.
- ``update(index, vectors)`` all-gathers every rank's (index, new f) pairs (O(B·d)) and each rank writes
  the rows it owns.

The result is the single-process bank's, bit for bit (tested on 2 gloo processes). Random draws (the
initial vectors, the negatives) never depend on the number of processes: the init is drawn in fixed
chunks of rows, each from its own seeded generator, and negatives come from the step generator ``g``.

The shard is a registered buffer, so ``state_dict()`` resumes it exactly. The state also carries a
``shard`` tensor (rank, world, |D|): loading accepts a whole bank (from a single-process run: each rank
keeps its rows) or this very shard, and refuses another rank's shard with a message rather than silently
training on the wrong rows. The bank is a :class:`~selfsup.nn.distributed.ShardedState`: a
checkpoint written from ``full_state_dict(module)`` (a collective that gathers the shards to rank 0 for the
write) resumes on any number of processes, and ``exclude_sharded_from_ddp(module)`` keeps DDP from
broadcasting rank 0's shard over the others' (DDP broadcasts buffers from rank 0 at construction and before
every forward); the training loop does both for every method.

Example::

    bank = MemoryBank(len(dataset), dim=128)
    neg = sample_negatives(index.cpu(), 4096, len(dataset), g)          # B × 4096, uniform, never I itself
    entries = bank.lookup(torch.cat([index[:, None], neg.to(index.device)], 1))   # B × 4097 × 128
    ...
    bank.update(index, F.normalize(f, dim=1))                           # after the optimiser step
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import UserError
from selfsup.nn.distributed import gather_with_grad, rank_and_world

# Rows drawn per seeded generator at initialisation: bounds the temporary memory of the init to one
# chunk, and makes the init independent of how the bank is sharded.
INIT_CHUNK = 65_536


def _chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 7_919 + 1) % (2**63 - 1)


def init_shard(size: int, dim: int, rank: int, world: int, seed: int) -> Tensor:
    """The rows ``rank, rank + world, …`` of a bank whose row i is uniform in [−σ, σ]^dim, σ = 1/√(dim/3),
    then L2-normalised (VISSL's ``NCEAverage.init_memory`` with ``norm_init``), whatever ``world`` is."""
    stdv = 1.0 / math.sqrt(dim / 3)
    shard = torch.empty(len(range(rank, size, world)), dim)      # filled in place: peak = shard + one chunk
    for c in range(math.ceil(size / INIT_CHUNK)):
        start, rows = c * INIT_CHUNK, min(INIT_CHUNK, size - c * INIT_CHUNK)
        g = torch.Generator().manual_seed(_chunk_seed(seed, c))
        chunk = torch.rand(rows, dim, generator=g).mul_(2 * stdv).sub_(stdv)
        first = start + (rank - start) % world                       # this rank's first row in the chunk
        mine = chunk[first - start::world]
        shard[first // world:first // world + mine.shape[0]] = F.normalize(mine, dim=1)
    return shard


def sample_negatives(positives: Tensor, num: int, size: int, g: torch.Generator, shared: bool = False) -> Tensor:
    """``num`` bank indices per sample, uniform with replacement over D without the sample's own image.

    positives: B global indices (any device; read on the CPU). Returns B × num long on ``g``'s device.
    Drawing from |D| − 1 values and skipping the positive (``r + (r >= I)``) is exactly uniform over the
    other images; VISSL and Wu et al.'s code draw from all of D, which at ImageNet scale (N/|D| = 2.5 %)
    makes no difference but on a small set puts a copy of the image itself among its negatives about
    N/|D| times. ``shared=True`` draws one set of ``num`` for the whole batch (1-d result), which cannot
    skip every sample's own image; the method documents when it uses it.
    """
    if num < 1 or size < 2:
        raise UserError(f"need at least one negative and two images, got num={num}, |D|={size}")
    if shared:
        return torch.randint(0, size, (num,), generator=g, device=g.device)
    pos = positives.reshape(-1, 1).to(g.device)
    r = torch.randint(0, size - 1, (pos.shape[0], num), generator=g, device=g.device)
    return r + (r >= pos).long()


class MemoryBank(nn.Module):
    """|D| × dim unit vectors, this rank's interleaved shard in the buffer ``memory`` (see the module doc)."""

    sharded_buffers = ("memory",)   # selfsup.nn.distributed.ShardedState: each rank holds its own rows

    def __init__(self, size: int, dim: int = 128, momentum: float = 0.5, seed: int | None = None):
        super().__init__()
        if size < 2:
            raise UserError(f"a memory bank needs at least 2 entries (one positive, one negative), got {size}")
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"momentum must be in [0, 1), got {momentum}")
        self.size, self.dim, self.momentum = size, dim, momentum
        self.rank, self.world = rank_and_world()
        if seed is None:  # from the global RNG, which the loop seeds identically on every rank
            seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("memory", init_shard(size, dim, self.rank, self.world, seed))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, momentum={self.momentum}, shard={self.rank}/{self.world}"

    def _check_world(self) -> None:
        if rank_and_world() != (self.rank, self.world):
            raise RuntimeError(f"this memory bank was built as shard {self.rank} of {self.world} but the process "
                               f"group is now {rank_and_world()}: build the method after the processes start "
                               f"(after Fabric.launch())")

    @torch.no_grad()
    def lookup(self, index: Tensor) -> Tensor:
        """The bank rows of global ``index`` (any shape) as ``index.shape × dim``, gathered from their owners.
        A collective when distributed: every rank must call it (with its own indices) at the same time."""
        self._check_world()
        flat = index.reshape(-1).to(self.memory.device)
        if self.world == 1:
            return self.memory[flat].view(*index.shape, self.dim)
        owner = flat % self.world
        order = torch.argsort(owner, stable=True)
        want = torch.bincount(owner, minlength=self.world)         # rows I ask of each rank
        asked = torch.empty_like(want)                              # rows each rank asks of me
        dist.all_to_all_single(asked, want)
        want_l, asked_l = want.tolist(), asked.tolist()
        requests = flat.new_empty(sum(asked_l))
        dist.all_to_all_single(requests, (flat[order] // self.world).contiguous(), asked_l, want_l)
        got = self.memory.new_empty(flat.shape[0], self.dim)
        dist.all_to_all_single(got, self.memory[requests], want_l, asked_l)
        out = torch.empty_like(got)
        out[order] = got
        return out.view(*index.shape, self.dim)

    @torch.no_grad()
    def update(self, index: Tensor, vectors: Tensor) -> None:
        """m_i ← normalise(μ m_i + (1 − μ) v) for every (i, v) of every rank's batch (a collective when
        distributed; equal batch sizes on all ranks, as the training loop guarantees). ``vectors`` should
        be L2-normalised embeddings, as in PIRL and VISSL. An index given twice in one (global) batch is
        written once, from its last occurrence in rank order (the loop's batches, slices of a permutation,
        never repeat one; a deterministic rule keeps other samplers reproducible on GPUs too)."""
        self._check_world()
        index = index.reshape(-1).to(self.memory.device)
        vectors = vectors.detach().reshape(-1, self.dim).to(self.memory)
        if self.world > 1:
            index, vectors = gather_with_grad(index.contiguous()), gather_with_grad(vectors.contiguous())
        mine = index % self.world == self.rank
        rows, vectors = index[mine] // self.world, vectors[mine]
        uniq, inverse = torch.unique(rows, return_inverse=True)
        if uniq.numel() < rows.numel():
            position = torch.arange(rows.numel(), device=rows.device)
            last = torch.full_like(uniq, -1).scatter_reduce(0, inverse, position, "amax")
            rows, vectors = rows[last], vectors[last]
        mixed = self.memory[rows].mul_(self.momentum).add_(vectors, alpha=1.0 - self.momentum)
        self.memory[rows] = F.normalize(mixed, dim=1)

    @torch.no_grad()
    def gather_full(self) -> Tensor | None:
        """The whole bank (|D| × dim, on the CPU) on rank 0 and None elsewhere: a collective, for writing a
        checkpoint that any number of processes can resume (``full_state_dict``). Only for checkpoints: rank 0
        holds the whole bank while it writes it; training steps never do."""
        self._check_world()
        if self.world == 1:
            return self.memory.detach().cpu().clone()
        rows = len(range(0, self.size, self.world))                 # rank 0's shard is the longest
        padded = self.memory.new_zeros(rows, self.dim)
        padded[: self.memory.shape[0]] = self.memory
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        full = torch.empty(self.size, self.dim, dtype=self.memory.dtype)
        for r, part in enumerate(parts):
            full[r::self.world] = part[: len(range(r, self.size, self.world))].cpu()
        return full

    def full_state(self) -> dict[str, Tensor] | None:
        """ShardedState: the whole bank labelled as a single-process one, on rank 0 (a collective)."""
        full = self.gather_full()
        return None if full is None else {"memory": full, "shard": torch.tensor([0, 1, self.size])}

    # ------------------------------------------------------------------ state: the shard, labelled
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "shard"] = torch.tensor([self.rank, self.world, self.size])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, shard_key = prefix + "memory", prefix + "shard"
        for k in state_dict:
            if k.startswith(prefix) and k not in (key, shard_key) and strict:
                unexpected_keys.append(k)
        if key not in state_dict:
            missing_keys.append(key)
            return
        saved = state_dict[key]
        rank, world, size = (state_dict[shard_key].tolist() if shard_key in state_dict
                             else (0, 1, saved.shape[0]))
        if size != self.size or saved.shape[-1] != self.dim:
            error_msgs.append(f"{key}: the saved bank has {size} × {saved.shape[-1]} entries, this one "
                              f"{self.size} × {self.dim}: it belongs to another dataset or head")
        elif world == 1:  # a whole bank: keep this rank's rows
            self.memory.copy_(saved[self.rank::self.world])
        elif (rank, world) == (self.rank, self.world):
            self.memory.copy_(saved)
        else:
            error_msgs.append(f"{key}: the checkpoint holds shard {rank} of {world} of the memory bank, this "
                              f"process is shard {self.rank} of {self.world}. Resume with the number of processes "
                              f"that wrote it, from a checkpoint that saved every rank's shard")
