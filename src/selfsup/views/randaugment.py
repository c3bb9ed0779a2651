"""RandAugment (Cubuk et al. 2020) as InfoMin trained with it, batched with per-sample parameters.

InfoMin Aug (Tian et al. 2020, "What Makes for Good Views for Contrastive Learning?", §4 and appendix; its code,
HobbitLong/PyContrast ``pycontrast/datasets/RandAugment.py``, is an early copy of timm's) uses
``rand_augment_transform('rand-n2-m10-mstd0.5', dict(translate_const=100, img_mean=(124, 116, 104)))``
(``translate_const`` only feeds the absolute Translate ops, which are not in this op list):
for each image, n = 2 ops drawn uniformly with replacement from the 15 of ``OPS``, applied in sequence, each
with probability 0.5; an applied op draws its magnitude m ~ N(10, 0.5) clipped to [0, 10], a sign (p 0.5) for
the signed ops, and bilinear or bicubic resampling (p 0.5) for the geometric ones. Level -> argument (M = 10):
Rotate ±30 m/M degrees; ShearX/Y ±0.3 m/M; TranslateX/YRel ±0.45 m/M of the width / height (PIL ``size[0]`` /
``size[1]``); PosterizeTpu keeps int(4 m/M) bits; Solarize threshold int(256 m/M); SolarizeAdd adds
int(110 m/M) below 128; Color/Contrast/Brightness/Sharpness factor 1.8 m/M + 0.1 (unsigned in this version).
The reference skips an op when ``random() > p``; we apply it when ``u < p``: the same law.

Here ``sample_rand_augment`` draws every sample's choices in five batched calls on ``g.device`` (the stream
does not depend on which samples apply) and ``apply_rand_augment`` runs them: a Python loop over layers and ops,
each op on the subset of samples that chose it; the five geometric ops of a layer share one resample.
Images are float B x 3 x H x W in [0, 1]; the memory format is kept.

Deviations from the reference, all measured against PIL 13 in ``tests/views/test_randaugment.py``:
- Float images between ops, not uint8: PIL truncates each op's output to an integer (``Image.blend`` and the
  resamplers truncate, so PIL is ~0.5/255 darker per op); we keep the float. Ops defined on uint8 values read
  the 8-bit grid round(255 x): equalize, posterize, the solarize / solarize-add thresholds, and PIL's integer
  'L' image (``(19595 R + 38470 G + 7471 B + 2^15) >> 16``) used by Color and Contrast.
  Measured on single ops from uint8 input: <= 1/255 everywhere (the truncation), 0 for equalize, invert,
  posterize, solarize and solarize-add; two chained ops stay within 1.9/255.
- AutoContrast stretches in float where PIL's LUT truncates, and Sharpness blends with an unrounded smoothed
  image (``pirl_views``' ops, reused): max 1/255 and 1.32/255 respectively.
- Equalize uses PIL's step ``(count - h[last]) // 255`` (every Pillow release; not 256).
- Posterize to 0 bits gives black, as the Pillow of 2020 did; Pillow >= 11 rejects ``bits=0``.
- Geometric ops: PIL maps output pixel centre (x + ½, y + ½) through the affine to input coordinates whose
  pixel centres are at i + ½, samples with edge-clamped taps, and fills where the point is outside
  [0, W) x [0, H); ``affine_grid``/``grid_sample`` (align_corners=False, border padding) is the same geometry
  and the inside test is PIL's own, in float64, so the fill region agrees exactly and bilinear output is within
  1.0003/255 of PIL's. The bicubic kernels differ: PIL's ``transform`` uses the a = -1 cubic convolution,
  ``grid_sample`` a = -0.75: mean abs. difference 2.2/255 on pixel noise (max 19/255), 1.1/255 on smooth
  images (max 6.3/255). Bicubic output is clamped to [0, 1], as PIL clips.
- Randomness comes from a torch generator, not Python's ``random``: same distributions, different stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

from .color import apply_subset, blend, coin
from .pirl_views import autocontrast, posterize, sharpness, solarize_at

OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeTpu", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = 3, 11, 12, 13, 14
GEOMETRIC = (ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y)
MAX_LEVEL = 10.0
RA_FILL: tuple[float, float, float] = (124 / 255, 116 / 255, 104 / 255)  # PyContrast's img_mean


@dataclass(frozen=True)
class RandAugmentParams:
    """Per-layer, per-sample RandAugment choices (each n x B; layer t runs before layer t + 1)."""

    op: Tensor  # long, index into OPS
    applied: Tensor  # bool: the op runs (probability p)
    magnitude: Tensor  # float64, N(m, std) clipped to [0, MAX_LEVEL]
    sign: Tensor  # float64, -1 or +1 (used by the signed ops)
    bicubic: Tensor  # bool: bicubic, else bilinear (geometric ops)


def sample_rand_augment(batch: int, g: torch.Generator, n: int = 2, magnitude: float = 10.0,
                        magnitude_std: float = 0.5, p: float = 0.5) -> RandAugmentParams:
    """Draw RandAugment choices for ``batch`` samples in five batched calls on ``g.device``."""
    if n < 0 or not 0.0 <= p <= 1.0 or magnitude_std < 0:
        raise UserError(f"RandAugment needs n >= 0, p in [0, 1] and magnitude_std >= 0; got {n}, {p}, {magnitude_std}")
    dev = g.device
    op = torch.randint(0, len(OPS), (n, batch), generator=g, device=dev)
    applied = coin(n * batch, p, g).view(n, batch)
    noise = torch.randn(n, batch, generator=g, device=dev, dtype=torch.float64)
    mag = (magnitude + magnitude_std * noise).clamp(0.0, MAX_LEVEL)
    sign = 1.0 - 2.0 * coin(n * batch, 0.5, g).view(n, batch).double()
    bicubic = coin(n * batch, 0.5, g).view(n, batch)
    return RandAugmentParams(op=op, applied=applied, magnitude=mag, sign=sign, bicubic=bicubic)


# --------------------------------------------------------------------------- pointwise and histogram ops
def _grid8(x: Tensor) -> Tensor:
    """The 8-bit values round(255 x) as int64."""
    return (x * 255).round().clamp(0, 255).long()


def _luma8(x: Tensor) -> Tensor:
    """PIL ``convert("L")`` on the 8-bit grid, B x 1 x H x W int64."""
    r, g, b = _grid8(x).unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).unsqueeze(1)


def invert(x: Tensor) -> Tensor:
    """PIL ``ImageOps.invert``."""
    return 1.0 - x


def equalize(x: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` per sample and channel: lut[i] = (step // 2 + sum h[:i]) // step, clipped to
    255, with step = (count - h[last nonzero]) // 255; channels with < 2 levels or step 0 are left as they are."""
    B, C, H, W = x.shape
    v = _grid8(x).reshape(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, 0).amax(1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)).clamp(max=255)
    keep = ((hist > 0).sum(1, keepdim=True) < 2) | (step == 0)
    out = lut.gather(1, v).view(B, C, H, W).to(x.dtype) / 255
    return torch.where(keep.view(B, C, 1, 1), x, out)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """PIL ``ImageOps.solarize``: where round(255 x) >= ``threshold[b]`` (0..256), x becomes 1 - x."""
    return solarize_at(x, threshold.double() - 0.5)


