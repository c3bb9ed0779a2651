"""The training loop runs under DDP: two CPU processes (gloo) launched by Fabric, one run directory."""

import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file


def pretrain_on_two_processes(tmp_path, method: str, steps: int, every: int, *overrides: str) -> str:
    """``selfsup pretrain`` with 2 gloo processes into tmp_path/run; returns its output."""
    cmd = [sys.executable, "-m", "selfsup.cli", "pretrain", method, "--backbone", "resnet18", "--width", "0.125",
           "--cifar-stem", "--steps", str(steps), "--batch-size", "16", "--accelerator", "cpu", "--devices", "2",
           "--checkpoint-every", str(every), "--out", str(tmp_path / "run"), "method.size=16", *overrides]
    done = subprocess.run(cmd, env={**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_two_process_ddp_run_completes(tmp_path):
    out = tmp_path / "run"
    log = pretrain_on_two_processes(tmp_path, "simclr", 3, 3, "method.view=simclr_cifar")
    assert "Starting with 2 processes" in log
    assert log.count("done:") == 1
    assert (out / "checkpoints" / "step-00000003").is_dir()
    weights = load_file(str(out / "backbone.safetensors"))
    assert all(v.isfinite().all() for v in weights.values())


def test_two_process_memory_bank_run_checkpoints_the_whole_bank_and_resumes(tmp_path):
    out = tmp_path / "run"
    pretrain_on_two_processes(tmp_path, "npid", 4, 2, "method.num_negatives=64")
    state = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert state["bank.memory"].shape == (4800, 128)        # each rank holds half; the checkpoint all of it
    assert state["bank.shard"].tolist() == [0, 1, 4800]
    shutil.rmtree(out / "checkpoints" / "step-00000004")   # as if killed after step 2
    (out / "backbone.safetensors").unlink()
    log = pretrain_on_two_processes(tmp_path, "npid", 4, 2, "method.num_negatives=64")  # resumes, each rank its rows
    assert "resum" in log.lower() and (out / "checkpoints" / "step-00000004").is_dir()


def test_two_process_swav_run_checkpoints_both_ranks_queues_and_resumes_to_the_same_weights(tmp_path):
    args = ("method.num_prototypes=20", "method.proj_hidden=32", "method.queue_length=32",
            "method.epoch_queue_starts=0", "method.freeze_prototypes_niters=1", "method.size=16")
    pretrain_on_two_processes(tmp_path / "a", "swav", 4, 2, *args)
    straight = load_file(str(tmp_path / "a" / "run" / "backbone.safetensors"))
    out = tmp_path / "b" / "run"
    pretrain_on_two_processes(tmp_path / "b", "swav", 4, 2, *args)
    state = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert state["queue.queue"].shape == (2, 2, 16, 128)   # world × the 2 assigned crops × 16 rows
    assert state["queue.queue"][0].abs().sum() > 0 and not torch.equal(state["queue.queue"][0], state["queue.queue"][1])
    shutil.rmtree(out / "checkpoints" / "step-00000004")           # as if killed after step 2
    (out / "backbone.safetensors").unlink()
    log = pretrain_on_two_processes(tmp_path / "b", "swav", 4, 2, *args)
    assert "resum" in log.lower()
    resumed = load_file(str(out / "backbone.safetensors"))
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_two_process_deepcluster_v2_run_checkpoints_the_whole_memory_and_resumes_to_the_same_weights(tmp_path):
    # 40 images (4 a class), global batch 16: 2 steps an epoch, so the checkpoint at step 2 is an epoch boundary and
    # the resumed run clusters the checkpointed memory at its first step, as the uninterrupted one does
    args = ("method.num_prototypes=[8,6,8]", "method.proj_hidden=32", "method.size=16", "data.per_class=4")
    pretrain_on_two_processes(tmp_path / "a", "deepcluster_v2", 4, 2, *args)
    straight = load_file(str(tmp_path / "a" / "run" / "backbone.safetensors"))
    out = tmp_path / "b" / "run"
    pretrain_on_two_processes(tmp_path / "b", "deepcluster_v2", 4, 2, *args)
    state = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    for c in (0, 1):       # each rank holds images rank::2; the checkpoint every image's row, unit
        assert state[f"memory.{c}.memory"].shape == (40, 128) and state[f"memory.{c}.shard"].tolist() == [0, 1, 40]
        torch.testing.assert_close(state[f"memory.{c}.memory"].norm(dim=1), torch.ones(40))
    assert state["assignments"].shape == (3, 40) and state["assignments"].min() >= 0
    assert [state[f"prototypes.{h}.weight"].shape[0] for h in range(3)] == [8, 6, 8]
    shutil.rmtree(out / "checkpoints" / "step-00000004")           # as if killed after step 2
    (out / "backbone.safetensors").unlink()
    log = pretrain_on_two_processes(tmp_path / "b", "deepcluster_v2", 4, 2, *args)
    assert "resum" in log.lower()
    resumed = load_file(str(out / "backbone.safetensors"))
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
