"""The training loop runs under DDP: two CPU processes (gloo) launched by Fabric, one run directory."""

import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file


def test_two_process_ddp_run_completes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfsup.cli", "pretrain", "simclr", "--backbone", "resnet18", "--width", "0.125",
           "--cifar-stem", "--steps", "3", "--batch-size", "16", "--accelerator", "cpu", "--devices", "2",
           "--checkpoint-every", "3", "--out", str(out), "method.view=simclr_cifar", "method.size=16"]
    done = subprocess.run(cmd, env={**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    assert done.stdout.count("done:") == 1
    assert (out / "checkpoints" / "step-00000003").is_dir()
    weights = load_file(str(out / "backbone.safetensors"))
    assert all(v.isfinite().all() for v in weights.values())


def test_two_process_memory_bank_run_checkpoints_the_whole_bank_and_resumes(tmp_path):
    out = tmp_path / "run"

    def run():
        cmd = [sys.executable, "-m", "selfsup.cli", "pretrain", "npid", "--backbone", "resnet18", "--width", "0.125",
               "--cifar-stem", "--steps", "4", "--batch-size", "16", "--accelerator", "cpu", "--devices", "2",
               "--checkpoint-every", "2", "--out", str(out), "method.size=16", "method.num_negatives=64"]
        done = subprocess.run(cmd, env={**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    run()
    state = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert state["bank.memory"].shape == (4800, 128)        # each rank holds half; the checkpoint all of it
    assert state["bank.shard"].tolist() == [0, 1, 4800]
    shutil.rmtree(out / "checkpoints" / "step-00000004")   # as if killed after step 2
    (out / "backbone.safetensors").unlink()
    log = run()                                             # resumes on 2 processes, each taking its rows
    assert "resum" in log.lower() and (out / "checkpoints" / "step-00000004").is_dir()