def solarize_add(x: Tensor, add: Tensor, threshold: int = 128) -> Tensor:
    """PyContrast's ``solarize_add``: where round(255 x) < 128, add ``add[b]``/255, clipped at 1."""
    a = (add.to(x.device, x.dtype) / 255).view(-1, 1, 1, 1)
    return torch.where(_grid8(x) < threshold, (x + a).clamp(max=1.0), x)


def enhance_color(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Color``: blend with the integer 'L' image."""
    return blend(x, _luma8(x).to(x.dtype) / 255, factor.to(x.device, x.dtype))


def enhance_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the constant int(mean(L) + 0.5), computed exactly."""
    count = x.shape[-2] * x.shape[-1]
    mean = (2 * _luma8(x).sum((1, 2, 3), keepdim=True) + count) // (2 * count)
    return blend(x, mean.to(x.dtype) / 255, factor.to(x.device, x.dtype))


def enhance_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return blend(x, 0.0, factor.to(x.device, x.dtype))


# --------------------------------------------------------------------------- geometric ops
def affine(x: Tensor, matrices: Tensor, fill: tuple[float, float, float] = RA_FILL,
           bicubic: Tensor | None = None) -> Tensor:
    """PIL ``Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor=fill)`` per sample.

    ``matrices`` is B x 6: output pixel (x, y) samples input (a x + b y + c, d x + e y + f) in PIL's continuous
    coordinates (origin at the top-left corner). ``bicubic[b]`` picks bicubic over bilinear for sample b.
    """
    B, C, H, W = x.shape
    a, b, c, d, e, f = matrices.to(torch.float64).unbind(1)
    theta = torch.stack((a, b * H / W, a + b * H / W + 2 * c / W - 1,
                         d * W / H, e, d * W / H + e + 2 * f / H - 1), 1).view(B, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [B, C, H, W], align_corners=False)
    # PIL's own test, in float64: the point a (x + ½) + b (y + ½) + c, ... must lie in [0, W) x [0, H)
    px = torch.arange(W, dtype=torch.float64, device=x.device).view(1, 1, W) + 0.5
    py = torch.arange(H, dtype=torch.float64, device=x.device).view(1, H, 1) + 0.5
    a, b, c, d, e, f = (t.to(x.device).view(B, 1, 1) for t in (a, b, c, d, e, f))
    xin, yin = a * px + b * py + c, d * px + e * py + f
    inside = ((xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)).unsqueeze(1)
    cubic = torch.zeros(B, dtype=torch.bool) if bicubic is None else bicubic.cpu()

    def resample(mode: str):
        def run(xs: Tensor, idx: Tensor) -> Tensor:
            return F.grid_sample(xs, grid[idx.to(x.device)], mode=mode, padding_mode="border", align_corners=False)
        return run

    y = apply_subset(x, ~cubic, resample("bilinear"))
    y = apply_subset(y, cubic, resample("bicubic")).clamp(0.0, 1.0)
    return torch.where(inside, y, torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, C, 1, 1))


