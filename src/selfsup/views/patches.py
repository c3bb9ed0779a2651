"""The 3x3 patch grid shared by Relative Patch Location, Jigsaw and PIRL, batched on the device.

Kolesnikov et al. 2019 (§3, "Relative Patch Location" and "Jigsaw"; public configs
``config/{relative_patch_location,jigsaw}/imagenet.sh``), after Doersch et al. 2015 and Noroozi &
Favaro 2016: resize the image to 292x292, take a random 255x255 crop, split it into a 3x3 grid of
85x85 cells and cut a random 64x64 patch out of each cell (the code's ``patch_jitter = 21`` is
``cell - patch``: the patch's offset inside its cell is uniform in [0, 21]). The gap between patches
stops the network from solving the task by continuing edges and textures across the border.
Evaluation of patch models (``config/evaluation/jigsaw_or_relative_patch_location.sh``): resize the
shorter side to 224, centre crop 192, nine 64x64 patches without jitter (cell = patch), and the
representation is the mean over the nine. Both pipelines then standardise every patch
(``standardize_patches``). PIRL (Misra & van der Maaten 2020, §4.1) uses the same 255 / 85 / 64
grid on its own random resized crop; pass ``dataclasses.replace(geom, resize=geom.crop)`` and the
already-cropped image to ``extract_patches`` for that.

Scaling rule
------------
Our cached images are square and small, so the input of ``image_size`` px plays the part of the
292-px resized image: ``r = image_size / 292``, ``cell = round(85 r)``, ``crop = 3 cell`` (the grid
tiles the crop exactly), ``patch = round(64 cell / 85)`` (keeps the paper's patch/cell ratio on
the *integer* cell rather than rounding 64 r separately, so the gap never drifts from the paper's
proportion by more than half a pixel) and ``jitter = cell - patch``. Rounding is half-up and done in
integers. At 292 px this gives the paper's numbers exactly. For evaluation the patch keeps the
training patch size ``p`` (the network must see patches of the size it was trained on):
``cell = p``, ``crop = 3 p``, ``resize = round(224 p / 64)``, which is 224 / 192 / 64 at 292 px.

======  =======  ====  ====  =====  ======  ===========  =========  ==========
input   resize   crop  cell  patch  jitter  eval resize  eval crop  eval patch
======  =======  ====  ====  =====  ======  ===========  =========  ==========
32      32       27    9     7      2       25           21         7
64      64       57    19    14     5       49           42         14
96      96       84    28    21     7       74           63         21
224     224      195   65    49     16      172          147        49
292     292      255   85    64     21      224          192        64
======  =======  ====  ====  =====  ======  ===========  =========  ==========

Every random draw (crop corner, per-cell offset) comes from an explicit CPU ``torch.Generator``
as one batched call; the small integer tensors then move to the images' device and the nine
patches of the whole batch are cut with one advanced-indexing gather (no loop over images or cells).
Grayscale is not done here: the public code greys the whole image before cropping (apply
``views.color.random_grayscale`` to the batch first); the paper's per-patch variant is
``random_grayscale`` on ``patches.flatten(0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError

# The paper's geometry, at its 292-px resize (Kolesnikov et al. 2019, §3 and public configs).
PAPER_RESIZE, PAPER_CROP, PAPER_CELL, PAPER_PATCH = 292, 255, 85, 64
# Its evaluation geometry: shorter side 224, centre crop 192, 64-px patches without jitter.
PAPER_EVAL_RESIZE = 224
GRID = 3


def _round_half_up(num: int, den: int) -> int:
    """round(num / den) with halves rounded up, in integers (no float surprises at .5)."""
    return (2 * num + den) // (2 * den)


@dataclass(frozen=True)
class PatchGeometry:
    """Sizes in pixels of the patch pipeline: resize -> crop -> grid x grid cells -> patch per cell.

    ``jitter = cell - patch`` is the largest offset of a patch inside its cell (per axis).
    """

    resize: int
    crop: int
    grid: int
    cell: int
    patch: int
    jitter: int

    def __post_init__(self) -> None:
        if self.patch < 1 or self.cell < self.patch or self.jitter != self.cell - self.patch:
            raise UserError(f"inconsistent patch geometry {self}: need 1 <= patch <= cell, jitter = cell - patch")
        if self.crop != self.grid * self.cell or self.crop > self.resize:
            raise UserError(f"inconsistent patch geometry {self}: need crop = grid * cell <= resize")


def patch_geometry(image_size: int) -> PatchGeometry:
    """The paper's training geometry (292 / 255 / 85 / 64, jitter 21) scaled to ``image_size`` px.

    See the module docstring for the rule and the table; e.g. 64 px -> crop 57, cells 19, patches 14.
    """
    if image_size < 4:
        raise UserError(f"image_size {image_size} is too small for a 3x3 patch grid (need >= 4 px)")
    cell = _round_half_up(PAPER_CELL * image_size, PAPER_RESIZE)
    patch = max(1, _round_half_up(PAPER_PATCH * cell, PAPER_CELL))
    return PatchGeometry(resize=image_size, crop=GRID * cell, grid=GRID, cell=cell, patch=patch, jitter=cell - patch)


def eval_geometry(image_size: int) -> PatchGeometry:
    """The paper's evaluation geometry (224 / 192 / 64, no jitter) for models trained at ``image_size``.

    The patch keeps the training patch size p; cells equal patches; resize = round(224 p / 64).
    """
    p = patch_geometry(image_size).patch
    resize = _round_half_up(PAPER_EVAL_RESIZE * p, PAPER_PATCH)
    return PatchGeometry(resize=resize, crop=GRID * p, grid=GRID, cell=p, patch=p, jitter=0)


# --------------------------------------------------------------------------- corners (the random part)
def patch_corners(
    batch: int,
    height: int,
    width: int,
    geom: PatchGeometry,
    g: torch.Generator | None = None,
    jitter: bool = True,
) -> Tensor:
    """Top-left corners (row, col) of every patch in an image of ``height`` x ``width``: B x grid² x 2 long.

    jitter=True (training, as TF's ``random_crop``): the crop corner is uniform over the valid
    integer positions per sample, and each patch's offset in its cell uniform in [0, jitter] per
    sample, cell and axis. jitter=False (evaluation): centred crop and centred patches with the
    code's floor ``(size - crop) // 2``, so ``g`` is not needed. Cells are row-major (4 = centre of 3x3).
    """
    if height < geom.crop or width < geom.crop:
        raise UserError(f"image {height}x{width} is smaller than the patch crop {geom.crop}")
    n = geom.grid * geom.grid
    if jitter:
        if g is None:
            raise UserError("patch_corners(jitter=True) needs a torch.Generator g")
        u = torch.rand(batch, 2, generator=g, device=g.device, dtype=torch.float64)
        span = torch.tensor([height - geom.crop + 1, width - geom.crop + 1], dtype=torch.float64, device=g.device)
        crop = (u * span).floor().long()
        cell_off = torch.randint(0, geom.jitter + 1, (batch, n, 2), generator=g, device=g.device)
    else:
        dev = g.device if g is not None else torch.device("cpu")
        crop = torch.tensor([(height - geom.crop) // 2, (width - geom.crop) // 2], device=dev).expand(batch, 2)
        cell_off = torch.full((batch, n, 2), geom.jitter // 2, dtype=torch.long, device=dev)
    k = torch.arange(n, device=crop.device)
    cell_origin = torch.stack((k // geom.grid, k % geom.grid), 1) * geom.cell  # n x 2, row-major
    return crop[:, None, :] + cell_origin[None] + cell_off


def crop_patches(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """Cut ``size`` x ``size`` patches at ``corners`` (B x P x 2, row/col) from x (B x C x H x W): B x P x C x s x s.

    One gather for the whole batch: the row and column indices of every patch pixel broadcast to
    B x P x s x s and index the channels-last view of x, whatever memory format x has.
    """
    B = x.shape[0]
    corners = corners.to(x.device)
    ar = torch.arange(size, device=x.device)
    rows = (corners[..., 0, None] + ar)[..., :, None]  # B x P x s x 1
    cols = (corners[..., 1, None] + ar)[..., None, :]  # B x P x 1 x s
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, rows, cols]  # B x P x s x s x C
    return out.permute(0, 1, 4, 2, 3).contiguous()


# --------------------------------------------------------------------------- pipelines
def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize (antialiased when shrinking, like the PIL path of the image cache); no-op if equal."""
    if x.shape[-2:] == (height, width):
        return x
    if not x.is_floating_point():
        raise TypeError(f"resizing needs float images, got {x.dtype}; convert with views.to_float first")
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def extract_patches(x: Tensor, geom: PatchGeometry, g: torch.Generator | None = None, jitter: bool = True) -> Tensor:
    """The nine patches of the patch pretext tasks: B x 9 x C x patch x patch, row-major cells.

    x: float B x C x H x W on any device. If H x W is not resize x resize the image is first resized
    to it (the training code's ``resize`` op, aspect not kept); then a crop of ``geom.crop`` and a
    patch per cell as in ``patch_corners`` (random with ``g`` when jitter, centred otherwise).
    """
    x = _resize(x, geom.resize, geom.resize)
    corners = patch_corners(x.shape[0], geom.resize, geom.resize, geom, g, jitter)
    return crop_patches(x, corners, geom.patch)


def eval_patches(x: Tensor, image_size: int) -> Tensor:
    """The paper's evaluation patches for a model trained at ``image_size`` px: B x 9 x C x p x p.

    ``resize_small`` (shorter side to the eval resize, aspect kept, as the evaluation code), centre
    crop of 3 p, nine adjacent p x p patches without jitter. Standardise with ``standardize_patches``
    and average the nine representations, as the paper does.
    """
    geom = eval_geometry(image_size)
    H, W = x.shape[-2:]
    scale = geom.resize / min(H, W)
    x = _resize(x, max(geom.resize, round(H * scale)), max(geom.resize, round(W * scale)))
    corners = patch_corners(x.shape[0], x.shape[-2], x.shape[-1], geom, jitter=False)
    return crop_patches(x, corners, geom.patch)


def standardize_patches(p: Tensor) -> Tensor:
    """TF ``per_image_standardization`` of every patch over its last three dims (C x H x W).

    ``(x - mean) / max(std, 1 / sqrt(N))`` with N = C·H·W and the population std; the floor keeps
    constant patches finite (they map to 0). Works on B x 9 x C x h x w or B x C x H x W.
    """
    n = p.shape[-1] * p.shape[-2] * p.shape[-3]
    mean = p.mean(dim=(-3, -2, -1), keepdim=True)
    std = p.var(dim=(-3, -2, -1), unbiased=False, keepdim=True).sqrt()
    return (p - mean) / std.clamp(min=1.0 / math.sqrt(n))
