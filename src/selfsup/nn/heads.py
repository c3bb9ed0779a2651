"""Projection and prediction heads: every MLP head in selfsup is one :class:`HeadSpec`, built by :func:`build_head`.

The general shape, for ``layers`` = L linear layers of width h (``hidden_dim``; None = the input dim d)::

    [Linear(·, h, bias=hidden_bias) → BN? → ReLU → Dropout?] × (L − 1)  →  Linear(·, out_dim, bias=out_bias) → BN?

    z = W_L σ(BN(W_{L−1} … σ(BN(W_1 x)))) (+ BN on z)        σ = ReLU

BN goes after every hidden linear layer (``bn="hidden"``) or also after the last one (``bn="all"``);
``bn_momentum`` is PyTorch's (the new batch's weight, = 1 − TF/haiku's decay). ``dropout=p`` puts Dropout(p) after
every hidden ReLU (p = 0 keeps the layer, so indices never depend on p). PyTorch's default init: a caller may
re-initialise the layers (``head[0]`` is the first Linear). ``out_bn_bias=False`` keeps the output BN's shift β at
0, untrained (``requires_grad=False``), while γ learns: TF's ``center=False, scale=True``.

The heads of selfsup and of the papers it follows:

- Rotation, exemplar, NPID, PIRL embeddings (``methods/{rotation,exemplar,npid,pirl}.py``): one
  ``nn.Linear(d, out)`` with bias, which is ``HeadSpec(out_dim=out, layers=1)``; those methods keep the bare
  ``nn.Linear`` so that their checkpoints' keys (``head.weight``) stay those of the runs already written.
- SimCLR v1 as selfsup builds it (``methods/simclr.py``): ``SIMCLR_V1``.
- Kolesnikov et al. 2019's patch-task head (``methods/patch_task.py`` ``fc_head``; its init stays there)::

      HeadSpec(out_dim=classes, hidden_dim=4096, bn="hidden", bn_momentum=0.003, dropout=0.5)
      # Linear(d, 4096) → BN(eps 1e-5, momentum 0.003) → ReLU → Dropout(0.5) → Linear(4096, classes)

- SimCLR v2, MoCo v2, BYOL, SwAV: the constants below, each citing the code it was checked against.

Example::

    projector = build_head(backbone.out_dim, SIMCLR_V2)           # 2048 → 2048 → 2048 → 128
    head = build_head(9 * 128, HeadSpec(out_dim=1000, hidden_dim=4096, bn="hidden", dropout=0.5))
    wide = dataclasses.replace(SIMCLR_V1, hidden_dim=4096)        # specs are frozen values: derive, don't mutate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from selfsup.errors import UserError

_BN_PLACES = ("none", "hidden", "all")


@dataclass(frozen=True)
class HeadSpec:
    """An MLP head: ``layers`` linear layers to ``out_dim``; see the module docstring for the shape."""

    out_dim: int
    layers: int = 2                              # linear layers, >= 1 (1 = a single Linear)
    hidden_dim: int | None = None                # width of the hidden layers; None = the input dim
    bn: Literal["none", "hidden", "all"] = "none"  # BatchNorm1d after hidden linears / also after the last
    hidden_bias: bool = True                     # bias of the hidden linear layers
    out_bias: bool = True                        # bias of the last linear layer
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1                     # PyTorch convention: 1 − TF's decay
    dropout: float | None = None                 # Dropout(p) after every hidden ReLU; None = no Dropout layer
    out_bn_bias: bool = True                     # output BN learns a shift β (False: β frozen at 0; needs bn="all")

    def __post_init__(self):
        for name in ("out_dim", "layers"):
            _positive_int(f"HeadSpec.{name}", getattr(self, name))
        if self.hidden_dim is not None:
            _positive_int("HeadSpec.hidden_dim", self.hidden_dim, "or None for the input dim")
        if self.bn not in _BN_PLACES:
            raise UserError(f"HeadSpec.bn must be one of {', '.join(_BN_PLACES)}, got {self.bn!r}")
        if not (isinstance(self.bn_eps, int | float) and self.bn_eps > 0):
            raise UserError(f"HeadSpec.bn_eps must be a positive number (e.g. 1e-5), got {self.bn_eps!r}")
        if not (isinstance(self.bn_momentum, int | float) and 0 < self.bn_momentum <= 1):
            raise UserError(f"HeadSpec.bn_momentum must be in (0, 1] (PyTorch's: 1 - TF's decay, e.g. 0.1), "
                            f"got {self.bn_momentum!r}")
        if self.dropout is not None and not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise UserError(f"HeadSpec.dropout must be in [0, 1), or None for no Dropout layer, got {self.dropout!r}")
        if not self.out_bn_bias and self.bn != "all":
            raise UserError(f"HeadSpec.out_bn_bias=False needs an output BN: set bn='all' (got bn={self.bn!r}) "
                            "or leave out_bn_bias=True")


def _positive_int(name: str, value, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer{' ' + alternative if alternative else ''}, got {value!r}")


def build_head(in_dim: int, spec: HeadSpec) -> nn.Sequential:
    """The head ``spec`` on ``in_dim``-dimensional inputs (N × in_dim → N × spec.out_dim)."""
    _positive_int("the head's input dim", in_dim)
    hidden = in_dim if spec.hidden_dim is None else spec.hidden_dim
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(spec.layers - 1):
        mods.append(nn.Linear(d, hidden, bias=spec.hidden_bias))
        if spec.bn != "none":
            mods.append(nn.BatchNorm1d(hidden, eps=spec.bn_eps, momentum=spec.bn_momentum))
        mods.append(nn.ReLU(inplace=True))
        if spec.dropout is not None:
            mods.append(nn.Dropout(spec.dropout))
        d = hidden
    mods.append(nn.Linear(d, spec.out_dim, bias=spec.out_bias))
    if spec.bn == "all":
        bn = nn.BatchNorm1d(spec.out_dim, eps=spec.bn_eps, momentum=spec.bn_momentum)
        if not spec.out_bn_bias:
            bn.bias.requires_grad_(False)      # β = 0 from init, never trained
        mods.append(bn)
    return nn.Sequential(*mods)


# SimCLR v1 as selfsup builds it (methods/simclr.py): Linear(d, h, bias=False) → BN → ReLU → Linear(h, 128).
SIMCLR_V1 = HeadSpec(out_dim=128, bn="hidden", hidden_bias=False)

# SimCLR v2 (Chen et al. 2020b; google-research/simclr tf2/model.py ProjectionHead, proj_head_mode="nonlinear",
# num_proj_layers=3, proj_out_dim=128): every layer is LinearLayer(use_bn=True), i.e. Dense(use_bias=False) →
# BatchNormRelu(relu=False, center=use_bias); middle layers use_bias=True (BN with β), width = the input dim,
# then ReLU; the last has use_bias=False → BN center=False (no β) but scale=True (γ). BN eps 1e-5
# (tf2/resnet.py BATCH_NORM_EPSILON), decay 0.9 (tf2/run.py batch_norm_decay) → momentum 0.1.
SIMCLR_V2 = HeadSpec(out_dim=128, layers=3, bn="all", hidden_bias=False, out_bias=False, out_bn_bias=False)

# MoCo v2 (facebookresearch/moco moco/builder.py, mlp=True): fc = Sequential(Linear(dim_mlp, dim_mlp), ReLU(),
# Linear(dim_mlp, 128)), dim_mlp = the input dim (2048 for R-50), both with bias, no BN.
MOCO_V2 = HeadSpec(out_dim=128)

# BYOL (Grill et al. 2020 App. A; google-deepmind/deepmind-research byol/utils/networks.py MLP, configs/byol.py):
# Linear(d, 4096, with_bias=True) → BN(decay 0.9, eps 1e-5) → ReLU → Linear(4096, 256, with_bias=False). The paper
# does not state the biases; we follow the code (lightly instead drops the first bias and keeps the last).
BYOL_PROJECTOR = HeadSpec(out_dim=256, hidden_dim=4096, bn="hidden", out_bias=False)
BYOL_PREDICTOR = BYOL_PROJECTOR                   # the same MLP (networks.py MLP 'predictor') on the 256-d projection

# SwAV (facebookresearch/swav src/resnet50.py, hidden_mlp=2048, output_dim=feat_dim=128; the prototypes are a
# separate bias-free Linear, not part of this head): Linear(2048, 2048) → BN → ReLU → Linear(2048, 128), with bias.
SWAV = HeadSpec(out_dim=128, hidden_dim=2048, bn="hidden")
