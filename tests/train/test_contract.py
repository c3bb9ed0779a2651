"""The Method contract as the loop drives it: setup once, epoch_start at each epoch's first step (and not again
on a resume mid-epoch), views/forward/before_optimizer_step/after_step with the step's StepInfo, the "state"
of forward reaching after_step unlogged, and export() becoming backbone.safetensors."""

import csv
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from selfsup import methods
from selfsup.config import build
from selfsup.methods.base import Method, StepInfo
from selfsup.train.loop import pretrain
from selfsup.views.augment import PRESETS, make_view

CALLS: list[tuple] = []
STOP_AT: list[int] = []      # a step whose after_step raises, as a kill would stop the run there


class Killed(Exception):
    pass


@dataclass
class RecorderConfig:
    view: str = "simclr_cifar"
    size: int | None = 16


class Recorder(Method):
    name = "recorder"
    summary = "test method that records the hooks the loop calls"
    Config = RecorderConfig

    def __init__(self, backbone, cfg, num_images):
        super().__init__(backbone, cfg, num_images)
        self.head = nn.Linear(backbone.out_dim, 3)
        self.register_buffer("epochs_started", torch.zeros(8, dtype=torch.long))   # epoch_start's results: buffers

    def setup(self, train_set):
        CALLS.append(("setup", train_set.num_images, train_set.num_classes, tuple(train_set.labels.shape)))

    def epoch_start(self, info, g):
        CALLS.append(("epoch_start", info.epoch, info.step))
        self.epochs_started[info.epoch] += 1

    def views(self, images, index, g, info):
        CALLS.append(("views", info))
        return {"x": make_view(images, PRESETS[self.cfg.view], g=g)}

    def forward(self, views, info):
        loss = self.head(self.backbone(views["x"])["pre_logits"]).pow(2).mean()
        return {"loss": loss, "marker": torch.tensor(float(info.step)), "state": {"step": torch.tensor(info.step)}}

    def before_optimizer_step(self, info):
        # between backward and step: gradients are there, the weights are still the ones the loss saw
        CALLS.append(("before_optimizer_step", info.step, self.head.weight.grad is not None))

    def after_step(self, state, info):
        CALLS.append(("after_step", info.step, int(state["step"])))
        if info.step in STOP_AT:
            raise Killed

    def export(self):
        CALLS.append(("export",))
        return self.backbone


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "recorder", Recorder)
    CALLS.clear()
    STOP_AT.clear()
    yield
    CALLS.clear()
    STOP_AT.clear()


def _cfg():
    # 20 images (2 per class), batch 8: 2 steps an epoch, 5 steps = epochs 0, 1 and the first step of 2
    return build({"method": {"name": "recorder"}, "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                  "data": {"per_class": 2}, "optim": {"name": "sgd", "lr": 0.01},
                  "train": {"steps": 5, "batch_size": 8, "checkpoint_every": 1, "log_every": 1, "progress": False}})


def test_the_loop_calls_the_hooks_in_order_with_the_step_info(tmp_path, recorder):
    run = pretrain(_cfg(), tmp_path / "run")
    assert CALLS[0] == ("setup", 20, 10, (20,))
    step_calls = [c for c in CALLS if c[0] in ("epoch_start", "before_optimizer_step", "after_step")]
    assert step_calls == [("epoch_start", 0, 0),
                          ("before_optimizer_step", 0, True), ("after_step", 0, 0),
                          ("before_optimizer_step", 1, True), ("after_step", 1, 1),
                          ("epoch_start", 1, 2),
                          ("before_optimizer_step", 2, True), ("after_step", 2, 2),
                          ("before_optimizer_step", 3, True), ("after_step", 3, 3),
                          ("epoch_start", 2, 4),
                          ("before_optimizer_step", 4, True), ("after_step", 4, 4)]
    infos = [c[1] for c in CALLS if c[0] == "views"][1:]     # the first is the views check before training
    assert infos == [StepInfo(s, s // 2, s % 2, 2, 5, 0) for s in range(5)]
    assert CALLS[-1] == ("export",)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["marker"]) for r in rows] == [0, 1, 2, 3, 4] and "state" not in rows[0] and "step" in rows[0]
    exported = load_file(str(run / "backbone.safetensors"))
    assert exported.keys() == {k for k in _backbone_keys()}


def _backbone_keys():
    from selfsup import backbones

    return backbones.build("resnet18", width=0.125, cifar_stem=True).state_dict().keys()


def test_epoch_start_is_not_rerun_when_a_run_resumes_mid_epoch(tmp_path, recorder):
    straight = pretrain(_cfg(), tmp_path / "straight")
    CALLS.clear()
    STOP_AT.append(3)                     # step 3 is the second of epoch 1: the checkpoint after step 2 survives
    with pytest.raises(Killed):
        pretrain(_cfg(), tmp_path / "killed")
    STOP_AT.clear()
    pretrain(_cfg(), tmp_path / "killed")
    starts = [c for c in CALLS if c[0] == "epoch_start"]
    assert starts == [("epoch_start", 0, 0), ("epoch_start", 1, 2), ("epoch_start", 2, 4)]   # epoch 1: once
    from selfsup.train import checkpoint

    a = checkpoint.load_model_state(checkpoint.latest(straight))
    b = checkpoint.load_model_state(checkpoint.latest(tmp_path / "killed"))
    assert a["epochs_started"].tolist()[:3] == [1, 1, 1]
    for key in a:
        assert torch.equal(a[key], b[key]), key
