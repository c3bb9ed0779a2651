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
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

PRE_LOGITS = "pre_logits"


def scaled(base: int, width: float) -> int:
    """Channels of a layer whose standard (width 1) size is ``base``: ``round(base * width)``, ≥ 1."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(base * width)))


class Backbone(nn.Module):
    """A feature extractor with named taps.

    Subclasses fill ``self.taps`` (tap name -> channels, in forward order, ending with
    ``"pre_logits"``) and implement :meth:`run_stage`, which maps the output of the previous tap to
    the output of tap ``name`` (the first stage receives the image). :meth:`forward` then runs the
    stages in order and stops as soon as the last requested tap is produced, so a probe on
    ``block2`` pays for nothing after ``block2``.

    Feature-map taps are ``B × C × H × W``; ``pre_logits`` is the pooled ``B × D`` vector.
    """

    taps: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.taps = {}

    @property
    def out_dim(self) -> int:
        """Size of the pre-logits representation (``taps["pre_logits"]``)."""
        return self.taps[PRE_LOGITS]

    def run_stage(self, name: str, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_taps(self, taps: str | Iterable[str]) -> list[str]:
        """Normalise a tap request to a list; unknown names raise ``ValueError`` listing valid ones."""
        names = [taps] if isinstance(taps, str) else list(taps)
        if not names:
            raise ValueError(f"request at least one tap; valid taps: {list(self.taps)}")
        unknown = [t for t in names if t not in self.taps]
        if unknown:
            raise ValueError(f"unknown tap(s) {unknown} for {type(self).__name__}; valid taps: {list(self.taps)}")
        return names

    def forward(self, x: Tensor, taps: str | Iterable[str] = (PRE_LOGITS,)) -> dict[str, Tensor]:
        wanted = set(self.check_taps(taps))
        order = list(self.taps)
        last = max(order.index(t) for t in wanted)
        out: dict[str, Tensor] = {}
        for name in order[: last + 1]:
            x = self.run_stage(name, x)
            if name in wanted:
                out[name] = x
        return out

    def extra_repr(self) -> str:
        return f"taps={self.taps}"