def _eye(batch: int) -> Tensor:
    return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(batch, 1)


def rotation_matrix(degrees: Tensor, width: int, height: int) -> Tensor:
    """PIL ``Image.rotate(degrees)`` as an affine matrix (counter-clockwise about (w/2, h/2)), B x 6."""
    t = -torch.deg2rad(degrees.double().remainder(360.0))
    cos, sin = torch.round(torch.cos(t), decimals=15), torch.round(torch.sin(t), decimals=15)
    cx, cy = width / 2, height / 2
    return torch.stack((cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), 1)


def rotate(x: Tensor, degrees: Tensor, fill=RA_FILL, bicubic: Tensor | None = None) -> Tensor:
    """PIL ``Image.rotate(degrees[b], resample, fillcolor=fill)`` per sample: counter-clockwise, same size."""
    return affine(x, rotation_matrix(degrees, x.shape[-1], x.shape[-2]), fill, bicubic)


def _linear(x: Tensor, value: Tensor, slot: int, fill, bicubic: Tensor | None) -> Tensor:
    m = _eye(x.shape[0])
    m[:, slot] = value.double().cpu()
    return affine(x, m, fill, bicubic)


def shear_x(x: Tensor, factor: Tensor, fill=RA_FILL, bicubic: Tensor | None = None) -> Tensor:
    """PIL affine (1, f, 0, 0, 1, 0)."""
    return _linear(x, factor, 1, fill, bicubic)


def shear_y(x: Tensor, factor: Tensor, fill=RA_FILL, bicubic: Tensor | None = None) -> Tensor:
    """PIL affine (1, 0, 0, f, 1, 0)."""
    return _linear(x, factor, 3, fill, bicubic)


