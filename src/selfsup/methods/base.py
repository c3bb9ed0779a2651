"""The Method contract: a pretext task or self-supervised objective around a backbone.

A method is one ``nn.Module`` holding the backbone, its heads and any state (memory bank, queue,
momentum encoder, cluster assignments) as buffers or submodules, so that ``state_dict()`` resumes it
exactly. The training loop (``train/loop.py``) calls, in this order::

    method.setup(train_set)                          # once, before training: labels, dataset-wide passes
    for each step:                                   # info: StepInfo (step, epoch, step within the epoch, ...)
        if info.within == 0:
            method.epoch_start(info, g_epoch)        # clustering, memory refills; results kept in buffers
        views = method.views(images_uint8, index, g, info)   # on the device, batched, randomness from g only
        out = method(views, info)                    # {"loss": tensor, logged scalars..., "state": {...}}
        ... backward ...
        method.before_optimizer_step(info)           # gradient freezing or cancelling
        ... optimizer step ...
        method.after_step(out["state"], info)        # EMA, memory-bank write, queue push
    method.export()                                  # the module written to backbone.safetensors

Rules that make a killed-and-resumed run equal the uninterrupted one:

- ``g`` is a CPU ``torch.Generator`` seeded from (seed, step, rank), ``g_epoch`` one seeded from (seed,
  epoch): every random choice a method makes comes from them, never from a stream that runs across steps.
- Schedules (BYOL's τ, a queue that starts at some epoch, frozen prototypes) are functions of ``info``.
- ``epoch_start`` runs when an epoch begins, not again when a run resumes in the middle of one: what it
  computes must live in buffers (they are in the checkpoint).
- ``forward`` returns the logged scalars at the top level and the tensors ``after_step`` needs under
  ``"state"`` (never logged); nothing else travels between the two.
- State that differs between processes (a sharded memory bank) implements
  :class:`selfsup.nn.distributed.ShardedState`: checkpoints gather it whole and DDP leaves it alone.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.backbones.base import Backbone
from selfsup.config import POSITIVE, Range, one_of
from selfsup.views.augment import PRESETS

# The pretext optimisation of Kolesnikov et al. 2019's public configs (config/*/imagenet.sh), shared by
# rotation, exemplar, relative_patch and jigsaw: SGD momentum 0.9, lr 0.1 × batch/256, weight decay 1e-4,
# 5 warmup epochs, 35 epochs with ×0.1 at epochs 15 and 25.
REVISITING_OPTIM = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, warmup_epochs=5, schedule="step",
                        milestones=[15, 25], gamma=0.1)


# Fields many methods share: a crop size in pixels, an augmentation preset.
COMMON_LIMITS = {"size": Range(1, 8192), "view": one_of(*PRESETS), "temperature": POSITIVE, "embed_dim": Range(1)}


@dataclass(frozen=True)
class StepInfo:
    """Where training is, handed to ``views``, ``forward``, ``epoch_start``, ``before_optimizer_step`` and
    ``after_step``: global ``step`` (0-based, the one being taken), ``epoch`` and ``within`` (the step inside
    the epoch), ``steps_per_epoch``, ``total`` steps of the run, and the run's ``seed``."""

    step: int
    epoch: int
    within: int
    steps_per_epoch: int
    total: int
    seed: int = 0

    @classmethod
    def at(cls, step: int, steps_per_epoch: int = 1, total: int | None = None, seed: int = 0) -> StepInfo:
        """The info of ``step`` in a run of ``total`` steps (default: ``step + 1``)."""
        epoch, within = divmod(step, steps_per_epoch)
        return cls(step, epoch, within, steps_per_epoch, step + 1 if total is None else total, seed)

    @property
    def progress(self) -> float:
        """The fraction of training done before this step, in [0, 1): k / K of BYOL's τ schedule."""
        return self.step / self.total


