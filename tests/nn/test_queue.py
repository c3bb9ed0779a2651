"""MoCo's key queue: seeded unit-norm init, FIFO writes with wrap-around, the K % batch refusal, exact resume,
and on 2 gloo processes the same queue on both ranks as one process enqueueing the whole global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import close_group, run_processes

from selfsup.errors import UserError
from selfsup.nn.queue import KeyQueue, check_batch


def _keys(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_init_is_seeded_unit_keys_and_pointer_zero():
    q = KeyQueue(12, 5, seed=3)
    assert q.queue.shape == (12, 5) and torch.allclose(q.queue.norm(dim=1), torch.ones(12))
    assert torch.equal(q.queue, KeyQueue(12, 5, seed=3).queue)
    assert not torch.equal(q.queue, KeyQueue(12, 5, seed=4).queue)
    assert q.queue_ptr.dtype == torch.long and q.queue_ptr.tolist() == [0]
    with pytest.raises(UserError, match="K=0"):
        KeyQueue(0, 5)


def test_enqueue_is_fifo_and_wraps_around():
    q = KeyQueue(6, 3, seed=0)
    init = q.queue.clone()
    b = [_keys(2, 3, 10 + s) for s in range(5)]
    q.enqueue(b[0])
    assert torch.equal(q.queue, torch.cat([b[0], init[2:]])) and q.queue_ptr.item() == 2
    q.enqueue(b[1])
    assert torch.equal(q.queue, torch.cat([b[0], b[1], init[4:]])) and q.queue_ptr.item() == 4
    q.enqueue(b[2])
    assert torch.equal(q.queue, torch.cat([b[0], b[1], b[2]])) and q.queue_ptr.item() == 0     # full, wrapped
    q.enqueue(b[3])                                                                            # oldest out first
    assert torch.equal(q.queue, torch.cat([b[3], b[1], b[2]])) and q.queue_ptr.item() == 2
    q.enqueue(b[4].requires_grad_())
    assert torch.equal(q.queue, torch.cat([b[3], b[4], b[2]])) and q.queue_ptr.item() == 4
    keys = q.keys()
    assert not keys.requires_grad and torch.equal(keys, q.queue)
    whole = _keys(6, 3, 99).double()                                        # B = K from the pointer on, any dtype
    q.enqueue(whole)
    assert q.queue.dtype == torch.float32 and q.queue_ptr.item() == 4
    assert torch.equal(q.queue, torch.cat([whole[2:], whole[:2]]).float())
    with pytest.raises(ValueError, match="B × 3"):
        q.enqueue(torch.zeros(3))


def test_batch_that_does_not_divide_the_queue_is_refused():
    check_batch(65536, 256)                                                 # MoCo's K and batch
    with pytest.raises(UserError) as e:
        check_batch(65536, 384)
    message = str(e.value)
    assert "K=65536" in message and "384" in message and "e.g. 65664" in message and "multiple" in message
    with pytest.raises(UserError, match="e.g. 12"):
        check_batch(10, 4)
    with pytest.raises(UserError, match="e.g. 16,"):
        check_batch(10, 16)                                                 # a batch larger than the queue
    with pytest.raises(UserError, match="at least 1"):
        check_batch(10, 0)
    q = KeyQueue(10, 2, seed=0)
    before = q.queue.clone()
    with pytest.raises(UserError, match="K=10 .* global batch 4"):
        q.enqueue(_keys(4, 2, 1))
    assert torch.equal(q.queue, before) and q.queue_ptr.item() == 0        # nothing written


def test_state_dict_round_trip_resumes_the_queue_and_pointer():
    q = KeyQueue(8, 4, seed=0)
    for s in range(3):
        q.enqueue(_keys(2, 4, s))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    assert set(state) == {"queue", "queue_ptr"} and state["queue_ptr"].tolist() == [6]
    resumed = KeyQueue(8, 4, seed=7)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.queue, q.queue) and torch.equal(resumed.queue_ptr, q.queue_ptr)
    for s in range(3, 6):
        q.enqueue(_keys(2, 4, s))
        resumed.enqueue(_keys(2, 4, s))
    assert torch.equal(resumed.queue, q.queue) and resumed.queue_ptr.item() == q.queue_ptr.item() == 4


# ---------------------------------------------------------------------------------------- 2 processes
SIZE, DIM, LOCAL, STEPS, SEED, WORLD = 12, 4, 2, 5, 5, 2      # global batch 4: wraps after 3 steps


def _global_batch(step):
    return _keys(LOCAL * WORLD, DIM, 100 + step)


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        q = KeyQueue(SIZE, DIM, seed=SEED)
        history = []
        for step in range(STEPS):
            q.enqueue(_global_batch(step)[rank * LOCAL:(rank + 1) * LOCAL])
            history.append((q.queue.numpy().copy(), q.queue_ptr.item()))
        # K = 6 takes the local batch of 2 but not the global batch of 4: refused on every rank
        try:
            KeyQueue(6, DIM, seed=SEED).enqueue(_global_batch(0)[rank * LOCAL:(rank + 1) * LOCAL])
            refused = ""
        except UserError as e:
            refused = str(e)
        results.put((rank, history, refused))
    finally:
        close_group()


def test_two_processes_hold_the_single_process_queue():
    ref = KeyQueue(SIZE, DIM, seed=SEED)
    expected = []
    for step in range(STEPS):
        ref.enqueue(_global_batch(step))
        expected.append((ref.queue.clone(), ref.queue_ptr.item()))

    got = run_processes(_worker, WORLD)

    for _, history, refused in got:
        for (queue, ptr), (want, want_ptr) in zip(history, expected, strict=True):
            assert torch.equal(torch.from_numpy(queue), want) and ptr == want_ptr
        assert "K=6" in refused and "global batch 4" in refused
