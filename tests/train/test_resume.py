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
from selfsup.errors import UserError
from selfsup.train.loop import NonFiniteLoss, pretrain

COMMAND = [sys.executable, "-m", "selfsup.cli", "pretrain", "simclr", "--data", "sample", "--backbone", "resnet18",
           "--width", "0.125", "--cifar-stem", "--steps", "8", "--batch-size", "16", "--checkpoint-every", "2",
           "--no-progress", "method.view=simclr_cifar", "method.size=16", "train.log_every=1"]


# MoCo on 40 images (4 per class), batch 16: 2 steps an epoch, so the kill after step 4 falls right after an
# epoch boundary, with the key encoder, the queue and its pointer in the checkpoint
MOCO = [sys.executable, "-m", "selfsup.cli", "pretrain", "moco", "--data", "sample", "--backbone", "resnet18",
        "--width", "0.125", "--cifar-stem", "--steps", "8", "--batch-size", "16", "--checkpoint-every", "2",
        "--no-progress", "method.view=simclr_cifar", "method.size=16", "method.queue_size=32", "data.per_class=4",
        "train.log_every=1"]


# BYOL the same way: the target network (an EMA at the cosine τ of the step) and both heads in the checkpoint
BYOL = [*MOCO[:4], "byol", *[a for a in MOCO[5:] if not a.startswith("method.")], "method.size=16",
        "method.proj_hidden=64", "method.pred_hidden=64"]


def _run(out, env, command=COMMAND):
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)


@pytest.mark.parametrize("command", [COMMAND, MOCO, BYOL],
                         ids=["simclr", "moco-at-an-epoch-boundary", "byol-at-an-epoch-boundary"])
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, command):
    env = {**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}
    _run(tmp_path / "straight", env, command)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-run: steps 5-8 and the export have not happened
    proc.wait()
    assert not (killed / "backbone.safetensors").exists()
    _run(killed, env, command)

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


def test_sigterm_checkpoints_exits_75_and_resumes_to_the_uninterrupted_weights(tmp_path):
    """What SLURM sends before it kills or requeues a job: the run stops after its step with a checkpoint
    (at whatever step that is, not only at checkpoint_every), exits 75, and --requeue asks SLURM to rerun it."""
    bin_dir = tmp_path / "bin"   # a stand-in scontrol that records how it was called
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "SELFSUP_HOME": str(tmp_path / "home"), "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    _run(tmp_path / "straight", env)

    stopped = tmp_path / "stopped"
    command = [*COMMAND, "--out", str(stopped), "--requeue"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert "Resume with the same command" in stderr and "SIGTERM" in stdout + stderr
    assert not (stopped / "backbone.safetensors").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (stopped / "checkpoints").glob("step-*"))
    assert 2 < steps[-1] < 8, steps          # checkpointed where it stopped, before the end
    assert calls.read_text().split() == ["requeue", "4242"]

    subprocess.run(command, check=True, env=env, capture_output=True)   # the requeued job: same command
    a = load_file(str(tmp_path / "straight" / "backbone.safetensors"))
    b = load_file(str(stopped / "backbone.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_requeue_outside_slurm_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = build({"method": {"name": "rotation"}, "train": {"steps": 2, "batch_size": 8, "requeue": True}})
    with pytest.raises(UserError, match="SLURM_JOB_ID is not set"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
