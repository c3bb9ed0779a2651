"""SimCLR's negatives gathered across 2 gloo processes give the single-process loss and gradients."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import close_group, free_port

from selfsup.losses import nt_xent


def _worker(rank, world, port, z1, z2, tau, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        a1 = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
        a2 = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = nt_xent(a1, a2, tau)
        loss.backward()
        # numpy arrays travel by value: a tensor would travel as a shared-memory handle that dies with this
        # process if it exits before the parent reads the queue (seen on a loaded machine)
        queue.put((rank, loss.item(), a1.grad.numpy(), a2.grad.numpy()))
    finally:
        close_group()


def test_gather_with_grad_matches_single_process():
    world, tau = 2, 0.3
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = nt_xent(f1, f2, tau, gather=False)
    full.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, z1, z2, tau, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    # The global loss is the mean of the ranks' losses (each averages over its own anchors) ...
    assert abs(sum(r[1] for r in results) / world - full.item()) < 1e-5
    # ... and DDP averages gradients over ranks, so each rank's gradient / world = the full-batch one.
    b = 8 // world
    for rank, _, g1, g2 in results:
        g1, g2 = torch.from_numpy(g1), torch.from_numpy(g2)
        torch.testing.assert_close(g1 / world, f1.grad[rank * b:(rank + 1) * b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g2 / world, f2.grad[rank * b:(rank + 1) * b], atol=1e-6, rtol=1e-5)
