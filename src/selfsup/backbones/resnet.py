"""ResNet v1 (He et al. 2016a) and pre-activation ResNet v2 (He et al. 2016b), with width k.

Two of the four architectures of Kolesnikov, Zhai & Beyer 2019, *Revisiting Self-Supervised Visual
Representation Learning* (§3 "Architectures of CNN models"; code ``models/resnet.py``).

Width. The paper scales every layer by a widening factor k with k = 4 the standard network: root
conv 16·k channels, stage outputs 64·k … 512·k, pre-logits 512·k (2048 / 4096 / 6144 / 8192 for
k = 4 / 8 / 12 / 16). Here ``width = k / 4``: ``width=1.0`` is the published ResNet-50 (64 root
channels, 2048-d pre-logits), ``width=4.0`` is the paper's k = 16 (8192-d). Every layer has
``round(base · width)`` channels (at least 1), so fractional widths (0.25, 0.5) give CPU-sized nets.

v1 follows the torchvision layout ("v1.5": the bottleneck's stride sits on the 3×3 conv, as the paper's
code does, because a strided 1×1 conv throws away 3/4 of its input) and uses the same parameter
names (``conv1``, ``bn1``, ``layer1.0.downsample.0`` …) so torchvision-layout checkpoints such as those
benchmarked by Ericsson et al. 2021 load after dropping ``fc.*``. v2 is the pre-activation network of
He et al. 2016b as written in the paper's code: the root is a bare conv (no BN/ReLU) + max-pool, each
unit starts with BN-ReLU whose output also feeds the projection shortcut, and a final BN-ReLU
precedes global pooling. ``final_relu=False`` is the paper's "(-)" variant (BN kept, ReLU dropped).

Taps: ``after_root`` (after the max-pool), ``block1``…``block4`` (stage outputs; for v2 these are the
raw residual sums, before any BN), ``pre_logits`` (global average pool).

Options. ``cifar_stem``: 3×3 stride-1 root conv and no max-pool (32-64 px inputs).
``first_conv_stride1`` / ``last_stage_stride1``: the paper's patch models (Jigsaw, Relative Patch
Location) use ``root_conv_stride=1, strides=(2, 2, 1)``. ``zero_init_residual``: start every residual
branch at zero (v1: last BN weight, as in torchvision; v2: last conv weight, since no BN ends the
branch), so each unit starts as the identity (Goyal et al. 2017).
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.errors import UserError

from .base import PRE_LOGITS, Backbone, scaled

STAGES = ("block1", "block2", "block3", "block4")

#: units per stage and whether the unit is a bottleneck (He et al. 2016a, Table 1)
DEPTHS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


# ----------------------------------------------------------------------------------------- v1 units
class BasicBlock(nn.Module):
    """v1 basic unit (ResNet-18/34): conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, mid, stride)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(mid, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None
        )

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """v1 bottleneck: 1x1 → 3x3 (strided, "v1.5") → 1x1 with BN after each conv; ReLU after the sum."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None
        )

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# ----------------------------------------------------------------------------------------- v2 units
class PreActBasicBlock(nn.Module):
    """v2 basic unit: BN-ReLU-conv3x3-BN-ReLU-conv3x3, + shortcut (He et al. 2016b, Fig. 4e)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, cout)
        self.relu = nn.ReLU(inplace=True)
        # The projection reads the pre-activated input, as in the paper's code and He et al. 2016b.
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def last_conv(self) -> nn.Conv2d:
        return self.conv2

    def forward(self, x: Tensor) -> Tensor:
        # not in-place: ``x`` itself is the identity shortcut
        pre = self.bn1(x).relu()
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """v2 bottleneck: (BN-ReLU-conv) ×3 with 1x1, 3x3 (strided), 1x1 kernels, + shortcut.

    With ``shortcut=False`` it is the residual function alone, which RevNet uses as F.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv1x1(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, cout)
        self.relu = nn.ReLU(inplace=True)
        self.has_identity = shortcut
        self.shortcut = conv1x1(cin, cout, stride) if shortcut and (stride != 1 or cin != cout) else None

    def last_conv(self) -> nn.Conv2d:
        return self.conv3

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if not self.has_identity:
            return out
        return out + (x if self.shortcut is None else self.shortcut(pre))


def init_weights(module: nn.Module) -> None:
    """He et al. 2015 init for convs (normal, fan_out), BN weight 1 / bias 0 (torchvision's choice)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(Backbone):
    """ResNet v1 / v2 with named taps; see the module docstring for width and options.

    Args:
        depth: 18, 34, 50, 101 or 152.
        version: 1 (post-activation, He et al. 2016a) or 2 (pre-activation, He et al. 2016b).
        width: k / 4 in Kolesnikov et al.'s notation; 1.0 is the standard network.
        cifar_stem: 3×3 stride-1 root conv and no max-pool, for 32-64 px inputs.
        first_conv_stride1: stride 1 in the 7×7 root conv (patch models); the max-pool stays.
        last_stage_stride1: stride 1 in block4 (patch models).
        final_relu: v2 only; False is the paper's "(-)" variant (final BN kept, ReLU dropped).
        zero_init_residual: initialise each residual branch to output zero.
    """

    def __init__(
        self,
        depth: int = 50,
        version: int = 1,
        width: float = 1.0,
        cifar_stem: bool = False,
        first_conv_stride1: bool = False,
        last_stage_stride1: bool = False,
        final_relu: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise UserError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if version not in (1, 2):
            raise UserError(f"ResNet version must be 1 or 2, got {version}")
        if version == 1 and not final_relu:
            # As in the paper's code: v1 ends each unit with a ReLU, there is nothing to drop.
            raise UserError("final_relu=False (the '(-)' variant) exists only for v2 and RevNet")
        units, bottleneck = DEPTHS[depth]
        self.depth, self.version, self.width, self.final_relu = depth, version, width, final_relu
        preact = version == 2

        root = scaled(64, width)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, root, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, root, 7, stride=1 if first_conv_stride1 else 2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # v2 leaves the root un-normalised: the first unit's pre-activation BN follows it.
        self.bn1 = None if preact else nn.BatchNorm2d(root)
        self.relu = nn.ReLU(inplace=True)
        self.taps["after_root"] = root

        if preact:
            block: type[nn.Module] = PreActBottleneck if bottleneck else PreActBasicBlock
        else:
            block = Bottleneck if bottleneck else BasicBlock
        strides = (1, 2, 2, 1 if last_stage_stride1 else 2)
        cin = root
        for i, (name, n, stride) in enumerate(zip(STAGES, units, strides, strict=True)):
            mid = scaled(64 * 2**i, width)
            cout = scaled(256 * 2**i, width) if bottleneck else mid
            layers = [block(cin if j == 0 else cout, mid, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.taps[name] = cout
            cin = cout

        self.post_norm = nn.BatchNorm2d(cin) if preact else None
        self.taps[PRE_LOGITS] = cin

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck | BasicBlock):
                    nn.init.zeros_(m.last_norm().weight)
                elif isinstance(m, PreActBottleneck | PreActBasicBlock):
                    nn.init.zeros_(m.last_conv().weight)

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        if name == "after_root":
            x = self.conv1(x)
            if self.bn1 is not None:
                x = self.relu(self.bn1(x))
            return self.maxpool(x)
        if name == PRE_LOGITS:
            if self.post_norm is not None:
                x = self.post_norm(x)
                if self.final_relu:
                    x = self.relu(x)
            return x.mean(dim=(2, 3))
        return getattr(self, f"layer{STAGES.index(name) + 1}")(x)
