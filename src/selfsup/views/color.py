"""Batched photometric augmentations with per-sample parameters (torchvision semantics).

Every op is split in two: ``sample_*`` draws the per-sample parameters in one batched call from an
explicit ``torch.Generator`` (on the generator's device, normally the CPU), and a deterministic
``apply``/``adjust`` function runs them on the images' device. Drawing on the CPU generator makes a
view a pure function of (seed, step) whatever device the images live on, which is what exact resume
needs; keeping the apply step deterministic lets tests and the invariance analyses feed chosen
parameters.

Images are float tensors in [0, 1] of shape B x 3 x H x W (any memory format).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.errors import UserError

# ITU-R 601-2 luma, as PIL's ``convert("L")``. torchvision uses 0.2989 for red; 0.299 makes the
# weights sum to exactly 1 so a grey image is a fixed point of the grayscale op.
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

# Op indices of ColorJitter, in torchvision's fixed order (used when random_order=False).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# --------------------------------------------------------------------------- parameter drawing
def uniform(batch: int, low: float, high: float, g: torch.Generator) -> Tensor:
    """``batch`` draws from U[low, high) on the generator's device (float32)."""
    return low + (high - low) * torch.rand(batch, generator=g, device=g.device)


def coin(batch: int, p: float, g: torch.Generator) -> Tensor:
    """Per-sample Bernoulli(p) as a bool tensor; p=0 is never and p=1 always (rand is in [0, 1))."""
    return torch.rand(batch, generator=g, device=g.device) < p


