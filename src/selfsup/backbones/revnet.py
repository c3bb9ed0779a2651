"""RevNet (Gomez et al. 2017, *The Reversible Residual Network*) as used by Kolesnikov et al. 2019.

Kolesnikov, Zhai & Beyer 2019 (§3 "Architectures of CNN models"; code ``models/resnet.py:revnet``):

- A unit splits its input channels in halves ``x = [x1, x2]`` and computes ``y1 = x1 + F(x2)``,
  ``y2 = x2``, then swaps: ``y = [y2, y1]``. F is a v2 (pre-activation) bottleneck *without* shortcut
  on ``C/2`` channels with inner width ``C/8``. Two consecutive units are one RevNet block of Gomez et
  al. (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``), so RevNet-50 has (3, 4, 6, 3) *units* per stage, as
  in the paper's code; a unit is invertible: ``x2 = y[:C/2]``, ``x1 = y[C/2:] - F(x2)``.
- The root conv (7×7, stride 2, then 3×3 max-pool) is a projection to 64·k channels with no BN or
  ReLU: reversible units cannot change the channel count, so it must already provide the 256 channels
  of stage 1 (``4 · 16·k`` in the code; the ResNet bottleneck outputs 64·k there too). The paper's
  code exempts this conv from weight decay; :attr:`RevNet.no_weight_decay` names it for optimisers.
- Between stages, a non-reversible transition: 2×2 average pool (stride 2) and zero-padding of the
  channels on both sides (``C/2`` zeros before, ``C/2`` after) to double them: 64·k → 128·k → 256·k →
  512·k, so pre-logits are 512·k (2048 at k = 4), the same size as ResNet-50.
- A final BN (+ ReLU unless ``final_relu=False``, the paper's "RevNet (-)") precedes global pooling.
  The paper's code defaults to no ReLU for RevNet; we default to ``final_relu=True`` like ResNet v2 so
  both families mean the same thing by default, and the "(-)" variant is one flag away.

Width: ``width = k / 4`` (k = 4 standard); stage-1 channels are ``2 · round(128 · width)`` (even, so
they split in halves), inner bottleneck width ``round(32 · width)`` doubling every stage.

Memory. With ``memory_saving=True`` (default) a stage is one ``torch.autograd.Function`` that keeps
only its output; the backward pass walks the units in reverse, reconstructs each unit's input from its
output and recomputes F under ``enable_grad`` (Gomez et al. 2017, Alg. 1), so activation memory no
longer grows with depth. Two details make this exact:

- BatchNorm. In training mode F normalises with the *batch* statistics of its input; the
  reconstructed input equals the original (up to rounding), so the recomputation reproduces the
  forward. But recomputing would update BN's running statistics a second time; the recomputation
  therefore runs inside :func:`frozen_bn_stats`, which snapshots ``running_mean``, ``running_var``
  and ``num_batches_tracked`` and restores them (works for any momentum, including ``None``).
- Autocast. The forward's autocast state (device type, enabled, dtype) is recorded and re-entered
  for the recomputation, so a bf16 forward is recomputed in bf16.

Reconstruction is exact in exact arithmetic; in float32 it drifts by rounding (negligible at this
depth), in bf16 it drifts more — use ``memory_saving=False`` when bf16 gradients must be bit-faithful.
Double backward through a memory-saving stage is not supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import UserError

from .base import PRE_LOGITS, Backbone, scaled
from .resnet import PreActBottleneck, init_weights

STAGES = ("block1", "block2", "block3", "block4")

#: units per stage; depth = 3 · units + 2 counts the layers of a ResNet with the same unit count
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    38: (3, 3, 3, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Run a block without leaving a trace in BN running statistics (restored on exit)."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class ReversibleUnit(nn.Module):
    """``[x1, x2] -> [x2, x1 + F(x2)]``: one additive coupling followed by the swap."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        if channels % 2:
            raise UserError(f"a reversible unit needs an even channel count, got {channels}")
        half = channels // 2
        self.fn = PreActBottleneck(half, mid, half, shortcut=False)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return torch.cat([x2, x1 + self.fn(x2)], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """Input from output: ``x2 = y[:C/2]``, ``x1 = y[C/2:] - F(x2)``."""
        x2, y1 = y.chunk(2, dim=1)
        return torch.cat([y1 - self.fn(x2), x2], dim=1)


class _ReversibleStageFn(torch.autograd.Function):
    """Runs the units of a stage without storing their activations; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, stage: ReversibleStage, *params: Tensor) -> Tensor:  # type: ignore[override]
        device = x.device.type
        ctx.stage = stage
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        y = x
        for unit in stage.units:  # grad mode is off inside Function.forward: nothing is stored
            y = unit(y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        stage: ReversibleStage = ctx.stage
        device, enabled, dtype = ctx.autocast
        params = list(stage.parameters())
        position = {id(p): i for i, p in enumerate(params)}
        grads: list[Tensor | None] = [None] * len(params)
        y = y.detach()
        for unit in reversed(stage.units):
            a, b = y.chunk(2, dim=1)  # a = x2, b = x1 + F(x2)
            da, db = dy.chunk(2, dim=1)
            trainable = [p for p in unit.parameters() if p.requires_grad]
            # BN saves its running buffers for backward: restore them only after the gradient is taken.
            with frozen_bn_stats(unit):
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    x2 = a.detach().requires_grad_(True)
                    f = unit.fn(x2)
                g = torch.autograd.grad(f, [x2, *trainable], grad_outputs=db.to(f.dtype))
            with torch.no_grad():
                x1 = (b - f).to(b.dtype)
                y = torch.cat([x1, x2.detach()], dim=1)
                # y1 = x1 + F(x2) and y2 = x2  =>  dx1 = dy1, dx2 = dy2 + J_F(x2)^T dy1
                dy = torch.cat([db, (da + g[0]).to(da.dtype)], dim=1)
            for p, gp in zip(trainable, g[1:], strict=True):
                i = position[id(p)]
                grads[i] = gp if grads[i] is None else grads[i] + gp
            del f, g
        return (dy, None, *grads)


class ReversibleStage(nn.Module):
    """A sequence of reversible units, optionally trained without storing activations."""

    def __init__(self, channels: int, mid: int, units: int, memory_saving: bool = True) -> None:
        super().__init__()
        self.units = nn.ModuleList(ReversibleUnit(channels, mid) for _ in range(units))
        self.memory_saving = memory_saving

    def forward(self, x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if self.memory_saving and needs_grad:
            return _ReversibleStageFn.apply(x, self, *self.parameters())
        for unit in self.units:
            x = unit(x)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        """Reconstruct the stage input from its output, without touching BN running statistics."""
        with frozen_bn_stats(self):
            for unit in reversed(self.units):
                y = unit.inverse(y)
        return y


def pool_and_double_channels(x: Tensor, stride: int) -> Tensor:
    """Non-reversible stage transition: average pool, then zero-pad C/2 channels on each side.

    ``ceil_mode=True`` reproduces TF's 'SAME' average pooling on odd sizes (the partial window is
    averaged over its valid pixels), matching the output size ⌈H/2⌉ of a strided ResNet stage.
    """
    if stride > 1:
        x = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    half = x.shape[1] // 2
    return F.pad(x, (0, 0, 0, 0, half, half))


class RevNet(Backbone):
    """RevNet with named taps; see the module docstring.

    Args:
        depth: 26, 38, 50 or 101 (units per stage as in ``DEPTHS``).
        width: k / 4 in Kolesnikov et al.'s notation; 1.0 gives 256 root channels and 2048-d pre-logits.
        cifar_stem: 3×3 stride-1 root conv and no max-pool, for 32-64 px inputs.
        first_conv_stride1 / last_stage_stride1: the paper's patch-model strides.
        final_relu: False is the paper's "RevNet (-)" (final BN kept, ReLU dropped).
        memory_saving: recompute activations in backward instead of storing them.
        zero_init_residual: zero the last conv of every F, so each unit starts as a pure swap.
    """

    #: parameter names the paper's code leaves out of weight decay (the root projection)
    no_weight_decay: tuple[str, ...] = ("conv1.weight",)

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        cifar_stem: bool = False,
        first_conv_stride1: bool = False,
        last_stage_stride1: bool = False,
        final_relu: bool = True,
        memory_saving: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise UserError(f"RevNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.depth, self.width, self.final_relu = depth, width, final_relu
        root = 2 * scaled(128, width)
        # The root conv is a (learned) projection to the stage-1 channel count; no BN/ReLU, as in the code.
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, root, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, root, 7, stride=1 if first_conv_stride1 else 2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.taps["after_root"] = root

        self.transition_strides = (1, 2, 2, 1 if last_stage_stride1 else 2)
        channels = root
        for i, (name, n) in enumerate(zip(STAGES, DEPTHS[depth], strict=True)):
            if i > 0:
                channels *= 2
            stage = ReversibleStage(channels, scaled(32 * 2**i, width), n, memory_saving)
            setattr(self, f"layer{i + 1}", stage)
            self.taps[name] = channels
        self.post_norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.taps[PRE_LOGITS] = channels

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ReversibleUnit):
                    nn.init.zeros_(m.fn.last_conv().weight)

    @property
    def memory_saving(self) -> bool:
        return self.layer1.memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        for i in range(len(STAGES)):
            getattr(self, f"layer{i + 1}").memory_saving = value

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        if name == "after_root":
            return self.maxpool(self.conv1(x))
        if name == PRE_LOGITS:
            x = self.post_norm(x)
            if self.final_relu:
                x = self.relu(x)
            return x.mean(dim=(2, 3))
        i = STAGES.index(name)
        if i > 0:
            x = pool_and_double_channels(x, self.transition_strides[i])
        return getattr(self, f"layer{i + 1}")(x)