@dataclass
class TrainSet:
    """What ``Method.setup`` may know of the training images: their number, labels (on the device, in the
    order ``index`` points into), class count, and ``encode`` for a pass over all of them."""

    num_images: int
    labels: torch.Tensor
    num_classes: int
    images: Any          # selfsup.data.loader.DeviceImages: ``get(index)`` -> uint8 B×3×H×W on the device
    device: torch.device
    rank: int = 0
    world: int = 1
    name: str = "the training set"   # for messages: "'cifar10' (train split)"
    batch_size: int = 0              # the global batch of a training step (a queue must be a multiple of it)

    def encode(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``fn(images_uint8, index)`` over this process's share of the images (``rank::world``), under
        no_grad, in index order; returns (index, outputs). The clustering methods fill their memories so."""
        index = torch.arange(self.rank, self.num_images, self.world, device=self.device)
        outputs = []
        with torch.no_grad():
            for chunk in index.split(batch_size):
                outputs.append(fn(self.images.get(chunk), chunk))
        return index, torch.cat(outputs)


class Method(nn.Module, abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]                 # the method's own dataclass of hyperparameters
    optim_defaults: ClassVar[dict] = {}    # the source paper's optimiser recipe (OptimConfig fields)
    limits: ClassVar[dict] = {}            # Config field -> selfsup.config.Range | OneOf, checked by make_config

    def __init__(self, backbone: Backbone, cfg: Any, num_images: int):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.num_images = num_images
        # parameter-name prefix -> weight decay, for heads trained with their own (the patch tasks' fc head)
        self.weight_decay_overrides: dict[str, float] = {}

    def setup(self, train_set: TrainSet) -> None:  # noqa: B027 - optional hook
        """Once, before the first step (and again on resume, before the checkpoint is loaded): labels,
        dataset-wide encoders. Default: nothing."""

    def epoch_start(self, info: StepInfo, g: torch.Generator) -> None:  # noqa: B027 - optional hook
        """At the start of every epoch (``info.within == 0``), not again on a resume mid-epoch. Default: nothing."""

    @abc.abstractmethod
    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        """Turn a uint8 batch (B×3×H×W on the device) into the method's inputs."""

    @abc.abstractmethod
    def forward(self, views: dict, info: StepInfo) -> dict:
        """``{"loss": scalar tensor, other scalars to log..., "state": {...}}``; ``state`` (optional) is what
        ``after_step`` receives."""

    def before_optimizer_step(self, info: StepInfo) -> None:  # noqa: B027 - optional hook
        """Between backward and the optimiser step: gradient freezing or cancelling. Default: nothing."""

    def after_step(self, state: dict, info: StepInfo) -> None:  # noqa: B027 - optional hook
        """After the optimiser step, with ``forward``'s ``"state"``: EMA, memory-bank write. Default: nothing."""

    def export(self) -> nn.Module:
        """The module written to ``backbone.safetensors`` (a :class:`Backbone`). Default: the backbone."""
        return self.backbone

    @classmethod
    def input_stats(cls, cfg: Any) -> tuple[tuple, tuple, bool]:
        """(mean, std, standardize) of what the backbone was fed, which evaluation must reproduce:
        per-channel normalisation, or per-image standardisation when ``standardize`` is True.
        Default: the mean/std of the method's view preset (``cfg.view``)."""
        from selfsup.views.augment import PRESETS

        view = PRESETS[cfg.view]
        if view.mean is None:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False
        return tuple(view.mean), tuple(view.std), False

    @classmethod
    def make_config(cls, params: dict) -> Any:
        """The method's Config from a mapping: unknown keys named with the valid ones, every value typed
        against its field (:func:`selfsup.config.coerce`) and checked against :attr:`limits`."""
        from selfsup.config import typed

        params = {k: v for k, v in params.items() if k != "name"}
        return typed(cls.Config, params, "method.", {**COMMON_LIMITS, **cls.limits})
