"""Batched geometric augmentations, Gaussian blur and the declarative view pipeline.

Images arrive as uint8 B x 3 x H x W on the training device (often channels_last) and stay there:
every random choice is a per-sample parameter drawn in one batched call from an explicit
``torch.Generator`` ``g`` (normally a CPU generator seeded from (seed, step)); the small parameter
tensors then move to the images' device. Views are therefore identical across devices and exactly
reproducible on resume. There is no Python loop over images.

Semantics follow torchvision's transforms; the SimCLR recipe is Chen et al. 2020, App. A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

from .color import apply_subset, coin, color_jitter, random_grayscale, solarize, uniform

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- dtype, normalization
def to_float(x: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1] (memory format kept); float input is cast to float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.is_floating_point():
        return x.float()
    raise TypeError(f"expected uint8 or float images, got {x.dtype}")


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- random resized crop
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    g: torch.Generator,
    tries: int = 10,
) -> Tensor:
    """Boxes of torchvision ``RandomResizedCrop.get_params``, as a B x 4 long tensor (top, left, h, w).

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); w = round(sqrt(area * r)),
    h = round(sqrt(area / r)). torchvision retries up to 10 times until the box fits; here all
    ``tries`` candidates are drawn at once and the first that fits is kept. If none fits, the
    fallback is torchvision's: the central crop of the whole image with its ratio clamped to ``ratio``.
    The offset is uniform over the valid integer positions.
    """
    dev = g.device
    f64 = torch.float64
    area = float(height * width)
    frac = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, tries, generator=g, device=dev, dtype=f64)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u_ratio = torch.rand(batch, tries, generator=g, device=dev, dtype=f64)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(area * frac * aspect)).long()  # round-half-even, as Python's round
    h = torch.round(torch.sqrt(area * frac / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = fits.any(1)
    w = torch.where(ok, w, fw)
    h = torch.where(ok, h, fh)

    u = torch.rand(batch, 2, generator=g, device=dev, dtype=f64)
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor().long(), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor().long(), width - w)
    top = torch.where(ok, top, (height - fh) // 2)
    left = torch.where(ok, left, (width - fw) // 2)
    return torch.stack((top, left, h, w), 1)


def resized_crop(
    x: Tensor,
    boxes: Tensor,
    size: int | Sequence[int],
    flip: Tensor | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """Crop each sample's integer box (top, left, h, w), resize to ``size``, optionally h-flip.

    One batched ``affine_grid`` + ``grid_sample`` (align_corners=False). Output pixel centres map
    to ``left + w (j + 0.5) / S - 0.5`` in input pixels, exactly as ``F.interpolate`` on the cropped
    box; the sampling grid is clamped to the box's outer pixel centres so that, like cropping
    first, nothing outside the box leaks in at the border. A flip negates the x scale (the same
    resample, mirrored), so crop + flip cost one pass. No antialiasing (see module notes).
    """
    B, C, H, W = x.shape
    out_h, out_w = _pair(size)
    # affine parameters are computed in float64 where the boxes live (normally the CPU), then moved
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    sign = 1.0 - 2.0 * flip.to(w.device, torch.float64) if flip is not None else torch.ones_like(w)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=boxes.device)
    theta[:, 0, 0] = sign * w / W
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    # normalized coordinates of the first and last pixel centres inside the box
    lo = torch.stack(((2 * left + 1) / W - 1, (2 * top + 1) / H - 1), 1)
    hi = torch.stack(((2 * (left + w) - 1) / W - 1, (2 * (top + h) - 1) / H - 1), 1)
    dt, dev = x.dtype, x.device
    grid = F.affine_grid(theta.to(dev, dt), [B, C, out_h, out_w], align_corners=False)
    lo, hi = lo.to(dev, dt).view(B, 1, 1, 2), hi.to(dev, dt).view(B, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resized_crop(
    x: Tensor,
    size: int | Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    *,
    g: torch.Generator,
    mode: str = "bilinear",
) -> Tensor:
    """torchvision ``RandomResizedCrop(size, scale, ratio)`` then ``RandomHorizontalFlip(flip_p)``.

    The "Inception crop" of SimCLR (Chen et al. 2020, App. A), per sample, as one resample.
    """
    boxes = sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, ratio, g=g)
    flip = coin(x.shape[0], flip_p, g)
    return resized_crop(x, boxes, size, flip, mode=mode)


def hflip(x: Tensor, p: float = 0.5, *, g: torch.Generator) -> Tensor:
    """torchvision ``RandomHorizontalFlip(p)`` per sample."""
    mask = coin(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


# --------------------------------------------------------------------------- gaussian blur
def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel size, 10% of the image side made odd: ``2 * ((size // 10) // 2) + 1``.

    This is the reference TF code (radius = (size // 10) // 2): 224 -> 23, 96 -> 9, 32 -> 3.
    """
    return 2 * ((image_size // 10) // 2) + 1


def gaussian_kernel1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalized 1-D Gaussians on ``linspace(-(k-1)/2, (k-1)/2, k)``, one row per sigma (torchvision)."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


def blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding (torchvision semantics).

    The batch is folded into the channel axis so that one depthwise ``conv2d`` (groups = B * C)
    applies every sample's own kernel: a 1 x k pass, then a k x 1 pass.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise UserError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    B, C, H, W = x.shape
    k = gaussian_kernel1d(sigma.to(x.device, x.dtype), kernel_size).repeat_interleave(C, 0)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def gaussian_blur(
    x: Tensor,
    p: float = 1.0,
    sigma: Sequence[float] = (0.1, 2.0),
    kernel_size: int | None = None,
    *,
    g: torch.Generator,
) -> Tensor:
    """``RandomApply([GaussianBlur(kernel_size, sigma)], p)`` per sample, sigma ~ U(sigma).

    SimCLR (Chen et al. 2020, App. A): p = 0.5, sigma in [0.1, 2.0], kernel 10% of the image side
    (the default here, from the current height). Only the selected samples are convolved.
    """
    ks = blur_kernel_size(x.shape[-2]) if kernel_size is None else kernel_size
    s = uniform(x.shape[0], sigma[0], sigma[1], g)
    mask = coin(x.shape[0], p, g)
    return apply_subset(x, mask, lambda xs, idx: blur(xs, s[idx], ks))


# --------------------------------------------------------------------------- rotation
def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate sample b by ``k[b] * 90`` degrees counter-clockwise, as ``torch.rot90(x, k, (2, 3))``.

    One gather: a 4 x H*W table of source indices (``rot90`` applied to an index image) is
    selected per sample, so any mix of rotations in a batch costs one pass and no sync.
    Odd k swap height and width, so images must be square.
    """
    B, C, H, W = x.shape
    if H != W:
        raise UserError(f"rotate90 needs square images, got {H}x{W}")
    index = torch.arange(H * W, device=x.device).view(H, W)
    table = torch.stack([torch.rot90(index, r, (0, 1)).reshape(-1) for r in range(4)])
    src = table[k.to(x.device).long().remainder(4)]  # B x HW
    out = x.reshape(B, C, H * W).gather(2, src[:, None, :].expand(B, C, H * W))
    return out.view(B, C, H, W)


# --------------------------------------------------------------------------- declarative views
@dataclass(frozen=True)
class ViewConfig:
    """One view recipe; ``make_view`` applies it in SimCLR's order.

    crop+flip -> colour jitter (RandomApply p) -> grayscale -> blur -> solarize -> normalize.
    ``jitter`` = (brightness, contrast, saturation, hue) strengths; p = 0 skips an op (and its draws).
    ``blur_kernel_size=None`` uses SimCLR's 10% of ``size``. ``mean``/``std`` None leaves [0, 1].
    """

    size: int | tuple[int, int] = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    jitter_random_order: bool = True  # torchvision's ColorJitter; False = brightness, contrast, saturation, hue
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD


def simclr_jitter(strength: float = 1.0) -> tuple[float, float, float, float]:
    """SimCLR's colour distortion of strength s: (0.8s, 0.8s, 0.8s, 0.2s) (Chen et al. 2020, App. A)."""
    return (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


#: SimCLR ImageNet views (Chen et al. 2020, App. A): Inception crop scale (0.08, 1) + flip 0.5,
#: colour jitter strength 1 with p 0.8, grayscale 0.2, Gaussian blur p 0.5 with sigma (0.1, 2.0).
SIMCLR = ViewConfig(size=224, jitter=simclr_jitter(1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))

#: SimCLR CIFAR-10 views (Chen et al. 2020, App. B.9): the same Inception crop and flip resized to
#: 32x32, colour distortion of strength 0.5, grayscale 0.2, and no Gaussian blur.
SIMCLR_CIFAR = ViewConfig(size=32, jitter=simclr_jitter(0.5), jitter_p=0.8, gray_p=0.2, blur_p=0.0)

#: Inception-style random resized crop + horizontal flip only (the supervised ImageNet baseline
#: augmentation, torchvision's RandomResizedCrop + RandomHorizontalFlip).
INCEPTION_CROP_FLIP = ViewConfig(size=224)

#: Inception preprocessing of the Revisiting rotation and exemplar configs (Kolesnikov et al. 2019, public
#: code ``inception_preprocess``, i.e. TF-slim ``preprocess_for_train`` in fast mode): slim's
#: ``distorted_bounding_box_crop`` (area 5-100 %, but it must also cover ``min_object_covered = 0.1`` of
#: the whole-image box, so 10-100 % in effect), ratio 3/4-4/3, flip, then brightness followed by
#: saturation (fast mode has one fixed order), always applied, values scaled to [-1, 1]. Slim's
#: brightness is additive (max delta 32/255); ours is the multiplicative factor U[1 - 0.125, 1 + 0.125].
#: Saturation U[0.5, 1.5] as slim. Exemplar's grayscale (p 0.66, once per image) and per-copy
#: standardisation live in ``methods.exemplar``.
INCEPTION_SLIM = ViewConfig(
    size=224,
    crop_scale=(0.1, 1.0),
    jitter=(0.125, 0.0, 0.5, 0.0),
    jitter_p=1.0,
    jitter_random_order=False,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
INCEPTION_ROTATION = EXEMPLAR = INCEPTION_SLIM

#: MoCo v1 views (He et al. 2020, §4; facebookresearch/moco main_moco.py without --aug-plus): crop scale (0.2, 1),
#: grayscale 0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip. Their code grays before it jitters; ours jitters
#: first (make_view's fixed order): on a grayed image only brightness and contrast act in either order.
MOCO_V1 = ViewConfig(size=224, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)

#: MoCo v2's "aug+" (Chen et al. 2020, "Improved Baselines", §3; main_moco.py --aug-plus): crop (0.2, 1),
#: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, Gaussian blur sigma (0.1, 2) with p 0.5, flip.
MOCO_V2 = ViewConfig(size=224, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                     blur_p=0.5)

#: BYOL's two asymmetric views (Grill et al. 2020, App. B, Table 6): crop (0.08, 1) + flip, colour jitter
#: (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, then blur p 1.0 / 0.1 and solarize p 0 / 0.2.
BYOL_1 = ViewConfig(size=224, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=1.0)
BYOL_2 = ViewConfig(size=224, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2)

#: BYOL's views for 32-pixel images as lightly's CIFAR-10 benchmark uses them (``BYOLView{1,2}Transform(input_size=32,
#: gaussian_blur=0.0)``): Table 6's views without the blur, which a 32-pixel image cannot carry (as SimCLR's App. B.9).
BYOL_1_CIFAR = replace(BYOL_1, size=32, blur_p=0.0)
BYOL_2_CIFAR = replace(BYOL_2, size=32, blur_p=0.0)

#: Presets by the name a method config uses (``method.view``).
PRESETS: dict[str, ViewConfig] = {
    "simclr": SIMCLR,
    "simclr_cifar": SIMCLR_CIFAR,
    "moco_v1": MOCO_V1,
    "moco_v2": MOCO_V2,
    "byol_1": BYOL_1,
    "byol_2": BYOL_2,
    "byol_1_cifar": BYOL_1_CIFAR,
    "byol_2_cifar": BYOL_2_CIFAR,
    "inception_crop_flip": INCEPTION_CROP_FLIP,
    "inception_rotation": INCEPTION_ROTATION,
    "exemplar": EXEMPLAR,
}


def make_view(x: Tensor, cfg: ViewConfig, *, g: torch.Generator) -> Tensor:
    """One augmented view of a uint8 (or [0, 1] float) batch, following ``cfg`` in SimCLR's order.

    Returns float32 on the images' device, normalized if ``cfg.mean`` is set, in the input's memory
    format (channels_last in, channels_last out, so the backbone's convolutions stay fast).
    """
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    v = to_float(x)
    v = random_resized_crop(v, cfg.size, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p, g=g)
    if cfg.jitter_p > 0 and any(s != 0 for s in cfg.jitter):
        v = color_jitter(v, *cfg.jitter, p=cfg.jitter_p, g=g, random_order=cfg.jitter_random_order)
    if cfg.gray_p > 0:
        v = random_grayscale(v, cfg.gray_p, g=g)
    if cfg.blur_p > 0:
        ks = cfg.blur_kernel_size or blur_kernel_size(_pair(cfg.size)[0])
        v = gaussian_blur(v, cfg.blur_p, cfg.blur_sigma, ks, g=g)
    if cfg.solarize_p > 0:
        v = solarize(v, cfg.solarize_p, cfg.solarize_threshold, g=g)
    if cfg.mean is not None and cfg.std is not None:
        v = normalize(v, cfg.mean, cfg.std)
    return v.contiguous(memory_format=torch.channels_last) if channels_last else v.contiguous()