def translate_x(x: Tensor, pixels: Tensor, fill=RA_FILL, bicubic: Tensor | None = None) -> Tensor:
    """PIL affine (1, 0, px, 0, 1, 0): the content moves left by px."""
    return _linear(x, pixels, 2, fill, bicubic)


def translate_y(x: Tensor, pixels: Tensor, fill=RA_FILL, bicubic: Tensor | None = None) -> Tensor:
    """PIL affine (1, 0, 0, 0, 1, px): the content moves up by px."""
    return _linear(x, pixels, 5, fill, bicubic)


def geometric_matrices(op: Tensor, level: Tensor, width: int, height: int) -> Tensor:
    """Each sample's matrix for its geometric op at signed level ``level`` = ±m/M (identity for other ops)."""
    m = torch.where((op == ROTATE)[:, None], rotation_matrix(30.0 * level, width, height), _eye(op.shape[0]))
    m[:, 1] += torch.where(op == SHEAR_X, 0.3 * level, 0.0)
    m[:, 3] += torch.where(op == SHEAR_Y, 0.3 * level, 0.0)
    m[:, 2] += torch.where(op == TRANSLATE_X, 0.45 * level * width, 0.0)
    m[:, 5] += torch.where(op == TRANSLATE_Y, 0.45 * level * height, 0.0)
    return m


# --------------------------------------------------------------------------- the policy
def _enhance(m: Tensor) -> Tensor:
    return m / MAX_LEVEL * 1.8 + 0.1


_PHOTOMETRIC = {
    0: lambda x, m: autocontrast(x),
    1: lambda x, m: equalize(x),
    2: lambda x, m: invert(x),
    4: lambda x, m: posterize(x, (m / MAX_LEVEL * 4).floor().long()),
    5: lambda x, m: solarize(x, (m / MAX_LEVEL * 256).floor()),
    6: lambda x, m: solarize_add(x, (m / MAX_LEVEL * 110).floor()),
    7: lambda x, m: enhance_color(x, _enhance(m)),
    8: lambda x, m: enhance_contrast(x, _enhance(m)),
    9: lambda x, m: enhance_brightness(x, _enhance(m)),
    10: lambda x, m: sharpness(x, _enhance(m)),
}


def _photometric(k: int, mag: Tensor):
    return lambda xs, idx: _PHOTOMETRIC[k](xs, mag[idx])


def _geometric(mats: Tensor, cubic: Tensor, fill):
    return lambda xs, idx: affine(xs, mats[idx], fill, cubic[idx])


def apply_rand_augment(x: Tensor, params: RandAugmentParams, fill: tuple[float, float, float] = RA_FILL) -> Tensor:
    """Run ``params`` on ``x`` (float B x 3 x H x W in [0, 1]); each op touches only the samples that apply it.
    The parameters are brought to the CPU once (one sync if they live on the GPU) to select the subsets."""
    if not x.is_floating_point():
        raise TypeError(f"apply_rand_augment expects float images in [0, 1], got {x.dtype}")
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    op, applied, mag, sign, cubic = (t.cpu() for t in (params.op, params.applied, params.magnitude,
                                                        params.sign, params.bicubic))
    H, W = x.shape[-2:]
    for t in range(op.shape[0]):
        for k in _PHOTOMETRIC:
            x = apply_subset(x, applied[t] & (op[t] == k), _photometric(k, mag[t]))
        geo = applied[t] & torch.isin(op[t], torch.tensor(GEOMETRIC))
        mats = geometric_matrices(op[t], sign[t] * mag[t] / MAX_LEVEL, W, H)
        x = apply_subset(x, geo, _geometric(mats, cubic[t], fill))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def rand_augment(x: Tensor, n: int = 2, magnitude: float = 10.0, magnitude_std: float = 0.5, p: float = 0.5, *,
                 g: torch.Generator, fill: tuple[float, float, float] = RA_FILL) -> Tensor:
    """RandAugment 'rand-n2-m10-mstd0.5' (PyContrast's InfoMin setting by default) on a float batch."""
    return apply_rand_augment(x, sample_rand_augment(x.shape[0], g, n, magnitude, magnitude_std, p), fill)
