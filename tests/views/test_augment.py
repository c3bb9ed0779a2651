"""Batched augmentations against independent references (torchvision formulas, colorsys, F.interpolate)."""

import colorsys
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_CROP_FLIP,
    PRESETS,
    SIMCLR,
    SIMCLR_CIFAR,
    JitterParams,
    adjust_hue,
    apply_color_jitter,
    blur,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    make_view,
    normalize,
    random_grayscale,
    random_resized_crop,
    resized_crop,
    rgb_to_hsv,
    rotate90,
    sample_color_jitter_params,
    sample_crop_boxes,
    solarize,
    to_float,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=gen(seed))


def differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample: does sample i of a differ from sample i of b?"""
    return (a - b).flatten(1).abs().amax(1) > 1e-6


# --------------------------------------------------------------------------- dtype / normalize
def test_to_float_and_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32
    assert torch.allclose(f.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    n = normalize(f, IMAGENET_MEAN, IMAGENET_STD).flatten()
    ref = [(v - m) / s for v, m, s in zip([0.0, 0.2, 1.0], IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(n, torch.tensor(ref), atol=1e-6)


# --------------------------------------------------------------------------- random resized crop
def test_full_square_crop_is_identity():
    x = images(3, 16, 16)
    y = random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, g=gen())
    assert (y - x).abs().max() < 1e-5


@pytest.mark.parametrize(
    "box, size",
    [((1, 2, 5, 4), (9, 7)), ((0, 3, 11, 9), (4, 5)), ((2, 0, 10, 12), 10), ((0, 0, 12, 12), 5)],
)
def test_resized_crop_matches_crop_then_interpolate(box, size):
    x = images(2, 12, 12)
    t, l, h, w = box
    out = (size, size) if isinstance(size, int) else size
    ref = F.interpolate(x[:, :, t : t + h, l : l + w], size=out, mode="bilinear", align_corners=False)
    boxes = torch.tensor([box, box])
    y = resized_crop(x, boxes, size)
    assert y.shape == (2, 3, *out)
    assert (y - ref).abs().max() < 1e-5
    # channels_last input gives the same values
    y_cl = resized_crop(x.contiguous(memory_format=torch.channels_last), boxes, size)
    assert (y_cl - ref).abs().max() < 1e-5


def test_flip_really_flips():
    x = images(2, 10, 10)
    whole = torch.tensor([[0, 0, 10, 10]] * 2)
    y = resized_crop(x, whole, 10, flip=torch.tensor([True, False]))
    assert (y[0] - x[0].flip(-1)).abs().max() < 1e-5
    assert (y[1] - x[1]).abs().max() < 1e-5
    y = random_resized_crop(x, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, g=gen())
    assert (y - x.flip(-1)).abs().max() < 1e-5


def test_crop_boxes_respect_bounds_and_are_spread():
    H = W = 64
    boxes = sample_crop_boxes(4000, H, W, (0.08, 1.0), (3 / 4, 4 / 3), g=gen(1)).double()
    top, left, h, w = boxes.unbind(1)
    assert bool((h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= H).all() and (left + w <= W).all())
    # w, h are rounded from the exact sqrt(area * r), sqrt(area / r): allow +-0.5 px each
    assert bool(((w + 0.5) * (h + 0.5) >= 0.08 * H * W).all())
    assert bool(((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all())
    frac = w * h / (H * W)
    assert frac.min() < 0.1 and frac.max() > 0.9
    assert abs(torch.log(w / h).mean().item()) < 0.02  # log-ratio symmetric around 0
    rh, rw = (H - h) > 0, (W - w) > 0
    assert abs((top[rh] / (H - h[rh])).mean().item() - 0.5) < 0.03  # offset uniform over positions
    assert abs((left[rw] / (W - w[rw])).mean().item() - 0.5) < 0.03


def test_crop_fallback_is_center_crop_with_clamped_ratio():
    # area fraction >= 2 can never fit: torchvision falls back to the central crop
    boxes = sample_crop_boxes(5, 20, 60, (2.0, 3.0), (3 / 4, 4 / 3), g=gen())
    w = round(20 * 4 / 3)
    assert boxes.tolist() == [[0, (60 - w) // 2, 20, w]] * 5
    boxes = sample_crop_boxes(3, 30, 30, (2.0, 3.0), (3 / 4, 4 / 3), g=gen())
    assert boxes.tolist() == [[0, 0, 30, 30]] * 3


# --------------------------------------------------------------------------- colour
def test_hsv_and_hue_shift_match_colorsys():
    x = images(2, 4, 5, seed=3)
    x[0, :, 0, 0] = 0.5  # a grey pixel (hue undefined -> 0)
    shift = torch.tensor([0.3, -0.45])
    hsv = rgb_to_hsv(x)
    y = adjust_hue(x, shift)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                assert torch.allclose(hsv[b, :, i, j], torch.tensor([h, s, v]), atol=1e-5)
                ref = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
                assert torch.allclose(y[b, :, i, j], torch.tensor(ref), atol=1e-5)


def gray_ref(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def jitter_ref(x, op: int, f: float):
    """torchvision's functional formulas, written out for one sample x (1 x 3 x H x W)."""
    if op == 0:  # adjust_brightness: blend with black
        return (f * x).clamp(0, 1)
    if op == 1:  # adjust_contrast: blend with the mean of the grayscale image
        return (f * x + (1 - f) * gray_ref(x).mean()).clamp(0, 1)
    if op == 2:  # adjust_saturation: blend with the grayscale image
        return (f * x + (1 - f) * gray_ref(x)).clamp(0, 1)
    return adjust_hue(x, torch.tensor([f]))


