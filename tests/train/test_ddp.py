"""The training loop runs under DDP: two CPU processes (gloo) launched by Fabric, one run directory."""

import os
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
