"""Test-wide settings: an isolated SELFSUP_HOME per session, and the shared data root when it is there."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The README's test command needs no environment: beside a checkout, ../shared/data is the data root.
    shared = REPO.parent / "shared" / "data"
    if "SELFSUP_DATA" not in os.environ and shared.is_dir():
        os.environ["SELFSUP_DATA"] = str(shared)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    old = os.environ.get("SELFSUP_HOME")
    os.environ["SELFSUP_HOME"] = str(tmp_path_factory.mktemp("selfsup_home"))
    yield
    if old is None:
        os.environ.pop("SELFSUP_HOME", None)
    else:
        os.environ["SELFSUP_HOME"] = old


def data_root() -> Path | None:
    value = os.environ.get("SELFSUP_DATA")
    return Path(value) if value and Path(value).is_dir() else None


requires_data = pytest.mark.skipif(data_root() is None and not (REPO.parent / "shared" / "data").is_dir(),
                                   reason="needs SELFSUP_DATA (../shared/data) with the real datasets")


def free_port() -> int:
    """A free localhost TCP port for a gloo process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_group() -> None:
    """End a worker's gloo group: a barrier first, so that no rank tears its connections down while another still
    talks to it (gloo aborts the process whose peer vanished mid-exchange), then destroy it."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def run_processes(worker, world: int, *args, timeout: float = 120) -> list:
    """Run ``worker(rank, port, *args, queue)`` in ``world`` spawned processes (a gloo group on one free port);
    returns what each put on ``queue``, sorted by its first element (the rank). Every process must exit 0."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=timeout) for _ in range(world)), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