@pytest.mark.parametrize("op", [0, 1, 2])
def test_brightness_contrast_saturation_formulas(op):
    x = images(2, 6, 6, seed=4)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    factors[0, op], factors[1, op] = 1.7, 0.4
    y = apply_color_jitter(x, JitterParams(factors, torch.arange(4).expand(2, 4)))
    for b in range(2):
        assert (y[b : b + 1] - jitter_ref(x[b : b + 1], op, factors[b, op].item())).abs().max() < 1e-6


def test_jitter_follows_each_samples_own_order():
    x = images(2, 6, 6, seed=5)
    factors = torch.tensor([[1.3, 0.6, 1.5, 0.2], [0.7, 1.4, 0.3, -0.3]])
    order = torch.tensor([[3, 2, 1, 0], [1, 3, 0, 2]])
    y = apply_color_jitter(x, JitterParams(factors, order))
    for b in range(2):
        ref = x[b : b + 1]
        for op in order[b].tolist():
            ref = jitter_ref(ref, op, factors[b, op].item())
        assert (y[b : b + 1] - ref).abs().max() < 1e-5


def test_jitter_params_are_per_sample_and_in_range():
    p = sample_color_jitter_params(256, 0.8, 0.8, 0.8, 0.2, p=1.0, g=gen())
    f = p.factors
    assert bool((f[:, :3] >= 0.2).all() and (f[:, :3] <= 1.8).all() and (f[:, 3].abs() <= 0.2).all())
    assert f[:, 0].unique().numel() == 256
    assert p.order.unique(dim=0).shape[0] == 24  # all 4! orders occur
    assert bool((p.order.sort(1).values == torch.arange(4)).all())
    fixed = sample_color_jitter_params(8, 0.8, p=1.0, g=gen(), random_order=False)
    assert bool((fixed.order == torch.arange(4)).all())


def test_jitter_probability():
    x = images(16, 6, 6)
    assert torch.equal(color_jitter(x, 0.8, 0.8, 0.8, 0.2, p=0.0, g=gen()), x)
    assert bool(differs(color_jitter(x, 0.8, 0.8, 0.8, 0.2, p=1.0, g=gen()), x).all())
    some = differs(color_jitter(x, 0.8, 0.8, 0.8, 0.2, p=0.5, g=gen(2)), x)
    assert 0 < int(some.sum()) < 16


def test_grayscale_weights_and_probability():
    x = images(8, 5, 5)
    y = random_grayscale(x, p=1.0, g=gen())
    assert (y - gray_ref(x).expand_as(x)).abs().max() < 1e-6
    assert torch.equal(random_grayscale(x, p=0.0, g=gen()), x)


