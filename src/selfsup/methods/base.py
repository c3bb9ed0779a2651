"""The Method contract: a pretext task or self-supervised objective around a backbone.

A method is one ``nn.Module`` holding the backbone, its heads and any state (memory bank, queue,
momentum encoder) as buffers or submodules, so that ``state_dict()`` resumes it exactly. Per step
the training loop calls::

    views = method.views(images_uint8, index, g)   # on the device, batched, randomness from g only
    out = method(views)                            # {"loss": tensor, other scalars to log}
    ... backward, optimizer step ...
    method.after_step(out, step)                   # EMA, memory-bank write, queue push

``g`` is a CPU ``torch.Generator`` seeded from (seed, step, rank) by the loop: every random choice
a method makes comes from it, which is what makes a killed-and-resumed run equal the uninterrupted one.
"""

from __future__ import annotations

import abc
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

    @abc.abstractmethod
    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator) -> dict:
        """Turn a uint8 batch (B×3×H×W on the device) into the method's inputs."""

    @abc.abstractmethod
    def forward(self, views: dict) -> dict:
        """Return ``{"loss": scalar tensor, ...}``; other entries are logged as scalars."""

    def after_step(self, out: dict, step: int) -> None:
        """Called after the optimiser step; default no-op."""

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
