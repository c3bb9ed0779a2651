"""The memory bank: PIRL's update rule, uniform seeded negatives, exact resume, and a sharded bank on 2 gloo
processes that reads and writes exactly what the single-process bank does, without any rank holding it all."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import close_group, run_processes
from torch import nn

from selfsup.nn import memory_bank
from selfsup.nn.distributed import exclude_sharded_from_ddp, full_state_dict
from selfsup.nn.memory_bank import MemoryBank, init_shard, sample_negatives


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_update_is_the_moving_average_then_renormalised():
    bank = MemoryBank(10, 4, momentum=0.3, seed=0)
    old = bank.memory.clone()
    assert torch.allclose(old.norm(dim=1), torch.ones(10))
    v = _unit(2, 4, 1)
    bank.update(torch.tensor([2, 7]), v)
    for row, vec in ((2, v[0]), (7, v[1])):
        mixed = [0.3 * a + 0.7 * b for a, b in zip(old[row].tolist(), vec.tolist(), strict=True)]
        norm = sum(x * x for x in mixed) ** 0.5
        torch.testing.assert_close(bank.memory[row], torch.tensor([x / norm for x in mixed]))
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(bank.memory[untouched], old[untouched])
    # an index twice in one batch is written once, from its last occurrence
    again = MemoryBank(10, 4, momentum=0.3, seed=0)
    w = _unit(3, 4, 2)
    again.update(torch.tensor([5, 1, 5]), w)
    torch.testing.assert_close(again.memory[5], F.normalize(0.3 * old[5] + 0.7 * w[2], dim=0))


def test_init_is_seeded_unit_and_independent_of_sharding(monkeypatch):
    monkeypatch.setattr(memory_bank, "INIT_CHUNK", 7)      # several chunks, not aligned with the shards
    full = init_shard(30, 5, 0, 1, seed=3)
    assert full.shape == (30, 5) and torch.allclose(full.norm(dim=1), torch.ones(30))
    assert torch.equal(full, init_shard(30, 5, 0, 1, seed=3))
    assert not torch.equal(full, init_shard(30, 5, 0, 1, seed=4))
    for world in (2, 3, 4):
        for rank in range(world):
            assert torch.equal(init_shard(30, 5, rank, world, seed=3), full[rank::world])


def test_negatives_are_uniform_over_the_others_and_deterministic():
    size, pos = 10, torch.tensor([0, 3, 9])
    a = sample_negatives(pos, 4000, size, torch.Generator().manual_seed(0))
    b = sample_negatives(pos, 4000, size, torch.Generator().manual_seed(0))
    assert a.shape == (3, 4000) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, sample_negatives(pos, 4000, size, torch.Generator().manual_seed(1)))
    for row, p in zip(a, pos.tolist(), strict=True):
        assert not (row == p).any()                          # never the image itself
        counts = torch.bincount(row, minlength=size).float()
        others = counts[torch.arange(size) != p]
        # 9 equally likely values, 4000 draws: expected 444.4 each, sd ≈ 19.9; 5 sd is far beyond chance
        assert (others - 4000 / 9).abs().max() < 100
    shared = sample_negatives(pos, 50, size, torch.Generator().manual_seed(0), shared=True)
    assert shared.shape == (50,)
    with pytest.raises(ValueError, match="negative"):
        sample_negatives(pos, 0, size, torch.Generator())


def test_state_dict_round_trip_resumes_identical_reads_and_writes():
    bank = MemoryBank(12, 4, seed=0)
    bank.update(torch.tensor([1, 4]), _unit(2, 4, 0))
    state = {k: v.clone() for k, v in bank.state_dict().items()}
    assert state["shard"].tolist() == [0, 1, 12]
    resumed = MemoryBank(12, 4, seed=99)                   # a different random init, overwritten by the load
    resumed.load_state_dict(state)
    assert torch.equal(resumed.memory, bank.memory)
    for step in range(3):
        index = torch.tensor([step, step + 5])
        neg = [sample_negatives(index, 6, 12, torch.Generator().manual_seed(step)) for _ in range(2)]
        assert torch.equal(bank.lookup(neg[0]), resumed.lookup(neg[1]))
        v = _unit(2, 4, step + 10)
        bank.update(index, v)
        resumed.update(index, v)
    assert torch.equal(bank.memory, resumed.memory)
    with pytest.raises(RuntimeError, match="another dataset"):
        MemoryBank(13, 4).load_state_dict(state)


# ---------------------------------------------------------------------------------------- 2 processes
SIZE, DIM, NEG, LOCAL, STEPS, SEED, WORLD = 37, 6, 5, 4, 3, 11, 2   # odd |D|: shards of 19 and 18 rows


def _step_inputs(step, rank):
    """This rank's slice of a global batch (a slice of a permutation, as in the loop), its negatives drawn
    from its own step generator, and the embeddings it writes back."""
    batch = torch.randperm(SIZE, generator=torch.Generator().manual_seed(step))[: LOCAL * WORLD]
    positives = batch[rank * LOCAL:(rank + 1) * LOCAL]
    g = torch.Generator().manual_seed(1000 * step + rank)
    negatives = sample_negatives(positives, NEG, SIZE, g)
    return positives, negatives, _unit(LOCAL, DIM, 100 * step + rank)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(DIM, DIM)
        self.bank = MemoryBank(SIZE + 1, DIM, seed=SEED)     # even |D|: equal shards, which DDP would overwrite

    def forward(self, x):
        return self.head(x)


def _worker(rank, port, full_init, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        bank = MemoryBank(SIZE, DIM, seed=SEED)
        init, rows_held, lookups = bank.memory.clone(), [bank.memory.shape[0]], []
        for step in range(STEPS):
            positives, negatives, vectors = _step_inputs(step, rank)
            lookups.append(bank.lookup(torch.cat([positives[:, None], negatives], 1)))
            bank.update(positives, vectors)
            rows_held.append(bank.memory.shape[0])
        state = bank.state_dict()
        whole = full_state_dict(bank)            # for a checkpoint any number of processes can resume
        whole = None if whole is None else (whole["memory"].numpy(), whole["shard"].tolist())
        # a whole bank (single-process checkpoint) loads as this rank's rows
        from_full = MemoryBank(SIZE, DIM, seed=0)
        from_full.load_state_dict({"memory": full_init, "shard": torch.tensor([0, 1, SIZE])})
        # another rank's shard is refused
        other = len(range(1 - rank, SIZE, WORLD))
        try:
            MemoryBank(SIZE, DIM, seed=0).load_state_dict(
                {"memory": torch.zeros(other, DIM), "shard": torch.tensor([1 - rank, WORLD, SIZE])})
            refused = False
        except RuntimeError as e:
            refused = "shard" in str(e)
        # DDP must leave each rank's shard alone (it broadcasts rank 0's buffers unless told otherwise)
        holder = _Holder()
        exclude_sharded_from_ddp(holder)
        before = holder.bank.memory.clone()
        ddp = nn.parallel.DistributedDataParallel(holder)
        ddp(torch.randn(2, DIM)).sum().backward()
        ddp_kept = torch.equal(holder.bank.memory, before)
        # plain arrays: a tensor sent through the queue would need this process alive until it is read
        queue.put((rank, init.numpy(), [x.numpy() for x in lookups], bank.memory.numpy().copy(), rows_held,
                   state["shard"].tolist(), torch.equal(from_full.memory, full_init[rank::WORLD]), refused, ddp_kept,
                   whole))
    finally:
        close_group()


def test_sharded_bank_on_two_processes_equals_the_single_process_bank():
    ref = MemoryBank(SIZE, DIM, seed=SEED)
    full_init = ref.memory.clone()
    expected = []
    for step in range(STEPS):
        inputs = [_step_inputs(step, r) for r in range(WORLD)]
        expected.append([ref.lookup(torch.cat([p[:, None], n], 1)) for p, n, _ in inputs])
        ref.update(torch.cat([p for p, _, _ in inputs]), torch.cat([v for _, _, v in inputs]))

    results = run_processes(_worker, WORLD, full_init)

    for rank, init, lookups, final, rows_held, shard, loads_full, refused, ddp_kept, whole in results:
        init, final, lookups = torch.from_numpy(init), torch.from_numpy(final), [torch.from_numpy(x) for x in lookups]
        assert torch.equal(init, full_init[rank::WORLD])               # same init, only this rank's rows
        assert set(rows_held) == {len(range(rank, SIZE, WORLD))}      # never more than its shard
        assert max(rows_held) < SIZE
        for step in range(STEPS):
            assert torch.equal(lookups[step], expected[step][rank])     # sampled rows, from both shards
        assert torch.equal(final, ref.memory[rank::WORLD])              # writes landed where they belong
        assert shard == [rank, WORLD, SIZE]
        assert loads_full and refused and ddp_kept
        if rank == 0:                                                   # the whole bank, for a checkpoint
            assert torch.equal(torch.from_numpy(whole[0]), ref.memory) and whole[1] == [0, 1, SIZE]
        else:
            assert whole is None
