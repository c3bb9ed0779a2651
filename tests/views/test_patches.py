"""Patch grid geometry and batched patch extraction against hand-computed slices and TF's formula."""

import dataclasses
import math

import pytest
import torch

from selfsup.views.patches import (
    PatchGeometry,
    crop_patches,
    eval_geometry,
    eval_patches,
    extract_patches,
    patch_corners,
    patch_geometry,
    standardize_patches,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coord_image(batch: int, size: int) -> torch.Tensor:
    """Channel 0 = row, channel 1 = column, channel 2 = sample index (exact in float32)."""
    rows = torch.arange(size, dtype=torch.float32).view(1, size, 1).expand(batch, size, size)
    cols = torch.arange(size, dtype=torch.float32).view(1, 1, size).expand(batch, size, size)
    idx = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1).expand(batch, size, size)
    return torch.stack((rows, cols, idx), 1)


@pytest.mark.parametrize(
    "size, expected",
    [
        (292, (292, 255, 85, 64, 21)),
        (224, (224, 195, 65, 49, 16)),
        (96, (96, 84, 28, 21, 7)),
        (64, (64, 57, 19, 14, 5)),
        (32, (32, 27, 9, 7, 2)),
    ],
)
def test_geometry_table(size, expected):
    geom = patch_geometry(size)
    assert (geom.resize, geom.crop, geom.cell, geom.patch, geom.jitter) == expected
    assert geom.grid == 3 and geom.crop == 3 * geom.cell and geom.cell - geom.patch == geom.jitter
    assert abs(geom.patch / geom.cell - 64 / 85) <= 0.5 / geom.cell  # ratio kept up to rounding


@pytest.mark.parametrize(
    "size, expected", [(292, (224, 192, 64)), (96, (74, 63, 21)), (64, (49, 42, 14)), (32, (25, 21, 7))]
)
def test_eval_geometry_table(size, expected):
    geom = eval_geometry(size)
    assert (geom.resize, geom.crop, geom.patch) == expected
    assert geom.cell == geom.patch == patch_geometry(size).patch and geom.jitter == 0


def test_geometry_validates():
    with pytest.raises(ValueError):
        PatchGeometry(resize=50, crop=57, grid=3, cell=19, patch=14, jitter=5)
    with pytest.raises(ValueError):
        PatchGeometry(resize=64, crop=57, grid=3, cell=19, patch=14, jitter=4)
    with pytest.raises(ValueError):
        patch_geometry(2)


def test_centred_patches_equal_hand_slices():
    geom = patch_geometry(292)
    x = coord_image(2, 292)
    p = extract_patches(x, geom, jitter=False)
    assert p.shape == (2, 9, 3, 64, 64)
    top0 = (292 - 255) // 2  # 18, TF central crop
    off = 21 // 2  # 10, TF central crop of the cell
    for k in range(9):
        r, c = divmod(k, 3)
        t, l = top0 + 85 * r + off, top0 + 85 * c + off
        assert torch.equal(p[:, k], x[:, :, t : t + 64, l : l + 64])


def test_jittered_patches_lie_inside_their_cells():
    # resize == crop: no crop offset, so every patch must fall inside cell k exactly
    geom = dataclasses.replace(patch_geometry(64), resize=57)
    x = coord_image(32, 57)
    p = extract_patches(x, geom, gen(1))
    top, left = p[:, :, 0, 0, 0].long(), p[:, :, 1, 0, 0].long()  # B x 9 corners read off the pixels
    k = torch.arange(9)
    r, c = k // 3, k % 3
    oy, ox = top - r * geom.cell, left - c * geom.cell
    assert int(oy.min()) >= 0 and int(oy.max()) <= geom.jitter
    assert int(ox.min()) >= 0 and int(ox.max()) <= geom.jitter
    # each patch is a contiguous p x p slice of its own sample
    ar = torch.arange(geom.patch, dtype=torch.float32)
    assert torch.equal(p[:, :, 0] - top[..., None, None], ar.view(-1, 1).expand_as(p[:, :, 0]))
    assert torch.equal(p[:, :, 1] - left[..., None, None], ar.view(1, -1).expand_as(p[:, :, 1]))
    assert torch.equal(p[:, :, 2], torch.arange(32.0).view(32, 1, 1, 1).expand_as(p[:, :, 2]))
    # offsets vary across samples and across cells, and reach both ends of [0, jitter]
    assert len(torch.unique(oy[:, 0])) > 1 and len(torch.unique(oy[0])) > 1
    assert int(oy.min()) == 0 and int(ox.max()) == geom.jitter


