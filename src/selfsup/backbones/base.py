"""The one interface every backbone implements: named feature taps, computed lazily.

Kolesnikov et al. 2019 (§3, "Evaluation of learned visual representations" and the layer-wise study)
read representations at fixed end points of each network: ``after_root``, ``block1`` … ``block4`` and
``pre_logits``. Every family here exposes the same names so that probes, feature caches and the
layer-wise analysis never need to know which architecture they look at (the timm ``features_only``
idea, made explicit).

Usage::

    net = build("resnet50", width=0.25, cifar_stem=True)
    net.taps                      # {"after_root": 16, "block1": 64, ..., "pre_logits": 512}
    out = net(x, taps=("block2",))  # runs the root, block1 and block2 only
    out["block2"].shape           # B x 128 x 16 x 16 for 32 px inputs

Representation size (Kolesnikov, Zhai, Beyer 2019, "Revisiting Self-Supervised Visual Representation
Learning", CVPR 2019, study of model width and representation size): to separate the size of the
representation from the width k, the paper puts one extra linear layer between the pooled features and
the logits (RevNet-50 Rotation; a thin model goes from 31% to 43% by representation size alone).
:meth:`Backbone.add_representation` (reached through ``build(..., representation_dim=d)``) does this for
every family::

    net = build("revnet50", width=0.25, representation_dim=2048)
    net.taps    # {..., "block4": 512, "pooled": 512, "pre_logits": 2048}
    net.out_dim  # 2048

The layer is an affine map with bias and nothing after it (no BN, no ReLU): the paper describes only "an
additional linear layer", and the released code (google/revisiting-self-supervised, models/resnet.py)
has no such layer at all, its ``pre_logits`` being the global average pool followed directly by the
logits convolution (1×1 conv with bias, TF default Glorot-uniform kernel and zero bias). The extra layer
is initialised the same way. The previous pooled vector stays readable as the ``"pooled"`` tap.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import UserError

PRE_LOGITS = "pre_logits"
POOLED = "pooled"
REPRESENTATION = "representation"


def scaled(base: int, width: float) -> int:
    """Channels of a layer whose standard (width 1) size is ``base``: ``round(base * width)``, ≥ 1."""
    if width <= 0:
        raise UserError(f"width must be > 0, got {width}")
    return max(1, int(round(base * width)))


class Backbone(nn.Module, abc.ABC):
    """A feature extractor with named taps.

    Subclasses fill ``self.taps`` (tap name -> channels, in forward order, ending with
    ``"pre_logits"``) and implement :meth:`run_stage`, which maps the output of the previous tap to
    the output of tap ``name`` (the first stage receives the image). :meth:`forward` then runs the
    stages in order and stops as soon as the last requested tap is produced, so a probe on
    ``block2`` pays for nothing after ``block2``.

    Feature-map taps are ``B × C × H × W``; ``pre_logits`` is the pooled ``B × D`` vector.

    With :meth:`add_representation` (the paper's representation-size study) the family's pooled vector
    becomes the ``"pooled"`` tap and ``"pre_logits"`` is an extra linear layer on it, stored as the
    submodule ``representation`` (state-dict keys ``representation.weight`` / ``representation.bias``;
    backbones without it keep exactly their own keys).
    """

    taps: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.taps = {}

    @property
    def out_dim(self) -> int:
        """Size of the pre-logits representation (``taps["pre_logits"]``)."""
        return self.taps[PRE_LOGITS]

    @property
    def representation_layer(self) -> nn.Linear | None:
        """The extra pre-logits linear layer of the representation-size study, or ``None``."""
        rep = self._modules.get(REPRESENTATION)
        return rep if isinstance(rep, nn.Linear) else None

    def add_representation(self, dim: int, relu: bool = False) -> nn.Linear:
        """Set the pre-logits size to ``dim`` independently of the width (Kolesnikov et al. 2019).

        Appends one linear layer (with bias, no normalisation or activation) from the pooled features
        to ``dim`` dims; ``relu=True`` puts a ReLU after it (SimCLR v2's export of its projector's first
        layer, ``methods.simclr_v2``: without it the layer would be an affine map a linear probe undoes).
        The old pooled vector is renamed to the ``"pooled"`` tap, placed just before ``"pre_logits"``, so
        layer-wise probes still see it; ``taps["pre_logits"]`` and :attr:`out_dim` become ``dim``. The layer
        is created on the device and dtype of the backbone's parameters.
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise UserError(f"representation_dim must be a positive int, got {dim!r}")
        if self.representation_layer is not None or POOLED in self.taps:
            raise UserError(f"{type(self).__name__} already has a representation layer")
        pooled = self.taps[PRE_LOGITS]
        ref = next(self.parameters(), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        layer = nn.Linear(pooled, dim, bias=True, **factory)
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
        self.add_module(REPRESENTATION, layer)
        self.representation_relu = relu
        taps = {k: v for k, v in self.taps.items() if k != PRE_LOGITS}
        taps[POOLED] = pooled
        taps[PRE_LOGITS] = dim
        self.taps = taps
        return layer

    @abc.abstractmethod
    def run_stage(self, name: str, x: Tensor) -> Tensor:
        """Compute tap ``name`` from the previous tap's output (each family defines its stages)."""

    def _stage(self, name: str, x: Tensor) -> Tensor:
        """:meth:`run_stage`, with the representation layer (if any) spliced in after ``"pooled"``."""
        rep = self.representation_layer
        if rep is not None:
            if name == POOLED:
                return self.run_stage(PRE_LOGITS, x)
            if name == PRE_LOGITS:
                return F.relu(rep(x)) if self.representation_relu else rep(x)
        return self.run_stage(name, x)

    def check_taps(self, taps: str | Iterable[str]) -> list[str]:
        """Normalise a tap request to a list; unknown names raise ``ValueError`` listing valid ones."""
        names = [taps] if isinstance(taps, str) else list(taps)
        if not names:
            raise UserError(f"request at least one tap; valid taps: {list(self.taps)}")
        unknown = [t for t in names if t not in self.taps]
        if unknown:
            raise UserError(f"unknown tap(s) {unknown} for {type(self).__name__}; valid taps: {list(self.taps)}")
        return names

    def forward(self, x: Tensor, taps: str | Iterable[str] = (PRE_LOGITS,)) -> dict[str, Tensor]:
        wanted = set(self.check_taps(taps))
        order = list(self.taps)
        last = max(order.index(t) for t in wanted)
        out: dict[str, Tensor] = {}
        for name in order[: last + 1]:
            x = self._stage(name, x)
            if name in wanted:
                out[name] = x
        return out

    def extra_repr(self) -> str:
        return f"taps={self.taps}"
