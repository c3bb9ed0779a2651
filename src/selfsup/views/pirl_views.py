"""PIRL's views (Misra & van der Maaten 2020, §4.1; VISSL config ``pretrain/pirl/pirl_jigsaw_4node_resnet``),
batched on the device with per-sample parameters from the step generator ``g``.

Every image, and every jigsaw tile separately, gets VISSL's photometric pipeline (``pirl_color``):
``ColorJitter(0.4, 0.4, 0.4, hue=0.2)`` always applied (torchvision's random op order), then
``ImgPilRandomPhotometric`` — with p = 0.66 the four PIL ops posterize (bits U{4..8}), sharpness
(factor U[0.1, 1.9]), solarize (threshold U{0..256}) and autocontrast, in that order, all four together
(torchvision's ``RandomApply`` of the list) — then grayscale with p = 0.2. Flip and ImageNet mean/std
normalisation follow. The PIL ops are re-implemented batched on float images here (``posterize`` first
rounds to the 8-bit grid it works on).

Image branch (``pirl_image_view``): random resized crop, scale 0.08–1, to ``size``; flip; the pipeline.
Jigsaw branch (``jigsaw_view``): a separate random resized crop, scale 0.6–1, to 255 px; 3×3 cells of 85
px; a 64 px patch at a uniformly random offset in each cell; tiles shuffled by a uniformly random
permutation per image (all 9! orders); each tile flipped with p = 0.5 and put through the pipeline on its
own. VISSL flips every tile, not the crop, so we do too.

Scaling rule (``pirl_geometry``): PIRL's 255 / 85 / 64 grid goes with its 224 px image crop, so it scales
with the image-branch size S by r = S / 224, with the integer rule of ``views.patches.patch_geometry``:
cell = round(85 r) (half up), crop = 3 cell, patch = round(64 cell / 85), jitter = cell − patch. At 224
this is the paper's 255 / 85 / 64 exactly; 32 px gives 36 / 12 / 9, 64 px 72 / 24 / 18, 96 px 108 / 36 / 27.
(``patch_geometry`` itself scales from Revisiting's 292 px resize, which would give PIRL 195 / 65 / 49 at 224.)
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    hflip,
    normalize,
    random_resized_crop,
    resized_crop,
    sample_crop_boxes,
    to_float,
)
from .color import apply_subset, blend, coin, color_jitter, random_grayscale, uniform
from .patches import GRID, PatchGeometry, extract_patches
from .permutations import permute_tiles

PIRL_IMAGE, PIRL_CROP, PIRL_CELL, PIRL_PATCH = 224, 255, 85, 64
PIRL_JITTER = (0.4, 0.4, 0.4, 0.2)   # brightness, contrast, saturation, hue
PHOTOMETRIC_P = 0.66
GRAY_P = 0.2


def pirl_geometry(image_size: int) -> PatchGeometry:
    """PIRL's jigsaw geometry (255 crop, 85 cells, 64 patches at a 224 image crop) scaled to ``image_size``.
    ``resize`` equals ``crop``: the tiles are cut from a random resized crop already of that size."""
    if image_size < 4:
        raise UserError(f"image_size {image_size} is too small for a 3x3 jigsaw grid")
    cell = (2 * PIRL_CELL * image_size + PIRL_IMAGE) // (2 * PIRL_IMAGE)      # round half up, in integers
    patch = max(1, (2 * PIRL_PATCH * cell + PIRL_CELL) // (2 * PIRL_CELL))
    return PatchGeometry(resize=GRID * cell, crop=GRID * cell, grid=GRID, cell=cell, patch=patch, jitter=cell - patch)


# --------------------------------------------------------------------------- VISSL's PIL photometric ops
def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """PIL ``ImageOps.posterize``: keep the top ``bits[b]`` bits of every 8-bit value (on round(255 x))."""
    v = (x * 255).round_().to(torch.int32)
    mask = (256 - (1 << (8 - bits.to(torch.int32)))).to(x.device).view(-1, 1, 1, 1)
    return (v & mask).to(x.dtype) / 255


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Sharpness`` (as torchvision's ``adjust_sharpness``): blend with the image smoothed
    by the 3×3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels left as they are; factor 1 = identity."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5
    k = (k / k.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c).clamp_(0, 1)
    return blend(x, smooth, factor.to(x.device, x.dtype))


def solarize_at(x: Tensor, threshold: Tensor) -> Tensor:
    """PIL ``ImageOps.solarize``: values ≥ ``threshold[b]``/255 become 1 − x (threshold 256: unchanged)."""
    t = (threshold.to(x.device, x.dtype) / 255).view(-1, 1, 1, 1)
    return torch.where(x >= t, 1.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel of each image to [0, 1]; constant
    channels are left as they are."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), x)


def random_photometric(x: Tensor, p: float = PHOTOMETRIC_P, *, g: torch.Generator) -> Tensor:
    """VISSL's ``ImgPilRandomPhotometric(p)``: with probability p, posterize → sharpness → solarize →
    autocontrast, each with its own random strength. All parameters are drawn for every sample (the
    stream does not depend on which samples apply), the ops run on the chosen ones only."""
    b = x.shape[0]
    chosen = coin(b, p, g)
    bits = torch.randint(4, 9, (b,), generator=g, device=g.device)
    factor = uniform(b, 0.1, 1.9, g)
    threshold = torch.randint(0, 257, (b,), generator=g, device=g.device)

    def apply(xs: Tensor, idx: Tensor) -> Tensor:
        return autocontrast(solarize_at(sharpness(posterize(xs, bits[idx]), factor[idx]), threshold[idx]))

    return apply_subset(x, chosen, apply)


def pirl_color(x: Tensor, *, g: torch.Generator) -> Tensor:
    """The per-image (and per-tile) photometric pipeline of PIRL's VISSL config on [0, 1] floats."""
    x = color_jitter(x, *PIRL_JITTER, p=1.0, g=g)
    x = random_photometric(x, g=g)
    return random_grayscale(x, GRAY_P, g=g)