def test_random_crop_is_shared_by_the_nine_cells():
    geom = patch_geometry(64)
    x = coord_image(32, 64)
    p = extract_patches(x, geom, gen(2))
    top, left = p[:, :, 0, 0, 0].long(), p[:, :, 1, 0, 0].long()
    k = torch.arange(9)
    uy, ux = top - (k // 3) * geom.cell, left - (k % 3) * geom.cell  # = crop corner + cell offset
    # some crop corner T in [0, resize - crop] puts every cell offset in [0, jitter]
    lo_y, hi_y = (uy.amax(1) - geom.jitter).clamp(min=0), uy.amin(1).clamp(max=geom.resize - geom.crop)
    lo_x, hi_x = (ux.amax(1) - geom.jitter).clamp(min=0), ux.amin(1).clamp(max=geom.resize - geom.crop)
    assert bool((lo_y <= hi_y).all()) and bool((lo_x <= hi_x).all())
    assert int((top + geom.patch).max()) <= 64 and int((left + geom.patch).max()) <= 64
    assert len(torch.unique(uy.amin(1))) > 1  # crops differ between samples


def test_deterministic_given_the_seed():
    geom = patch_geometry(32)
    x = torch.rand(4, 3, 32, 32, generator=gen(9))
    a = extract_patches(x, geom, gen(5))
    assert torch.equal(a, extract_patches(x, geom, gen(5)))
    assert not torch.equal(a, extract_patches(x, geom, gen(6)))
    # channels_last input gives the same patches
    assert torch.equal(a, extract_patches(x.contiguous(memory_format=torch.channels_last), geom, gen(5)))


def test_input_of_another_size_is_resized_first():
    geom = patch_geometry(32)
    x = torch.rand(2, 3, 48, 40, generator=gen(3))
    p = extract_patches(x, geom, gen(0))
    assert p.shape == (2, 9, 3, geom.patch, geom.patch)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(extract_patches(x, geom, jitter=False), extract_patches(resized, geom, jitter=False))


def test_crop_patches_matches_slices():
    x = torch.rand(3, 2, 10, 12, generator=gen(4))
    corners = torch.tensor([[[0, 0], [5, 7]], [[2, 3], [1, 8]], [[6, 0], [0, 8]]])
    p = crop_patches(x, corners, 4)
    for b in range(3):
        for j in range(2):
            t, l = corners[b, j].tolist()
            assert torch.equal(p[b, j], x[b, :, t : t + 4, l : l + 4])


def test_patch_corners_need_a_generator_only_with_jitter():
    geom = patch_geometry(64)
    with pytest.raises(ValueError):
        patch_corners(2, 64, 64, geom, None, jitter=True)
    assert patch_corners(2, 64, 64, geom, None, jitter=False).shape == (2, 9, 2)


def test_eval_patches_paper_geometry():
    x = coord_image(2, 224)  # already the eval resize of a 292-px model: no interpolation
    p = eval_patches(x, 292)
    assert p.shape == (2, 9, 3, 64, 64)
    for k in range(9):
        r, c = divmod(k, 3)
        t, l = 16 + 64 * r, 16 + 64 * c  # centre crop 192 of 224, adjacent cells of 64
        assert torch.equal(p[:, k], x[:, :, t : t + 64, l : l + 64])
    y = eval_patches(torch.rand(2, 3, 64, 80, generator=gen(1)), 64)  # shorter side -> 49, centre crop 42
    assert y.shape == (2, 9, 3, 14, 14)


def tf_per_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """TF's formula for one image, written out: (x - mean) / max(stddev, 1/sqrt(num_elements))."""
    n = x.numel()
    mean = x.sum() / n
    stddev = math.sqrt(float(((x - mean) ** 2).sum()) / n)
    return (x - mean) / max(stddev, 1.0 / math.sqrt(n))


def test_standardize_matches_tf_formula():
    p = torch.rand(2, 9, 3, 7, 7, generator=gen(0), dtype=torch.float64) * 5 - 1
    p[0, 3] = 0.25  # constant patch: floor, maps to 0 without NaN
    p[1, 5] = 0.5 + 1e-4 * torch.rand(3, 7, 7, generator=gen(1), dtype=torch.float64)  # std below 1/sqrt(N)
    out = standardize_patches(p)
    for b in range(2):
        for k in range(9):
            assert torch.allclose(out[b, k], tf_per_image_standardization(p[b, k]), atol=1e-12)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))
    assert float(out[1, 5].abs().max()) < 1e-4 * math.sqrt(147)  # scaled by sqrt(N), not by 1/std
    assert torch.allclose(out[0, 0].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out[0, 0].std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
