"""Multi-crop views against independent references: F.interpolate, planted gradients, hand-computed sizes."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from selfsup.errors import UnknownName, UserError
from selfsup.views import ViewConfig, make_view
from selfsup.views.augment import IMAGENET_MEAN
from selfsup.views.multicrop import (
    DEEPCLUSTER_V2_MULTICROP,
    SELA_V2_MULTICROP,
    SWAV_MULTICROP,
    SWAV_VIEW,
    CropGroup,
    MultiCrop,
    blur_kernel,
    crop_counts,
    crop_sizes,
    describe,
    multicrop_views,
    recipe,
    scaled,
)

torch.set_num_threads(1)

#: geometry only: no flip, no colour, no normalisation
PLAIN = ViewConfig(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, mean=None, std=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uint8_images(b: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w or h), generator=gen(seed), dtype=torch.uint8)


def gradient_images(b: int, side: int) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index, channel 2 = image index (uint8, side <= 255)."""
    cols = torch.arange(side).view(1, 1, side).expand(b, side, side)
    rows = torch.arange(side).view(1, side, 1).expand(b, side, side)
    idx = torch.arange(b).view(b, 1, 1).expand(b, side, side)
    return torch.stack((cols, rows, idx), 1).to(torch.uint8)


def measure_boxes(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Recover (top, left, h, w, flipped) of each crop of a gradient image, from the range of values it shows.

    Bilinear resampling of a linear ramp is exact; output pixel j of a box (left, w) shows ``left + w (j + 0.5)
    / S - 0.5`` (downscaling, w >= S, so nothing is clamped), so the ramp spans ``w (S - 1) / S`` and starts at
    ``left + w / (2 S) - 0.5``.
    """
    x = crops * 255.0  # back to pixel indices
    out = []
    for ch in (0, 1):  # columns, then rows
        ramp = x[:, ch]
        lo, hi = ramp.flatten(1).amin(1), ramp.flatten(1).amax(1)
        extent = (hi - lo) * size / (size - 1)
        start = lo - extent / (2 * size) + 0.5
        out += [start, extent]
    left, w, top, h = out
    flipped = (x[:, 0, 0, 0] > x[:, 0, 0, -1]).float()
    return torch.stack((top, left, h, w, flipped), 1)


# --------------------------------------------------------------------------- shapes, order, recipes
def test_shapes_and_crop_major_order():
    b = 3
    mc = scaled(SWAV_MULTICROP, 32)
    x = uint8_images(b, 32)
    views = multicrop_views(x, mc, g=gen())
    assert crop_counts(mc) == (2, 6) and crop_sizes(mc) == (32, 14)
    assert [tuple(v.shape) for v in views] == [(2 * b, 3, 32, 32), (6 * b, 3, 14, 14)]
    assert all(v.dtype == torch.float32 for v in views)
    # constant images, geometry and colour off: row c·B + b of a group is image b, whatever the crop
    const = (torch.arange(b, dtype=torch.uint8) * 40 + 10).view(b, 1, 1, 1).expand(b, 3, 32, 32).contiguous()
    plain = multicrop_views(const, replace(mc, view=PLAIN), g=gen(1))
    for v, (count, _) in zip(plain, [(2, 32), (6, 14)], strict=True):
        expect = (torch.arange(b).repeat(count) * 40 + 10).float() / 255
        assert torch.allclose(v.flatten(1).amin(1), expect, atol=1e-6)
        assert torch.allclose(v.flatten(1).amax(1), expect, atol=1e-6)


def test_named_recipes_and_describe():
    assert describe(SWAV_MULTICROP) == "2×224 (0.14–1) + 6×96 (0.05–0.14)"
    assert describe(DEEPCLUSTER_V2_MULTICROP) == "2×224 (0.14–1) + 6×96 (0.05–0.14)"
    assert describe(SELA_V2_MULTICROP) == "2×160 (0.14–1) + 4×96 (0.05–0.14)"
    assert recipe("swav") is SWAV_MULTICROP and recipe("sela_v2", 32) == scaled(SELA_V2_MULTICROP, 32)
    with pytest.raises(UnknownName, match="'simclr'.*deepcluster_v2, sela_v2, swav"):
        recipe("simclr")
    # the colour part, as multicropdataset.py (get_color_distortion(1), PILRandomGaussianBlur, Normalize)
    v = SWAV_VIEW
    assert (v.flip_p, v.jitter, v.jitter_p, v.jitter_random_order) == (0.5, (0.8, 0.8, 0.8, 0.2), 0.8, True)
    assert (v.gray_p, v.blur_p, v.blur_sigma, v.solarize_p) == (0.2, 0.5, (0.1, 2.0), 0.0)
    assert v.crop_ratio == (3 / 4, 4 / 3)
    assert v.mean == IMAGENET_MEAN and v.std == (0.228, 0.224, 0.225)


@pytest.mark.parametrize(
    "mc, image_size, expect",
    [
        (SWAV_MULTICROP, 32, "2×32 (0.14–1) + 6×14 (0.05–0.14)"),  # 96·32/224 = 13.71
        (SWAV_MULTICROP, 64, "2×64 (0.14–1) + 6×27 (0.05–0.14)"),  # 27.43
        (DEEPCLUSTER_V2_MULTICROP, 32, "2×32 (0.14–1) + 6×14 (0.05–0.14)"),
        (SELA_V2_MULTICROP, 32, "2×23 (0.14–1) + 4×14 (0.05–0.14)"),  # 160·32/224 = 22.86
        (SELA_V2_MULTICROP, 64, "2×46 (0.14–1) + 4×27 (0.05–0.14)"),  # 45.71
        (SWAV_MULTICROP, 96, "2×96 (0.14–1) + 6×41 (0.05–0.14)"),  # 41.14
        (SWAV_MULTICROP, 16, "2×16 (0.14–1) + 6×8 (0.05–0.14)"),  # 6.86 -> 7, raised to the 8 px minimum
        (SWAV_MULTICROP, 5, "2×5 (0.14–1) + 6×5 (0.05–0.14)"),  # the minimum never exceeds the image
        (SWAV_MULTICROP, 224, "2×224 (0.14–1) + 6×96 (0.05–0.14)"),
    ],
)
def test_scaled_rule_numbers(mc, image_size, expect):
    small = scaled(mc, image_size)
    assert describe(small) == expect
    assert small.view == mc.view and crop_counts(small) == crop_counts(mc)


def test_blur_kernel_sizes():
    assert [blur_kernel(s) for s in (224, 96, 32, 23, 14, 13, 8, 1)] == [23, 23, 23, 23, 13, 13, 7, 1]
    assert blur_kernel(96, replace(SWAV_VIEW, blur_kernel_size=9)) == 9


# --------------------------------------------------------------------------- geometry
def test_full_scale_crop_is_the_resized_image():
    x = uint8_images(4, 20, 20, seed=3)
    mc = MultiCrop((CropGroup(2, 20, (1.0, 1.0)), CropGroup(3, 9, (1.0, 1.0))), PLAIN)
    ref = x.float() / 255
    views = multicrop_views(x, mc, g=gen())
    for v, size, count in zip(views, (20, 9), (2, 3), strict=True):
        want = F.interpolate(ref, size=(size, size), mode="bilinear", align_corners=False).repeat(count, 1, 1, 1)
        assert (v - want).abs().max() < 1e-5
    # flip always: the mirrored resize
    flipped = multicrop_views(x, replace(mc, view=replace(PLAIN, flip_p=1.0)), g=gen())
    want = F.interpolate(ref, size=(9, 9), mode="bilinear", align_corners=False).flip(-1).repeat(3, 1, 1, 1)
    assert (flipped[1] - want).abs().max() < 1e-5


def test_crop_boxes_cover_the_configured_scales():
    side, b = 128, 16
    x = gradient_images(b, side)
    groups = (CropGroup(2, 40, (0.14, 1.0)), CropGroup(6, 24, (0.05, 0.14)))  # w, h >= S: no upscaling
    views = multicrop_views(x, MultiCrop(groups, replace(PLAIN, flip_p=0.5)), g=gen(5))
    for v, grp in zip(views, groups, strict=True):
        box = measure_boxes(v, grp.size)
        top, left, h, w, flipped = box.unbind(1)
        # boxes are integer pixel boxes inside the image
        geom = box[:, :4]
        assert (geom - geom.round()).abs().max() < 1e-3
        top, left, h, w = (t.round() for t in (top, left, h, w))
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
        # area fraction in the range, up to the rounding of w and h to whole pixels
        frac = h * w / side**2
        lo, hi = grp.scale
        slack = 2.5 / (side * math.sqrt(lo))  # one pixel on each side, relative
        assert (frac >= lo * (1 - slack)).all() and (frac <= hi * (1 + slack)).all(), (frac.min(), frac.max())
        assert frac.min() < lo + 0.3 * (hi - lo) and frac.max() > hi - 0.3 * (hi - lo)  # the range is used
        ratio = w / h
        assert (ratio > 3 / 4 * 0.93).all() and (ratio < 4 / 3 / 0.93).all()
        # each crop its own flip, about half of them
        assert 0.2 < flipped.mean() < 0.8
        per_image = flipped.view(grp.count, b)  # crops of one image flip independently
        assert (per_image.amin(0) != per_image.amax(0)).any()
        # crop-major: row c·B + b shows image b (channel 2 carries the image index)
        assert torch.equal((v[:, 2].mean((1, 2)) * 255).round().long(), torch.arange(b).repeat(grp.count))


def test_every_crop_has_its_own_parameters():
    side, b = 64, 4
    # the same image in every row: different rows must still get different boxes
    x = gradient_images(1, side).expand(b, 3, side, side).contiguous()
    groups = (CropGroup(2, 32, (0.14, 1.0)), CropGroup(6, 16, (0.05, 0.14)))
    for v, grp in zip(multicrop_views(x, MultiCrop(groups, PLAIN), g=gen(2)), groups, strict=True):
        boxes = measure_boxes(v, grp.size)[:, :4].round().long()
        assert len({tuple(r) for r in boxes.tolist()}) == grp.count * b
    # colour parameters too: full-image crops, no flip, jitter always -> every crop of one image differs
    jitter_only = replace(PLAIN, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0)
    img = uint8_images(1, 16).expand(b, 3, 16, 16).contiguous()
    mc = MultiCrop((CropGroup(3, 16, (1.0, 1.0)),), jitter_only)
    (v,) = multicrop_views(img, mc, g=gen(4))
    rows = v.flatten(1)
    assert torch.cdist(rows, rows)[~torch.eye(3 * b, dtype=torch.bool)].min() > 1e-3
    # and the whole SwAV pipeline: no two crops of the same image are equal
    for v in multicrop_views(uint8_images(1, 32).expand(b, 3, 32, 32).contiguous(), scaled(SWAV_MULTICROP, 32),
                             g=gen(6)):
        rows = v.flatten(1)
        assert torch.cdist(rows, rows)[~torch.eye(rows.shape[0], dtype=torch.bool)].min() > 1e-3


# --------------------------------------------------------------------------- colour part
def test_blur_is_a_gaussian_of_the_drawn_sigma():
    """σ fixed at 2: the crop is the resized image convolved with a 23-tap Gaussian, reflect-101 borders."""
    x = uint8_images(2, 32, seed=7)
    view = replace(PLAIN, blur_p=1.0, blur_sigma=(2.0, 2.0))
    (v,) = multicrop_views(x, MultiCrop((CropGroup(1, 32, (1.0, 1.0)),), view), g=gen())
    t = torch.arange(23, dtype=torch.float32) - 11
    k = torch.exp(-(t**2) / (2 * 2.0**2))
    k = k / k.sum()
    y = F.pad(x.float() / 255, (11, 11, 11, 11), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, 23).repeat(3, 1, 1, 1), groups=3)
    y = F.conv2d(y, k.view(1, 1, 23, 1).repeat(3, 1, 1, 1), groups=3)
    assert (v - y).abs().max() < 1e-5


def test_a_single_crop_group_is_make_view():
    """Each crop is one make_view draw with the group's size and scale and the crop's blur kernel."""
    x = uint8_images(5, 40, seed=8)
    mc = MultiCrop((CropGroup(1, 24, (0.14, 1.0)),), SWAV_VIEW)
    (v,) = multicrop_views(x, mc, g=gen(9))
    ref = make_view(x, replace(SWAV_VIEW, size=24, crop_scale=(0.14, 1.0), blur_kernel_size=23), g=gen(9))
    assert torch.equal(v, ref)


def test_swav_view_statistics():
    """With the SwAV colour part on, about 20 % grey crops and normalised output (mean/std applied)."""
    x = uint8_images(64, 32, seed=10)
    (v, _) = multicrop_views(x, scaled(SWAV_MULTICROP, 32), g=gen(11))
    raw = v * torch.tensor((0.228, 0.224, 0.225)).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    grey = ((raw[:, 0] - raw[:, 1]).abs().amax((1, 2)) < 1e-5) & ((raw[:, 1] - raw[:, 2]).abs().amax((1, 2)) < 1e-5)
    assert 0.08 < grey.float().mean() < 0.35


# --------------------------------------------------------------------------- randomness
def test_determinism_given_the_seed():
    x = uint8_images(3, 32, seed=12)
    mc = scaled(SWAV_MULTICROP, 32)
    a, b = multicrop_views(x, mc, g=gen(13)), multicrop_views(x, mc, g=gen(13))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c = multicrop_views(x, mc, g=gen(14))
    assert all(not torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_global_crops_do_not_depend_on_the_local_crops():
    x = uint8_images(3, 32, seed=15)
    full = scaled(SWAV_MULTICROP, 32)
    glob = full.groups[0]
    variants = [
        full,
        replace(full, groups=(glob, CropGroup(2, 14, (0.05, 0.14)))),
        replace(full, groups=(glob,)),
        replace(full, groups=(glob, CropGroup(4, 20, (0.1, 0.3)), CropGroup(3, 8, (0.05, 0.1)))),
    ]
    first = [multicrop_views(x, mc, g=gen(16))[0] for mc in variants]
    assert all(torch.equal(first[0], f) for f in first[1:])
    # and the generator has moved on by the local draws (they are not a copy of the global stream)
    g1, g2 = gen(16), gen(16)
    multicrop_views(x, variants[0], g=g1)
    multicrop_views(x, variants[2], g=g2)
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_channels_last_and_float_input():
    x = uint8_images(2, 32, seed=17)
    mc = scaled(SWAV_MULTICROP, 32)
    ref = multicrop_views(x, mc, g=gen(18))
    cl = multicrop_views(x.contiguous(memory_format=torch.channels_last), mc, g=gen(18))
    fl = multicrop_views(x.float() / 255, mc, g=gen(18))
    for r, c, f in zip(ref, cl, fl, strict=True):
        assert c.is_contiguous(memory_format=torch.channels_last)
        assert (r - c).abs().max() < 1e-5 and (r - f).abs().max() < 1e-5


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "groups, match",
    [
        ((CropGroup(2, 96, (0.14, 1.0)), CropGroup(6, 128, (0.05, 0.14))),
         r"groups\[1\]\.size = 128 is larger than the global crop, groups\[0\]\.size = 96.*groups\[1\]\.size <= 96"),
        ((CropGroup(0, 224, (0.14, 1.0)),), r"groups\[0\]\.count must be an integer >= 1, got 0"),
        ((CropGroup(2, 224, (0.14, 1.0)), CropGroup(-1, 96, (0.05, 0.14))), r"groups\[1\]\.count.*got -1"),
        ((CropGroup(2.0, 224, (0.14, 1.0)),), r"groups\[0\]\.count must be an integer >= 1, got 2\.0"),
        ((CropGroup(2, 0, (0.14, 1.0)),), r"groups\[0\]\.size must be an integer >= 1.*got 0"),
        ((CropGroup(2, 224, (0.0, 1.0)),), r"groups\[0\]\.scale = \(0, 1\) must lie in \(0, 1\]"),
        ((CropGroup(2, 224, (0.14, 1.5)),), r"groups\[0\]\.scale = \(0\.14, 1\.5\) must lie in \(0, 1\]"),
        ((CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.14, 0.05))),
         r"groups\[1\]\.scale = \(0\.14, 0\.05\) has low 0\.14 > high 0\.05: swap them, \(0\.05, 0\.14\)"),
        ((CropGroup(2, 224, (0.14,)),), r"groups\[0\]\.scale must be a pair \(low, high\)"),
        ((), r"groups is empty"),
        (((2, 224),), r"groups\[0\] must be a CropGroup"),
    ],
)
def test_validation_messages(groups, match):
    with pytest.raises(UserError, match=match):
        MultiCrop(groups)


def test_yaml_style_groups_are_accepted():
    mc = MultiCrop([{"count": 2, "size": 32, "scale": [0.14, 1.0]}, [6, 14, [0.05, 0.14]]])
    assert mc == scaled(SWAV_MULTICROP, 32)
    assert describe(mc) == "2×32 (0.14–1) + 6×14 (0.05–0.14)" and isinstance(mc.groups, tuple)


def test_images_smaller_than_the_global_crop():
    x = uint8_images(2, 32)
    with pytest.raises(UserError, match=r"groups\[0\]\.size = 224 px, is larger than the 32×32 images.*"
                                        r"scaled\(recipe, 32\) = 2×32 \(0\.14–1\) \+ 6×14 \(0\.05–0\.14\).*"
                                        r"method\.size <= 32"):
        multicrop_views(x, SWAV_MULTICROP, g=gen())
    with pytest.raises(UserError, match=r"B × 3 × H × W, got \(3, 32, 32\)"):
        multicrop_views(x[0], scaled(SWAV_MULTICROP, 32), g=gen())
    with pytest.raises(UserError, match=r"image_size must be an integer >= 1.*got 0"):
        scaled(SWAV_MULTICROP, 0)
