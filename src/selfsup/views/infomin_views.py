"""InfoMin's views (Tian, Sun, Poole, Krishnan, Schmid, Isola 2020, "What Makes for Good Views for Contrastive
Learning?", NeurIPS, §4.2 and App.; HobbitLong/PyContrast ``datasets/util.py`` ``build_transforms(aug='D')`` and
``JigsawCrop``, with which the released InfoMin model was trained), batched on the device with per-sample
parameters from the step generator ``g``.

Query and key (``infomin_view``), two independent draws of aug D, in its order: random resized crop, scale 0.2–1
(PyContrast's crop for a MoCo queue), flip; ``RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8)``; Gaussian blur
with p 0.5, σ ~ U[0.1, 2] and a kernel of 23 px at 224 (their ``GaussianBlur(22)`` is 2·11 + 1 wide; SimCLR's 10 %
rule gives the same 23 there, and scales it with the crop); RandAugment n = 2, m = 10, magnitude σ 0.5
(``views.randaugment``); grayscale p 0.2; ImageNet mean/std.

Jigsaw (``infomin_jigsaw_view``, ``JigsawCrop``): a separate random resized crop, scale 0.6–1, of 255 px, flipped
as a whole with p 0.5; 3 × 3 cells of 85 px with a 64 px tile at a uniformly random offset in each; no colour
augmentation; ImageNet mean/std. The geometry scales with the crop as PIRL's (``pirl_views.pirl_geometry``:
255 / 85 / 64 at 224). PyContrast's jigsaw head shuffles the nine tile features of every image by a uniformly
random permutation before concatenating them; we shuffle the tiles themselves by the same kind of permutation
(all 9! orders), which is the same thing, since every tile goes through the same encoder and head on its own.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
    hflip,
    make_view,
    normalize,
    resized_crop,
    sample_crop_boxes,
    to_float,
)
from .color import random_grayscale
from .patches import GRID, extract_patches
from .permutations import permute_tiles
from .pirl_views import pirl_geometry
from .randaugment import rand_augment

#: Aug D up to its RandAugment: crop, flip, jitter (p 0.8), blur (p 0.5), on [0, 1] (normalised after the rest).
INFOMIN_BASE = ViewConfig(size=224, crop_scale=(0.2, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.0,
                          blur_p=0.5, mean=None, std=None)
GRAY_P = 0.2
RANDAUGMENT_N, RANDAUGMENT_M, RANDAUGMENT_STD = 2, 10.0, 0.5


def infomin_view(images: Tensor, size: int, n: int = RANDAUGMENT_N, magnitude: float = RANDAUGMENT_M, *,
                 g: torch.Generator) -> Tensor:
    """One aug-D view of a uint8 (or [0, 1] float) batch: B × C × size × size, normalised; ``n`` RandAugment
    layers of ``magnitude`` (aug D: 2 and 10; n = 0 leaves RandAugment out)."""
    x = make_view(images, replace(INFOMIN_BASE, size=size), g=g)
    if n > 0:
        x = rand_augment(x, n, magnitude, RANDAUGMENT_STD, g=g)
    x = random_grayscale(x, GRAY_P, g=g)
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def infomin_jigsaw_view(images: Tensor, size: int, scale: tuple[float, float] = (0.6, 1.0), *,
                        g: torch.Generator) -> Tensor:
    """The jigsaw input: B × 9 × C × p × p tiles of each image, in a uniformly random order per image."""
    geom = pirl_geometry(size)
    x = to_float(images)
    boxes = sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, g=g)
    crop = hflip(resized_crop(x, boxes, geom.crop), 0.5, g=g)
    tiles = extract_patches(crop, replace(geom, resize=geom.crop), g)              # B × 9 × C × p × p
    perms = torch.rand(x.shape[0], GRID * GRID, generator=g, device=g.device).argsort(1)
    tiles = permute_tiles(tiles, perms)
    return normalize(tiles.flatten(0, 1), IMAGENET_MEAN, IMAGENET_STD).view_as(tiles).contiguous()
