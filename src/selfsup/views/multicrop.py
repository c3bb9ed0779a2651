"""Multi-crop views (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", §3.2 "Multi-crop: Augmenting views with smaller images"; facebookresearch/swav
``src/multicropdataset.py`` ``MultiCropDataset`` and ``main_swav.py``), for SwAV, DeepCluster v2 and SeLa v2.

A recipe is a :class:`MultiCrop`: resolution groups of crops (:class:`CropGroup`: how many, their side in
pixels, their random-resized-crop area range) plus one :class:`~selfsup.views.augment.ViewConfig` for the rest
of every crop. SwAV's ImageNet recipe is 2 × 224 at scale (0.14, 1) plus 6 × 96 at (0.05, 0.14)
(``scripts/swav_800ep_pretrain.sh``); DeepCluster v2 uses the same (``deepclusterv2_800ep_pretrain.sh``);
SeLa v2 was released with 2 × 160 + 4 × 96 (README model zoo; scales as SwAV's).

Every crop, as ``MultiCropDataset`` builds it: ``RandomResizedCrop(size, scale)`` (ratio 3/4–4/3), flip 0.5,
``RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8)`` (``get_color_distortion(s=1)``, random op order),
``RandomGrayscale(0.2)``, Gaussian blur with p 0.5 and σ ~ U[0.1, 2.0], ``ToTensor``, ``Normalize`` with
mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225). The std's 0.228 for red is SwAV's code, not the usual
0.229 (``SWAV_STD``); it changes red by 0.4 %. This is ``make_view``'s order, so a group is ``make_view``
applied to ``count · B`` rows (tested).

Blur: SwAV's ``PILRandomGaussianBlur`` is PIL's ``GaussianBlur(radius)``, radius U[0.1, 2] (PIL approximates a
Gaussian of σ = radius by three extended box blurs, with replicated edges); its README says every published
run used the OpenCV path instead, ``cv2.GaussianBlur(img, (23, 23), sigma)`` with σ U[0.1, 2] at every crop
size, whose border is reflect-101. We apply a true Gaussian, σ = radius, with ``augment.blur`` (reflect
padding, which is reflect-101): the kernel is 23 taps (``SWAV_BLUR_KERNEL``, ``view.blur_kernel_size`` overrides
it) clipped to the largest odd number ≤ the crop side, so 224 and 96 px crops get OpenCV's 23 × 23 and a 14 px
crop 13 × 13. 13 taps cover ±3σ at σ = 2 (99.7 % of the mass), so the clipping changes a crop by less than
0.3 % of its range; at 8 px the 7 taps cover ±1.5σ of the widest blur. σ is in output pixels, as SwAV's.

Layout (the methods rely on it): ``multicrop_views`` returns one tensor per group, in ``mc.groups`` order.
**Group 0 is the global group** (SwAV's ``crops_for_assign`` 0, 1 and DeepCluster v2's / SeLa v2's targets are
its crops); every later group is local and must be no larger. A group's tensor is ``count · B × 3 × size ×
size``, crop-major: row ``c · B + b`` is crop c of image b (``torch.cat`` of SwAV's per-crop batches, which
its ``forward_backbone`` concatenates per resolution for one backbone pass). ``crop_counts(mc)`` gives
``(count of group 0, …)``, so SwAV's crop i (global first) is group k's rows of crop ``i - sum(counts[:k])``.

Randomness: every per-crop parameter (box, flip, jitter factors and order, grayscale, blur σ and coin) is drawn
from ``g`` in batched calls over the group's ``count · B`` rows, never per image. Groups draw in order and each
group's draws depend only on its own settings and the batch shape, so the global crops (group 0) are the same
whatever local groups follow: adding or removing local crops changes no global crop (tested).

Small images: ``scaled(recipe, image_size)`` scales every crop side with the input relative to ImageNet's
224 px training crop: ``size → min(image_size, max(floor(size · image_size / 224 + 0.5), min(8, image_size)))``
(round half up, at least 8 px, never above the image); counts, scales and the colour part are unchanged. So
SwAV / DeepCluster v2 become 2 × 32 + 6 × 14 at 32 px and 2 × 64 + 6 × 27 at 64 px; SeLa v2 2 × 23 + 4 × 14
at 32 px and 2 × 46 + 4 × 27 at 64 px (no size here is a tie, so the rounding direction never decides).
The blur is kept, σ 0.1–2 px as at 224; SimCLR drops it on CIFAR (App. B.9): for that, pass
``replace(mc, view=replace(mc.view, blur_p=0.0))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from selfsup.errors import UnknownName, UserError

from .augment import (
    IMAGENET_MEAN,
    ViewConfig,
    blur,
    normalize,
    resized_crop,
    sample_crop_boxes,
    simclr_jitter,
    to_float,
)
from .color import apply_subset, coin, color_jitter, random_grayscale, solarize, uniform

#: ImageNet's training crop side, the reference the ``scaled`` rule divides by.
REFERENCE_SIZE = 224
#: The smallest crop side ``scaled`` produces (unless the image itself is smaller).
MIN_CROP = 8
#: SwAV's OpenCV blur kernel, 23 × 23 at every crop size (``RandomGaussianBlur`` in multicropdataset.py).
SWAV_BLUR_KERNEL = 23
#: SwAV's ``Normalize`` std (multicropdataset.py): 0.228 for red where torchvision's ImageNet std has 0.229.
SWAV_STD: tuple[float, float, float] = (0.228, 0.224, 0.225)

#: The colour part of every SwAV crop (``size`` and ``crop_scale`` are unused: the groups set them).
SWAV_VIEW = ViewConfig(
    size=REFERENCE_SIZE,
    crop_scale=(0.14, 1.0),
    flip_p=0.5,
    jitter=simclr_jitter(1.0),
    jitter_p=0.8,
    gray_p=0.2,
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    blur_kernel_size=None,
    mean=IMAGENET_MEAN,
    std=SWAV_STD,
)


@dataclass(frozen=True)
class CropGroup:
    """``count`` crops of ``size`` × ``size`` pixels, each a random resized crop of area fraction U(``scale``)."""

    count: int
    size: int
    scale: tuple[float, float]

    def __post_init__(self) -> None:
        if isinstance(self.scale, Sequence) and not isinstance(self.scale, str):  # a YAML list -> a tuple
            object.__setattr__(self, "scale", tuple(self.scale))


def _as_group(item: object, i: int) -> CropGroup:
    if isinstance(item, CropGroup):
        return item
    if isinstance(item, Mapping) and set(item) == {"count", "size", "scale"}:
        return CropGroup(item["count"], item["size"], item["scale"])
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
        return CropGroup(*item)
    raise UserError(f"multicrop groups[{i}] must be a CropGroup, a (count, size, scale) triple or a mapping with "
                    f"keys count, size, scale; got {item!r}: e.g. {{count: 6, size: 96, scale: [0.05, 0.14]}}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class MultiCrop:
    """A multi-crop recipe: resolution groups (``groups[0]`` the global crops, the rest local) and the view.

    ``view`` supplies everything but the geometry's size and scale: ratio, flip, jitter, grayscale, blur,
    solarize, mean/std (its own ``size``/``crop_scale`` are ignored). Validated on construction.
    """

    groups: tuple[CropGroup, ...]
    view: ViewConfig = SWAV_VIEW

    def __post_init__(self) -> None:
        raw = self.groups
        if isinstance(raw, CropGroup | Mapping) or not isinstance(raw, Sequence) or isinstance(raw, str):
            raise UserError(f"multicrop groups must be a list of crop groups (group 0 the global crops), got {raw!r}")
        groups = tuple(_as_group(item, i) for i, item in enumerate(raw))
        if not groups:
            raise UserError("multicrop groups is empty: give at least the global group, "
                            "e.g. groups=(CropGroup(2, 224, (0.14, 1.0)),)")
        for i, grp in enumerate(groups):
            if not _is_int(grp.count) or grp.count < 1:
                raise UserError(f"multicrop groups[{i}].count must be an integer >= 1, got {grp.count!r}: "
                                f"give the group at least one crop or drop it")
            if not _is_int(grp.size) or grp.size < 1:
                raise UserError(f"multicrop groups[{i}].size must be an integer >= 1 (the crop side in pixels), "
                                f"got {grp.size!r}")
            sc = grp.scale
            if not isinstance(sc, tuple) or len(sc) != 2 or not all(_is_number(v) for v in sc):
                raise UserError(f"multicrop groups[{i}].scale must be a pair (low, high) of area fractions, "
                                f"got {sc!r}: e.g. (0.14, 1.0) for global crops, (0.05, 0.14) for local ones")
            lo, hi = sc
            if lo > hi:
                raise UserError(f"multicrop groups[{i}].scale = ({lo:g}, {hi:g}) has low {lo:g} > high {hi:g}: "
                                f"swap them, ({hi:g}, {lo:g})")
            if not (0 < lo and hi <= 1):
                raise UserError(f"multicrop groups[{i}].scale = ({lo:g}, {hi:g}) must lie in (0, 1] (fractions of "
                                f"the image area, 0 < low <= high <= 1): e.g. (0.14, 1.0) or (0.05, 0.14)")
            if i > 0 and grp.size > groups[0].size:
                raise UserError(f"multicrop groups[{i}].size = {grp.size} is larger than the global crop, "
                                f"groups[0].size = {groups[0].size}: local crops (every group after the first) "
                                f"must be no larger; set groups[{i}].size <= {groups[0].size} or put the larger "
                                f"group first")
        object.__setattr__(self, "groups", groups)


def crop_counts(mc: MultiCrop) -> tuple[int, ...]:
    """Crops per group in output order, e.g. (2, 6) for SwAV: the first ``counts[0]`` crops are the global ones."""
    return tuple(grp.count for grp in mc.groups)


def crop_sizes(mc: MultiCrop) -> tuple[int, ...]:
    """Crop side per group in output order, e.g. (224, 96)."""
    return tuple(grp.size for grp in mc.groups)


def describe(mc: MultiCrop) -> str:
    """One line for logs: ``2×224 (0.14–1) + 6×96 (0.05–0.14)``."""
    return " + ".join(f"{grp.count}×{grp.size} ({grp.scale[0]:g}–{grp.scale[1]:g})" for grp in mc.groups)


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def scaled_size(size: int, image_size: int, reference: int = REFERENCE_SIZE) -> int:
    """The ``scaled`` rule for one side: ``min(image_size, max(round_half_up(size·image_size/reference),
    min(MIN_CROP, image_size)))``. 224 -> image_size; 96 -> 14 at 32 px, 27 at 64 px; 160 -> 23 / 46."""
    return min(image_size, max(_round_half_up(size * image_size / reference), min(MIN_CROP, image_size)))


def scaled(recipe: MultiCrop, image_size: int, reference: int = REFERENCE_SIZE) -> MultiCrop:
    """``recipe`` for ``image_size``-pixel images: every crop side scaled by ``image_size / reference``.

    Rule (``scaled_size``): round half up, at least ``MIN_CROP`` = 8 px, at most the image. Counts, area scales
    and the view are unchanged. SwAV / DeepCluster v2: 2×32 + 6×14 at 32 px, 2×64 + 6×27 at 64 px; SeLa v2:
    2×23 + 4×14 at 32 px, 2×46 + 4×27 at 64 px; at 224 every recipe is itself.
    """
    if not _is_int(image_size) or image_size < 1:
        raise UserError(f"multicrop scaled(): image_size must be an integer >= 1 (pixels), got {image_size!r}")
    if not _is_int(reference) or reference < 1:
        raise UserError(f"multicrop scaled(): reference must be an integer >= 1 (pixels), got {reference!r}")
    groups = tuple(replace(grp, size=scaled_size(grp.size, image_size, reference)) for grp in recipe.groups)
    return replace(recipe, groups=groups)


def blur_kernel(size: int, view: ViewConfig = SWAV_VIEW) -> int:
    """Blur taps for a crop of side ``size``: ``view.blur_kernel_size`` or 23 (SwAV's OpenCV kernel), clipped to
    the largest odd number <= ``size``: 23 at 224 and 96 px, 13 at 14 px, 7 at 8 px."""
    k = view.blur_kernel_size or SWAV_BLUR_KERNEL
    if not _is_int(k) or k < 1 or k % 2 != 1:
        raise UserError(f"multicrop view.blur_kernel_size must be a positive odd integer, got {k!r}")
    return min(k, size if size % 2 == 1 else size - 1)


#: SwAV's ImageNet multi-crop (Caron et al. 2020, §3.2 and §4; scripts/swav_800ep_pretrain.sh).
SWAV_MULTICROP = MultiCrop((CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.05, 0.14))), SWAV_VIEW)
#: DeepCluster v2 (Caron et al. 2020, App.; scripts/deepclusterv2_800ep_pretrain.sh): SwAV's crops.
DEEPCLUSTER_V2_MULTICROP = SWAV_MULTICROP
#: SeLa v2 (Caron et al. 2020, App.; swav README model zoo "2x160 + 4x96"), with SwAV's scales.
SELA_V2_MULTICROP = MultiCrop((CropGroup(2, 160, (0.14, 1.0)), CropGroup(4, 96, (0.05, 0.14))), SWAV_VIEW)

#: Recipes by the name a method config uses.
RECIPES: dict[str, MultiCrop] = {
    "swav": SWAV_MULTICROP,
    "deepcluster_v2": DEEPCLUSTER_V2_MULTICROP,
    "sela_v2": SELA_V2_MULTICROP,
}


def recipe(name: str, image_size: int | None = None) -> MultiCrop:
    """A named recipe, ``scaled`` to ``image_size`` when given (SwAV's own numbers at 224 or None)."""
    if name not in RECIPES:
        raise UnknownName(f"unknown multi-crop recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    mc = RECIPES[name]
    return mc if image_size is None else scaled(mc, image_size)


def _check_images(x: Tensor, mc: MultiCrop) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"multicrop_views expects images of shape B × 3 × H × W, got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    side, big = min(H, W), mc.groups[0].size
    if big > side:
        small = describe(scaled(mc, side))
        raise UserError(f"multicrop: the global crop, groups[0].size = {big} px, is larger than the {H}×{W} images "
                        f"(multi-crop resizes crops down, not up): use the recipe scaled to the images, "
                        f"scaled(recipe, {side}) = {small}, or set method.size <= {side}")


def _group_views(v: Tensor, grp: CropGroup, view: ViewConfig, g: torch.Generator) -> Tensor:
    """``make_view`` for ``grp.count · B`` rows (crop-major) of the float batch ``v``, without the normalize."""
    B, _, H, W = v.shape
    n = grp.count * B
    boxes = sample_crop_boxes(n, H, W, grp.scale, view.crop_ratio, g=g)
    flip = coin(n, view.flip_p, g)
    # one resample per crop (not per image): no copy of the full-size batch per crop
    out = torch.cat([resized_crop(v, boxes[c * B:(c + 1) * B], grp.size, flip[c * B:(c + 1) * B])
                     for c in range(grp.count)])
    if view.jitter_p > 0 and any(s != 0 for s in view.jitter):
        out = color_jitter(out, *view.jitter, p=view.jitter_p, g=g, random_order=view.jitter_random_order)
    if view.gray_p > 0:
        out = random_grayscale(out, view.gray_p, g=g)
    if view.blur_p > 0:  # gaussian_blur's draws (sigma, then the coin) with our kernel
        ks = blur_kernel(grp.size, view)
        sigma = uniform(n, view.blur_sigma[0], view.blur_sigma[1], g)
        mask = coin(n, view.blur_p, g)
        out = apply_subset(out, mask, lambda xs, idx: blur(xs, sigma[idx], ks))
    if view.solarize_p > 0:
        out = solarize(out, view.solarize_p, view.solarize_threshold, g=g)
    return out


def multicrop_views(images_uint8: Tensor, mc: MultiCrop, *, g: torch.Generator) -> list[Tensor]:
    """All crops of a uint8 (or [0, 1] float) B × 3 × H × W batch: one float32 tensor per group of ``mc``.

    Group k's tensor is ``count_k · B × 3 × size_k × size_k`` with row ``c · B + b`` = crop c of image b;
    group 0 holds the global crops. On the images' device, in their memory format (channels_last stays).
    """
    _check_images(images_uint8, mc)
    channels_last = images_uint8.is_contiguous(memory_format=torch.channels_last)
    v = to_float(images_uint8)
    view = mc.view
    out = []
    for grp in mc.groups:
        crops = _group_views(v, grp, view, g)
        if view.mean is not None and view.std is not None:
            crops = normalize(crops, view.mean, view.std)
        out.append(crops.contiguous(memory_format=torch.channels_last) if channels_last else crops.contiguous())
    return out
