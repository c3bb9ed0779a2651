"""Each method learns on a small real subset: its pretext accuracy climbs well above chance."""

import dataclasses

import torch

from selfsup import backbones, methods
from selfsup.config import OptimConfig
from selfsup.data import load
from selfsup.train.optim import build_optimizer


def _train(name, params, steps, batch, lr, optim="sgd"):
    torch.manual_seed(0)
    data = load("sample", "train")
    images = torch.from_numpy(data.images[:1024]).permute(0, 3, 1, 2)
    net = backbones.build("resnet18", width=0.25, cifar_stem=True)
    method = methods.build(name, net, {"name": name, **params}, num_images=len(images))
    opt = build_optimizer(method, dataclasses.replace(OptimConfig(), name=optim, weight_decay=1e-4), lr)
    history = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        index = torch.randint(0, len(images), (batch,), generator=g)
        out = method(method.views(images[index], index, g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in out.items()})
    return history


def _mean(history, key, part):
    values = [h[key] for h in history]
    n = len(values) // 4
    return sum(values[:n] if part == "first" else values[-n:]) / n


def test_rotation_learns_to_tell_rotations():
    history = _train("rotation", {"view": "simclr_cifar"}, steps=60, batch=32, lr=0.05)
    assert _mean(history, "pretext_acc", "last") > 0.45       # chance is 0.25
    assert _mean(history, "loss", "last") < _mean(history, "loss", "first") - 0.1


def test_simclr_learns_to_match_views():
    history = _train("simclr", {"view": "simclr_cifar", "temperature": 0.5}, steps=60, batch=64, lr=0.1)
    # Retrieval of the other view among 2N-1 = 127 candidates: chance is < 1 %.
    assert _mean(history, "pretext_acc", "last") > 0.15
    assert _mean(history, "loss", "last") < _mean(history, "loss", "first") - 0.3