def apply_subset(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Return ``x`` with ``fn(x[idx], idx)`` written into the samples where ``mask`` holds.

    Used for the expensive ops (hue, blur) so that only the selected samples pay for them. The mask
    is a parameter tensor (normally on the CPU), so computing the indices costs no device sync.
    ``idx`` is handed to ``fn`` on the mask's device to index other parameter tensors.
    """
    mask = mask.cpu()
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, idx)
    idx_dev = idx.to(x.device)
    return x.index_copy(0, idx_dev, fn(x.index_select(0, idx_dev), idx))


def _range(value: float | Sequence[float], center: float, name: str, bound: float | None = None) -> tuple:
    """torchvision ``ColorJitter._check_input``: v -> [max(0, c - v), c + v], or an explicit pair."""
    if isinstance(value, int | float):
        if value < 0:
            raise UserError(f"{name} must be non-negative, got {value}")
        lo, hi = center - value, center + value
        if bound is None:  # multiplicative factors cannot go below 0
            lo = max(lo, 0.0)
    else:
        lo, hi = float(value[0]), float(value[1])
    if lo > hi or (bound is not None and (lo < -bound or hi > bound)):
        raise UserError(f"{name} range {(lo, hi)} is invalid")
    return lo, hi


# --------------------------------------------------------------------------- colour spaces
def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2), shape B x 1 x H x W."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """Batched RGB -> HSV with hue in [0, 1), following Python's ``colorsys.rgb_to_hsv``."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # grey pixels: hue 0, no 0/0
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Batched HSV -> RGB, ``c = v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``.

    This closed form (n = 5, 3, 1 for R, G, B) equals the six-sector table of ``colorsys`` and
    avoids building the six candidates that torchvision's version stacks and selects from.
    """
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- colour jitter
def blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """torchvision ``_blend``: ``(f x + (1 - f) other).clamp(0, 1)`` with a per-sample factor f.

    f = 1 is an exact identity (1 * x + 0 * other), which lets samples that skip an op ride along.
    """
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift`` (in turns, within [-0.5, 0.5]) in HSV space."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0:1] + shift.view(-1, 1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat((h, hsv[:, 1:]), 1))


@dataclass(frozen=True)
class JitterParams:
    """Per-sample ColorJitter parameters.

    ``factors[b]`` = (brightness, contrast, saturation, hue shift); samples that skip the jitter
    (RandomApply) carry the identity (1, 1, 1, 0). ``order[b, t]`` is the op applied at stage t.
    """

    factors: Tensor  # B x 4 float
    order: Tensor  # B x 4 long, each row a permutation of 0..3


def sample_color_jitter_params(
    batch: int,
    brightness: float | Sequence[float] = 0.0,
    contrast: float | Sequence[float] = 0.0,
    saturation: float | Sequence[float] = 0.0,
    hue: float | Sequence[float] = 0.0,
    p: float = 1.0,
    *,
    g: torch.Generator,
    random_order: bool = True,
) -> JitterParams:
    """Draw ``RandomApply([ColorJitter(b, c, s, h)], p)`` parameters for a batch (torchvision).

    Factors are U[max(0, 1 - v), 1 + v] for brightness/contrast/saturation and U[-h, h] for hue;
    each sample gets its own uniformly random op order (argsort of 4 uniforms), as torchvision's
    ``ColorJitter`` draws ``randperm(4)`` per image.
    """
    ranges = [
        _range(brightness, 1.0, "brightness"),
        _range(contrast, 1.0, "contrast"),
        _range(saturation, 1.0, "saturation"),
        _range(hue, 0.0, "hue", bound=0.5),
    ]
    factors = torch.stack([uniform(batch, lo, hi, g) for lo, hi in ranges], 1)
    applied = coin(batch, p, g)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=factors.device)
    factors = torch.where(applied[:, None], factors, identity)
    keys = torch.rand(batch, 4, generator=g, device=g.device)  # drawn always: stream independent of flags
    order = keys.argsort(1) if random_order else torch.arange(4, device=g.device).expand(batch, 4)
    return JitterParams(factors=factors, order=order)


def apply_color_jitter(x: Tensor, params: JitterParams) -> Tensor:
    """Apply jitter parameters: 4 stages, each running every sample's own op for that stage.

    Brightness, contrast and saturation are all ``blend(x, other, f)`` with other = 0, the mean of
    the grayscale image, or the grayscale image, so one fused blend per stage serves all three
    (samples whose op at this stage is hue use f = 1, an exact identity). Hue runs on the subset
    of samples that picked it at this stage. torchvision clamps after each blend; so do we.
    """
    factors, order = params.factors.cpu(), params.order.cpu()
    shift = factors[:, HUE]
    for stage in range(4):
        op = order[:, stage]
        f = torch.where(op == HUE, 1.0, factors.gather(1, op[:, None]).squeeze(1))
        if bool((f != 1.0).any()):
            is_c, is_s = op == CONTRAST, op == SATURATION
            other: Tensor | float = 0.0  # brightness blends with black
            if bool((is_c | is_s).any()):
                gray = rgb_to_grayscale(x)
                is_c, is_s = (m.to(x.device).view(-1, 1, 1, 1) for m in (is_c, is_s))
                other = torch.where(is_c, gray.mean((1, 2, 3), keepdim=True), torch.where(is_s, gray, 0.0))
            x = blend(x, other, f.to(x.device, x.dtype))
        # shift 0 is the identity, so those samples skip the HSV round trip
        hue_now = (op == HUE) & (shift != 0)
        x = apply_subset(x, hue_now, lambda xs, idx: adjust_hue(xs, shift[idx].to(xs.device, xs.dtype)))
    return x


def color_jitter(
    x: Tensor,
    brightness: float | Sequence[float] = 0.0,
    contrast: float | Sequence[float] = 0.0,
    saturation: float | Sequence[float] = 0.0,
    hue: float | Sequence[float] = 0.0,
    p: float = 1.0,
    *,
    g: torch.Generator,
    random_order: bool = True,
) -> Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per sample.

    SimCLR (Chen et al. 2020, App. A) uses strength s: (0.8s, 0.8s, 0.8s, 0.2s) with p = 0.8.
    """
    params = sample_color_jitter_params(
        x.shape[0], brightness, contrast, saturation, hue, p, g=g, random_order=random_order
    )
    return apply_color_jitter(x, params)


# --------------------------------------------------------------------------- grayscale, solarize
def random_grayscale(x: Tensor, p: float = 0.1, *, g: torch.Generator) -> Tensor:
    """torchvision ``RandomGrayscale(p)``: luma replicated to 3 channels with probability p."""
    mask = coin(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, rgb_to_grayscale(x).expand_as(x), x)


def solarize(x: Tensor, p: float = 0.5, threshold: float = 0.5, *, g: torch.Generator) -> Tensor:
    """torchvision ``RandomSolarize(threshold, p)``: pixels >= threshold become 1 - x."""
    mask = coin(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask & (x >= threshold), 1.0 - x, x)


def random_mean_gray(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Kolesnikov et al.'s ``to_gray`` (public code ``preprocess.py``): with probability p per image, every
    channel becomes the plain mean of R, G and B (not the luma of ``random_grayscale``)."""
    chosen = coin(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(chosen, x.mean(1, keepdim=True).expand_as(x), x)