def test_solarize():
    x = images(8, 5, 5)
    y = solarize(x, p=1.0, threshold=0.5, g=gen())
    assert torch.equal(y, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(solarize(x, p=0.0, g=gen()), x)


# --------------------------------------------------------------------------- blur
def test_blur_matches_hand_built_gaussian():
    x = images(2, 9, 9, seed=6)
    sigma, k = 1.3, 5
    t = [i - k // 2 for i in range(k)]
    g1 = torch.tensor([math.exp(-0.5 * (v / sigma) ** 2) for v in t])
    g1 = g1 / g1.sum()
    kernel2d = torch.outer(g1, g1).expand(3, 1, k, k)
    ref = F.conv2d(F.pad(x[:1], (2, 2, 2, 2), mode="reflect"), kernel2d, groups=3)
    y = blur(x, torch.tensor([sigma, 0.4]), k)
    assert (y[:1] - ref).abs().max() < 1e-5
    assert (y[1:] - blur(x[1:], torch.tensor([0.4]), k)).abs().max() < 1e-6  # batch folding is per sample


def test_gaussian_blur_probability_and_kernel_size():
    assert [blur_kernel_size(s) for s in (224, 96, 32)] == [23, 9, 3]
    x = images(8, 10, 10)
    assert torch.equal(gaussian_blur(x, p=0.0, g=gen()), x)
    assert torch.equal(gaussian_blur(x, p=1.0, g=gen()), x)  # default kernel: 10% of 10 px -> 1 tap
    assert bool(differs(gaussian_blur(x, p=1.0, kernel_size=3, g=gen()), x).all())


# --------------------------------------------------------------------------- rotation
def test_rotate90_matches_torch_rot90():
    x = images(6, 7, 7)
    k = torch.tensor([0, 1, 2, 3, -1, 5])
    y = rotate90(x.contiguous(memory_format=torch.channels_last), k)
    for b in range(6):
        assert torch.equal(y[b], torch.rot90(x[b], int(k[b]), (1, 2)))


# --------------------------------------------------------------------------- views
SMALL = dataclasses.replace(SIMCLR, size=16)


def uint8_batch(b: int = 4, hw: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, hw, hw), generator=gen(7), dtype=torch.uint8)


def test_make_view_deterministic_per_seed():
    x = uint8_batch()
    a = make_view(x, SMALL, g=gen(11))
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, make_view(x, SMALL, g=gen(11)))
    assert not torch.equal(a, make_view(x, SMALL, g=gen(12)))


def test_make_view_samples_are_independent():
    x = uint8_batch(1).expand(6, -1, -1, -1).contiguous()  # one image repeated
    v = make_view(x, SMALL, g=gen(3))
    d = (v[:, None] - v[None]).flatten(2).abs().amax(2)
    assert bool((d + torch.eye(6) > 1e-4).all())


def test_make_view_channels_last_in_and_out():
    x = uint8_batch()
    cl = make_view(x.contiguous(memory_format=torch.channels_last), SMALL, g=gen(5))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert (cl - make_view(x, SMALL, g=gen(5))).abs().max() < 1e-5


def test_presets():
    assert SIMCLR.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and SIMCLR.jitter_p == 0.8
    assert (SIMCLR.gray_p, SIMCLR.blur_p, SIMCLR.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    assert SIMCLR.crop_scale == (0.08, 1.0) and SIMCLR.flip_p == 0.5
    assert SIMCLR_CIFAR.blur_p == 0.0 and SIMCLR_CIFAR.size == 32
    assert INCEPTION_CROP_FLIP.jitter_p == 0.0 and INCEPTION_CROP_FLIP.flip_p == 0.5
    assert set(PRESETS) >= {"simclr", "simclr_cifar", "inception_crop_flip", "inception_rotation"}
    for cfg in PRESETS.values():  # every preset runs end to end
        assert make_view(uint8_batch(2, 12), dataclasses.replace(cfg, size=8), g=gen()).shape == (2, 3, 8, 8)
    x = uint8_batch(2, 8)
    plain = dataclasses.replace(
        INCEPTION_CROP_FLIP,
        size=8,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        mean=None,
        std=None,
    )
    assert (make_view(x, plain, g=gen()) - to_float(x)).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = uint8_batch()
    cpu = make_view(x, SMALL, g=gen(9))
    cuda = make_view(x.cuda().contiguous(memory_format=torch.channels_last), SMALL, g=gen(9))
    assert cuda.is_cuda and (cuda.cpu() - cpu).abs().max() < 1e-4
