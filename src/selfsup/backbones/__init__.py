"""Backbones: ResNet v1/v2, RevNet and VGG-BN with width k and the same named taps.

The four architecture families of Kolesnikov et al. 2019 (§3), plus shallower depths for CPU studies::

    from selfsup.backbones import available, build
    net = build("resnet50", width=0.25, cifar_stem=True)   # width = k/4 (ResNet/RevNet), k/8 (VGG)
    feats = net(images, taps=("block3", "pre_logits"))

Every backbone exposes ``taps`` (name -> channels, in forward order) ``after_root``, ``block1`` …
``block4`` (VGG also ``fc6``) and ``pre_logits``, and ``out_dim`` (the pre-logits size).

``build(..., representation_dim=d)`` is Kolesnikov et al. 2019's representation-size study:
one extra linear layer sets the pre-logits size to ``d`` independently of the width k (RevNet-50
Rotation: a thin model goes from 31% to 43% by representation size alone). The family's pooled vector
then becomes the ``"pooled"`` tap, just before ``"pre_logits"``; see :meth:`Backbone.add_representation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfsup.errors import UserError

from .base import Backbone
from .resnet import ResNet
from .revnet import RevNet
from .vgg import VGG

__all__ = ["Backbone", "ResNet", "RevNet", "VGG", "available", "build"]

_Factory = Callable[..., Backbone]
_REGISTRY: dict[str, tuple[_Factory, str]] = {}


def _register(name: str, factory: _Factory, description: str) -> None:
    _REGISTRY[name] = (factory, description)


def _resnet(depth: int, version: int) -> _Factory:
    def make(**kw: Any) -> Backbone:
        return ResNet(depth=depth, version=version, **kw)

    return make


def _revnet(depth: int) -> _Factory:
    def make(**kw: Any) -> Backbone:
        return RevNet(depth=depth, **kw)

    return make


def _vgg(depth: int) -> _Factory:
    def make(**kw: Any) -> Backbone:
        return VGG(depth=depth, **kw)

    return make


_WIDTH_RES = "width=k/4 (1.0 = standard, 4.0 = paper's k=16)"
for _d in (18, 34, 50, 101, 152):
    _dim = 512 if _d < 50 else 2048
    _register(
        f"resnet{_d}",
        _resnet(_d, 1),
        f"ResNet-{_d} v1 (He et al. 2016a, stride on 3x3); {_dim}·width-d pre-logits; {_WIDTH_RES}",
    )
    _register(
        f"resnet{_d}_v2",
        _resnet(_d, 2),
        f"ResNet-{_d} v2 pre-activation (He et al. 2016b); {_dim}·width-d pre-logits; {_WIDTH_RES}; "
        "final_relu=False is '(-)'",
    )
for _d in (26, 38, 50, 101):
    _register(
        f"revnet{_d}",
        _revnet(_d),
        f"RevNet-{_d} (Gomez et al. 2017, as in Kolesnikov et al.); 2048·width-d pre-logits; {_WIDTH_RES}; "
        "memory_saving, final_relu=False is '(-)'",
    )
for _d in (11, 16, 19):
    _register(
        f"vgg{_d}_bn",
        _vgg(_d),
        f"VGG-{_d} with BN, fc6/fc7 + BN, no dropout; 4096·width-d pre-logits (fc7); width=k/8 (1.0 = vanilla)",
    )


def available() -> dict[str, str]:
    """Backbone name -> one-line description (for ``selfsup list backbones``)."""
    return {name: desc for name, (_, desc) in _REGISTRY.items()}


def build(
    name: str,
    width: float = 1.0,
    cifar_stem: bool = False,
    representation_dim: int | None = None,
    representation_relu: bool = False,
    **kw: Any,
) -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :func:`available` (case-insensitive).
        width: the paper's k / 4 for ResNet/RevNet, k / 8 for VGG; 1.0 is the published network.
        cifar_stem: 3×3 stride-1 root, no max-pool (ResNet/RevNet); 1×1 pool before fc6 (VGG).
        representation_dim: the representation-size study of Kolesnikov et al. 2019 ("Revisiting
            Self-Supervised Visual Representation Learning", CVPR 2019): when set, the pooled features pass
            through one extra linear layer (bias, no BN/activation) to this many dims, which becomes the
            ``"pre_logits"`` tap and ``out_dim``; the previous pooled vector is the ``"pooled"`` tap.
            ``None`` (default) builds the plain family network with unchanged state-dict keys.
        representation_relu: a ReLU after that layer (SimCLR v2's exported projector layer).
        **kw: family options: ``first_conv_stride1``, ``last_stage_stride1``, ``final_relu``,
            ``zero_init_residual`` (ResNet/RevNet), ``memory_saving`` (RevNet).
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise UserError(f"unknown backbone {name!r}; available: {', '.join(_REGISTRY)}")
    factory, _ = _REGISTRY[key]
    net = factory(width=width, cifar_stem=cifar_stem, **kw)
    if representation_relu and representation_dim is None:
        raise UserError("representation_relu needs representation_dim (the layer the ReLU follows)")
    if representation_dim is not None:
        net.add_representation(representation_dim, relu=representation_relu)
    return net