# --------------------------------------------------------------------------- the two branches
def pirl_image_view(images: Tensor, size: int, *, g: torch.Generator) -> Tensor:
    """v_I: random resized crop (scale 0.08–1) to ``size`` with flip, ``pirl_color``, ImageNet normalisation."""
    x = random_resized_crop(to_float(images), size, (0.08, 1.0), flip_p=0.5, g=g)
    return normalize(pirl_color(x, g=g), IMAGENET_MEAN, IMAGENET_STD).contiguous()


def jigsaw_view(images: Tensor, size: int, scale: tuple[float, float] = (0.6, 1.0), *,
                g: torch.Generator, permutations: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """v_I^t for jigsaw: (tiles B × 9 × C × p × p in shuffled order, perms B × 9) with ``tiles[b, j]`` the
    cell ``perms[b, j]`` (row-major) of image b, each tile augmented on its own and normalised. The order is
    uniform over all 9! permutations, or over the rows of ``permutations`` (K × 9) when given (PIRL §5's
    "number of permutations" ablation)."""
    geom = pirl_geometry(size)
    x = to_float(images)
    boxes = sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, g=g)
    crop = resized_crop(x, boxes, geom.crop)
    tiles = extract_patches(crop, replace(geom, resize=geom.crop), g)           # B × 9 × C × p × p
    if permutations is None:
        perms = torch.rand(x.shape[0], GRID * GRID, generator=g, device=g.device).argsort(1)
    else:
        pick = torch.randint(0, permutations.shape[0], (x.shape[0],), generator=g, device=g.device)
        perms = permutations.to(g.device)[pick]
    tiles = permute_tiles(tiles, perms)
    flat = hflip(pirl_color(tiles.flatten(0, 1), g=g), 0.5, g=g)
    flat = normalize(flat, IMAGENET_MEAN, IMAGENET_STD)
    return flat.view_as(tiles).contiguous(), perms
