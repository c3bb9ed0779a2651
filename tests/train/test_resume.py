"""A run killed with SIGKILL and restarted with the same command ends with the same weights, bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from selfsup.config import build
from selfsup.train.loop import NonFiniteLoss, pretrain

COMMAND = [sys.executable, "-m", "selfsup.cli", "pretrain", "simclr", "--data", "sample", "--backbone", "resnet18",
           "--width", "0.125", "--cifar-stem", "--steps", "8", "--batch-size", "16", "--checkpoint-every", "2",
           "--no-progress", "method.view=simclr_cifar", "method.size=16", "train.log_every=1"]


def _run(out, env):
    subprocess.run([*COMMAND, "--out", str(out)], check=True, env=env, capture_output=True)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}
    _run(tmp_path / "straight", env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*COMMAND, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-run: steps 5-8 and the export have not happened
    proc.wait()
    assert not (killed / "backbone.safetensors").exists()
    _run(killed, env)

    a = load_file(str(tmp_path / "straight" / "backbone.safetensors"))
    b = load_file(str(killed / "backbone.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The metrics log of the resumed run is the uninterrupted one's, row for row.
    straight = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    resumed = (killed / "metrics.csv").read_text().splitlines()
    column = straight[0].split(",").index("loss")
    assert [r.split(",")[column] for r in straight] == [r.split(",")[column] for r in resumed]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = build({"method": {"name": "rotation", "view": "simclr_cifar", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "optim": {"name": "sgd", "lr": 1e9, "warmup_epochs": 0, "schedule": "constant"},
                 "train": {"steps": 20, "batch_size": 8, "checkpoint_every": 1, "progress": False}})
    with pytest.raises(NonFiniteLoss, match=r"at step \d+ .*Last good checkpoint: .*step-0000000\d"):
        pretrain(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").exists()
