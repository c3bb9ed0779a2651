"""Pretraining methods, one file each. ``build`` turns a name and options into a Method."""

from __future__ import annotations

from selfsup.errors import UserError
from selfsup.methods.base import Method
from selfsup.methods.byol import BYOL
from selfsup.methods.deepcluster_v2 import DeepClusterV2
from selfsup.methods.exemplar import Exemplar
from selfsup.methods.infomin import InfoMin
from selfsup.methods.jigsaw import Jigsaw
from selfsup.methods.moco import MoCo, MoCoV2
from selfsup.methods.npid import NPID, InsDis, NPIDPlusPlus
from selfsup.methods.pcl import PCL, PCLV2
from selfsup.methods.pirl import PIRL
from selfsup.methods.relative_patch import RelativePatchLocation
from selfsup.methods.rotation import Rotation
from selfsup.methods.sela_v2 import SeLaV2
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simclr_v2 import SimCLRv2
from selfsup.methods.supervised import Supervised
from selfsup.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {m.name: m for m in (SimCLR, Rotation, Exemplar, RelativePatchLocation, Jigsaw, NPID,
                                                        NPIDPlusPlus, PIRL, Supervised, MoCo, MoCoV2, SimCLRv2,
                                                        InsDis, BYOL, InfoMin, SwAV, DeepClusterV2, SeLaV2, PCL,
                                                        PCLV2)}


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def available() -> dict[str, str]:
    return {name: cls.summary for name, cls in METHODS.items()}


def build(name: str, backbone, params: dict, num_images: int) -> Method:
    cls = get(name)
    return cls(backbone, cls.make_config(params), num_images)


def input_normalization(params: dict) -> tuple[tuple, tuple, bool]:
    """(mean, std, standardize) the method fed its backbone, which evaluation must reuse for the same features."""
    cls = get(params["name"])
    return cls.input_stats(cls.make_config(params))
