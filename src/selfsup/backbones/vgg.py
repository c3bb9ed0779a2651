"""VGG with batch norm (Simonyan & Zisserman 2015; Ioffe & Szegedy 2015), as in Kolesnikov et al. 2019.

Kolesnikov, Zhai & Beyer 2019 (§3 "Architectures of CNN models"; code ``models/vggnet.py``) use
VGG-19 with BN after every conv *and* after fc6/fc7, and therefore no dropout. Five conv blocks of
(2, 2, 4, 4, 4) 3×3 convs (VGG-19; VGG-11/16 use (1, 1, 2, 2, 2) / (2, 2, 3, 3, 3)), a 2×2 max-pool
after each, then fc6 and fc7; pre-logits = fc7.

Width: the paper's width is ``8·k`` conv channels in the first block with k = 8 the vanilla network
(64 channels) and fc6/fc7 of ``512·k`` (4096). Here ``width = k / 8``: ``width=1.0`` is vanilla VGG,
conv channels ``round(64·width)`` … ``round(512·width)``, fc6/fc7 ``round(4096·width)``.

Layout: ``features`` has exactly torchvision's ``vgg*_bn().features`` layout (conv with bias, BN,
ReLU, max-pool; same indices), so those weights load unchanged. The conv bias is redundant before BN
(the paper's code drops it); we keep it only for that compatibility (5,504 parameters in VGG-19).
fc6/fc7 are ``Linear(bias=False) + BatchNorm1d + ReLU`` as in the paper (fc6 is a 7×7 VALID conv
there, i.e. a linear layer on the flattened 7×7 map).

Input size: before fc6 the last (pooled) map is adaptively average-pooled to 7×7 (identity at 224 px,
as in the paper) or to 1×1 when ``cifar_stem=True`` (at 32 px it already is 1×1; this keeps fc6 at
512·width inputs instead of a 25088-wide layer on replicated pixels). The max-pools round up
(``ceil_mode``, as Caffe's): identical to torchvision's wherever the map halves evenly (224, 96, 64, 32 px), and a patch
model's small tiles never pool to nothing: a 14 px tile (the 64 px input's patch geometry) goes
14 → 7 → 4 → 2 → 1 → 1 instead of reaching 0×0 at the fifth pool.

Taps. The contract names every family's end points alike, so the paper's VGG names shift by one:

====================  ==================================  =====================
our tap               what it is                          paper's code name
====================  ==================================  =====================
``after_root``        conv block 1 (before its max-pool)  ``block1``
``block1``…``block4`` conv blocks 2…5 (before max-pool)   ``block2``…``block5``
``fc6``               fc6 after BN-ReLU, ``B × 4096·w``   ``fc6``
``pre_logits``        fc7 after BN-ReLU, ``B × 4096·w``   ``pre_logits``
====================  ==================================  =====================

VGG has no strided conv and no final ReLU variant: ``first_conv_stride1`` / ``last_stage_stride1``
are accepted and ignored (the paper's patch models keep VGG unchanged), ``final_relu=False`` is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.errors import UserError

from .base import PRE_LOGITS, Backbone, scaled

#: convs per block (Simonyan & Zisserman 2015, Table 1, configurations A, D, E)
DEPTHS: dict[int, tuple[int, int, int, int, int]] = {
    11: (1, 1, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
BLOCK_TAPS = ("after_root", "block1", "block2", "block3", "block4")
BLOCK_CHANNELS = (64, 128, 256, 512, 512)


class VGG(Backbone):
    """VGG-BN with named taps; see the module docstring.

    Args:
        depth: 11, 16 or 19.
        width: k / 8 in Kolesnikov et al.'s notation; 1.0 is vanilla VGG (fc7 = 4096).
        cifar_stem: pool the last conv map to 1×1 instead of 7×7 before fc6 (small inputs).
    """

    def __init__(
        self,
        depth: int = 19,
        width: float = 1.0,
        cifar_stem: bool = False,
        first_conv_stride1: bool = False,
        last_stage_stride1: bool = False,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise UserError(f"VGG depth must be one of {sorted(DEPTHS)}, got {depth}")
        if not final_relu:
            raise UserError("final_relu=False (the '(-)' variant) exists only for ResNet v2 and RevNet")
        del first_conv_stride1, last_stage_stride1  # see module docstring: VGG has no strided conv
        self.depth, self.width = depth, width

        layers: list[nn.Module] = []
        # index in ``features`` where each block's tap is read (after its last ReLU, before its pool)
        self._block_ends: list[int] = []
        cin = 3
        for i, (n, base) in enumerate(zip(DEPTHS[depth], BLOCK_CHANNELS, strict=True)):
            if i > 0:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            cout = scaled(base, width)
            for _ in range(n):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            self._block_ends.append(len(layers))
            self.taps[BLOCK_TAPS[i]] = cout
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)

        self.pool_size = 1 if cifar_stem else 7
        self.avgpool = nn.AdaptiveAvgPool2d(self.pool_size)
        hidden = scaled(4096, width)
        self.fc6 = nn.Sequential(
            nn.Linear(cin * self.pool_size**2, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fc7 = nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.taps["fc6"] = hidden
        self.taps[PRE_LOGITS] = hidden
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG init: He normal (fan_out) convs, N(0, 0.01) linear layers, BN 1 / 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        if name in BLOCK_TAPS:
            i = BLOCK_TAPS.index(name)
            start = 0 if i == 0 else self._block_ends[i - 1]
            for layer in self.features[start : self._block_ends[i]]:
                x = layer(x)
            return x
        if name == "fc6":
            x = self.features[-1](x)  # the pool after block 5
            return self.fc6(torch.flatten(self.avgpool(x), 1))
        return self.fc7(x)
