"""RandAugment against PIL itself (ImageOps / ImageEnhance / Image.transform / Image.rotate), image by image,
with the level -> argument rules of PyContrast's ``RandAugment.py`` re-written here independently."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from selfsup.views.randaugment import (
    OPS,
    RA_FILL,
    RandAugmentParams,
    affine,
    apply_rand_augment,
    enhance_color,
    enhance_contrast,
    equalize,
    rand_augment,
    rotate,
    sample_rand_augment,
    shear_x,
    solarize,
    solarize_add,
    translate_x,
    translate_y,
)

torch.set_num_threads(1)

FILL8 = (124, 116, 104)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SHAPES = [(24, 24), (20, 28)]  # square, and non-square (H != W)
EXACT = 1 / 255 + 1e-6
GEOM_EXACT = 1.002 / 255  # + float32 sampling coordinates (measured 1.0003 / 255)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uint8_images(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Three 3-channel images: uniform noise, skewed noise (cubed), and a narrow range 100..140 (one channel
    with only two levels), so autocontrast and equalize have real work to do."""
    g = gen(seed)
    noise = torch.randint(0, 256, (3, h, w), generator=g)
    skew = (torch.rand(3, h, w, generator=g) ** 3 * 255).round()
    narrow = torch.randint(100, 141, (3, h, w), generator=g)
    narrow[2] = torch.where(narrow[2] > 120, 130, 110)
    return torch.stack((noise, skew, narrow)).to(torch.uint8)


def smooth_images(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Noise upsampled 4x (bicubic): closer to natural images than pixel noise."""
    small = torch.rand(3, 3, h // 4 + 1, w // 4 + 1, generator=gen(seed))
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return (big * 255).round().clamp(0, 255).to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def pil_op(name: str, im: Image.Image, m: float, sign: float, cubic: bool, fill=FILL8) -> Image.Image:
    """PyContrast's op ``name`` at magnitude m (level / 10), in PIL."""
    lv = m / 10.0
    rs = Image.BICUBIC if cubic else Image.BILINEAR
    kw = dict(resample=rs, fillcolor=fill)
    enhance = lv * 1.8 + 0.1
    if name == "AutoContrast":
        return ImageOps.autocontrast(im)
    if name == "Equalize":
        return ImageOps.equalize(im)
    if name == "Invert":
        return ImageOps.invert(im)
    if name == "Rotate":
        return im.rotate(sign * lv * 30.0, **kw)
    if name == "PosterizeTpu":
        bits = int(lv * 4)
        if bits == 0:  # Pillow >= 11 rejects 0 bits; the 2020 Pillow's LUT i & ~255 is black
            return im.point(lambda i: 0)
        return ImageOps.posterize(im, bits)
    if name == "Solarize":
        return ImageOps.solarize(im, int(lv * 256))
    if name == "SolarizeAdd":
        add = int(lv * 110)
        return im.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(im).enhance(enhance)
    w, h = im.size
    matrix = {
        "ShearX": (1, sign * lv * 0.3, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, sign * lv * 0.3, 1, 0),
        "TranslateXRel": (1, 0, sign * lv * 0.45 * w, 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, sign * lv * 0.45 * h),
    }[name]
    return im.transform(im.size, Image.AFFINE, matrix, **kw)


def one_op(name: str, mags, signs, cubic) -> RandAugmentParams:
    b = len(mags)
    return RandAugmentParams(
        op=torch.full((1, b), OPS.index(name)),
        applied=torch.ones(1, b, dtype=torch.bool),
        magnitude=torch.tensor([mags], dtype=torch.float64),
        sign=torch.tensor([signs], dtype=torch.float64),
        bicubic=torch.tensor([cubic]),
    )


def fields(p: RandAugmentParams):
    return (p.op, p.applied, p.magnitude, p.sign, p.bicubic)


def ours_and_pil(name, x8, mags, signs, cubic, fill8=FILL8):
    out = apply_rand_augment(x8.float() / 255, one_op(name, mags, signs, cubic), tuple(v / 255 for v in fill8))
    ref = torch.stack([from_pil(pil_op(name, to_pil(x8[i]), mags[i], signs[i], cubic[i], fill8))
                       for i in range(x8.shape[0])])
    return out, ref


MAGS, SIGNS = [10.0, 6.3, 2.7], [1.0, -1.0, 1.0]


# --------------------------------------------------------------------------- each op against PIL
def test_ops_are_the_fifteen_of_pycontrast():
    assert OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeTpu", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "PosterizeTpu", "Solarize", "SolarizeAdd",
                                  "Color", "Contrast", "Brightness"])
def test_pointwise_and_histogram_ops_match_pil(name, shape):
    x8 = uint8_images(*shape)
    for mags in (MAGS, [1.0, 9.9, 5.0]):  # 1.0: posterize to 0 bits; 10: solarize at 256 (no-op)
        out, ref = ours_and_pil(name, x8, mags, SIGNS, [False] * 3)
        assert (out - ref).abs().max() <= EXACT, name


@pytest.mark.parametrize("shape", SHAPES)
def test_sharpness_matches_pil(shape):
    # pirl_views.sharpness does not round PIL's SMOOTH image to uint8: |1 - f| * 0.5 / 255 more than truncation
    out, ref = ours_and_pil("Sharpness", uint8_images(*shape), MAGS, SIGNS, [False] * 3)
    assert (out - ref).abs().max() <= 1.5 / 255  # measured 1.32
    assert (out - ref).abs().mean() <= 0.5 / 255  # measured 0.35


def test_equalize_edge_cases_match_pil():
    x8 = uint8_images(8, 8)
    x8[0, 0] = 77  # a constant channel: identity
    x8[0, 1] = torch.where(torch.arange(64).view(8, 8) < 63, 5, 250)  # two levels, step = 63 // 255 = 0: identity
    x8[1, 2] = torch.where(torch.arange(64).view(8, 8) % 3 == 0, 0, 255)
    ref = torch.stack([from_pil(ImageOps.equalize(to_pil(img))) for img in x8])
    x = x8.float() / 255
    out = equalize(x)
    assert (out - ref).abs().max() <= 1e-6
    assert torch.equal(out[0, :2], x[0, :2])
    # PIL's step is (count - h[last]) // 255: 256 pixels with a single brightest one give step 1, not 0
    y8 = torch.randint(0, 100, (2, 3, 16, 16), generator=gen(2), dtype=torch.uint8)
    y8[:, :, 0, 0] = 200
    big8 = uint8_images(64, 48, seed=5)  # 3072 pixels: // 255 and // 256 differ
    for z8 in (y8, big8):
        ref = torch.stack([from_pil(ImageOps.equalize(to_pil(img))) for img in z8])
        assert (equalize(z8.float() / 255) - ref).abs().max() <= 1e-6


def test_color_and_contrast_degenerate_images_are_pils():
    # factor 0 returns PIL's degenerate image itself: the integer 'L' image, and the constant int(mean(L) + 0.5)
    g = gen(12)
    x8 = torch.cat([uint8_images(17, 23, seed=s) for s in range(6)] +
                   [(torch.rand(6, 3, 17, 23, generator=g) * torch.rand(6, 3, 1, 1, generator=g) * 255).round()
                    .to(torch.uint8)])
    x, zero = x8.float() / 255, torch.zeros(x8.shape[0])
    for name, ours in (("Color", enhance_color), ("Contrast", enhance_contrast)):
        ref = torch.stack([from_pil(getattr(ImageEnhance, name)(to_pil(img)).enhance(0.0)) for img in x8])
        assert (ours(x, zero) - ref).abs().max() <= 1e-6, name


def test_uint8_defined_ops_read_the_rounded_grid():
    # off-grid floats (from an earlier op) are thresholded at round(255 x), as PIL would see them
    x = torch.tensor([127.4, 127.6, 200.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2) / 255
    out = solarize_add(x, torch.full((3,), 10.0))
    assert torch.allclose(out[:, 0, 0, 0] * 255, torch.tensor([137.4, 127.6, 200.0]), atol=1e-4)
    out = solarize(x, torch.full((3,), 128))
    assert torch.allclose(out[:, 0, 0, 0] * 255, torch.tensor([127.4, 127.4, 55.0]), atol=1e-4)


# Bilinear agrees with PIL up to PIL's truncation to uint8 (max 1/255). Bicubic: PIL's transform uses the a = -1
# cubic, grid_sample a = -0.75; bounds on the mean absolute error in /255 (measured: noise <= 2.2, smooth <= 1.07).
BICUBIC_MAE = {"noise": 2.5, "smooth": 1.25}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_geometric_ops_match_pil(name, shape, kind):
    x8 = uint8_images(*shape) if kind == "noise" else smooth_images(*shape)
    out, ref = ours_and_pil(name, x8, MAGS, SIGNS, [False] * 3)
    assert (out - ref).abs().max() <= GEOM_EXACT, name
    out, ref = ours_and_pil(name, x8, MAGS, SIGNS, [True] * 3)
    assert (out - ref).abs().mean() * 255 <= BICUBIC_MAE[kind], name
    mixed, _ = ours_and_pil(name, x8, MAGS, SIGNS, [False, True, False])  # per-sample resample choice
    assert torch.equal(mixed[1], out[1]) and (mixed[0] - ref[0]).abs().max() > 0


def pil_fill_mask(name, h, w, m, sign, cubic):
    white = Image.new("RGB", (w, h), (255, 255, 255))
    return from_pil(pil_op(name, white, m, sign, cubic, fill=(0, 0, 0)))[0] == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_fill_region_matches_pil(name, shape):
    h, w = shape
    ones = torch.ones(3, 3, h, w)
    for cubic in (False, True):
        out = apply_rand_augment(ones, one_op(name, MAGS, SIGNS, [cubic] * 3), fill=(0.0, 0.0, 0.0))
        assert out.amax(1).le(1 + 1e-6).all() and out.amin(1).ge(0).all()
        for i in range(3):
            ours = out[i, 0] < 0.5
            pil = pil_fill_mask(name, h, w, MAGS[i], SIGNS[i], cubic)
            assert ours.any() and torch.equal(ours, pil), (name, cubic, i)
            # and the fill colour itself is the reference's img_mean
            x = torch.rand(1, 3, h, w, generator=gen(i))
            y = apply_rand_augment(x, one_op(name, MAGS[i:i + 1], SIGNS[i:i + 1], [cubic]))
            assert torch.allclose(y[0][:, ours], torch.tensor(RA_FILL).view(3, 1))


def test_fill_boundary_on_exact_pixel_edges():
    # half-pixel translations put PIL's sample points exactly on the edges 0 and W: x = 0 is inside, x = W is not
    h, w = 12, 16
    white = Image.new("RGB", (w, h), (255, 255, 255))
    ones = torch.ones(1, 3, h, w)
    for fn, px, matrix in ((translate_x, 2.5, (1, 0, 2.5, 0, 1, 0)), (translate_x, -3.5, (1, 0, -3.5, 0, 1, 0)),
                           (translate_y, 1.5, (1, 0, 0, 0, 1, 1.5)), (translate_y, -4.5, (1, 0, 0, 0, 1, -4.5))):
        for cubic in (False, True):
            rs = Image.BICUBIC if cubic else Image.BILINEAR
            pil = from_pil(white.transform((w, h), Image.AFFINE, matrix, resample=rs, fillcolor=(0, 0, 0)))[0] == 0
            ours = fn(ones, torch.tensor([px]), (0.0, 0.0, 0.0), torch.tensor([cubic]))[0, 0] < 0.5
            assert torch.equal(ours, pil), (px, cubic)


def test_rotation_direction_and_public_geometric_functions():
    # a bright pixel right of centre moves up under a +90 degree (counter-clockwise) rotation, as PIL
    x = torch.zeros(1, 3, 9, 9)
    x[..., 4, 7] = 1.0
    y = rotate(x, torch.tensor([90.0]), fill=(0.0, 0.0, 0.0))
    assert y[0, 0].argmax().item() == 1 * 9 + 4
    x8 = smooth_images(16, 16)
    x = x8.float() / 255
    cases = ((shear_x, 0.2, "ShearX", 0.2 / 0.3 * 10), (translate_y, -5.4, "TranslateYRel", 5.4 / 7.2 * 10))
    for fn, arg, name, m in cases:  # the per-op functions take the argument itself (factor, pixels)
        out = fn(x, torch.full((3,), arg), RA_FILL, torch.zeros(3, dtype=torch.bool))
        ref = torch.stack([from_pil(pil_op(name, to_pil(img), m, math.copysign(1, arg), False)) for img in x8])
        assert (out - ref).abs().max() <= GEOM_EXACT
    ident = affine(x, torch.tensor([[1.0, 0, 0, 0, 1, 0]]).repeat(3, 1), RA_FILL, torch.tensor([False, True, False]))
    assert (ident - x).abs().max() <= 1e-5


# --------------------------------------------------------------------------- the sampler
def test_sampler_distribution():
    b = 20000
    prm = sample_rand_augment(b, gen(3))
    assert prm.op.shape == prm.applied.shape == prm.magnitude.shape == prm.sign.shape == prm.bicubic.shape == (2, b)
    counts = torch.bincount(prm.op.flatten(), minlength=15).double()
    assert counts.numel() == 15 and (counts - 2 * b / 15).abs().max() <= 5 * math.sqrt(2 * b / 15)
    same = (prm.op[0] == prm.op[1]).double().mean()  # with replacement: the same op twice with p 1/15
    assert abs(same - 1 / 15) <= 0.01
    assert abs(prm.applied.double().mean() - 0.5) <= 0.01
    mag = prm.magnitude
    assert mag.max() <= 10.0 and mag.min() >= 0.0
    assert abs(mag.mean() - (10 - 0.5 / math.sqrt(2 * math.pi))) <= 0.01  # E min(10, N(10, .5)) = 9.80
    assert abs((mag == 10.0).double().mean() - 0.5) <= 0.01
    assert set(prm.sign.unique().tolist()) == {-1.0, 1.0} and abs(prm.sign.mean()) <= 0.02
    assert abs(prm.bicubic.double().mean() - 0.5) <= 0.01


def test_sampler_stream_does_not_depend_on_p_and_magnitude_std():
    a, b = sample_rand_augment(64, gen(5), p=0.0), sample_rand_augment(64, gen(5), p=1.0)
    assert not a.applied.any() and b.applied.all()
    for f in ("op", "magnitude", "sign", "bicubic"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    fixed = sample_rand_augment(64, gen(5), magnitude=9.0, magnitude_std=0.0)
    assert torch.equal(fixed.op, a.op) and (fixed.magnitude == 9.0).all()


# --------------------------------------------------------------------------- the whole policy
def test_determinism_and_params_independent_of_images():
    x1, x2 = torch.rand(8, 3, 16, 16, generator=gen(1)), torch.rand(8, 3, 16, 16, generator=gen(2))
    g1, g2 = gen(7), gen(7)
    assert torch.equal(rand_augment(x1, g=g1), rand_augment(x1, g=gen(7)))
    rand_augment(x2, g=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert torch.equal(rand_augment(x2, g=gen(7)), apply_rand_augment(x2, sample_rand_augment(8, gen(7))))


def test_skipped_samples_are_bit_identical():
    x = torch.rand(6, 3, 16, 16, generator=gen(4))
    prm = sample_rand_augment(6, gen(8), p=1.0)
    applied = prm.applied.clone()
    applied[:, 2] = False  # sample 2 skips both layers
    applied[0, 4] = False  # sample 4 skips layer 0 only
    out = apply_rand_augment(x, RandAugmentParams(prm.op, applied, prm.magnitude, prm.sign, prm.bicubic))
    assert torch.equal(out[2], x[2])
    only_layer1 = RandAugmentParams(*(t[1:, 4:5] for t in fields(prm)))
    assert torch.equal(out[4], apply_rand_augment(x[4:5], only_layer1)[0])
    assert torch.equal(apply_rand_augment(x, sample_rand_augment(6, gen(8), p=0.0)), x)


def test_range_shape_dtype_and_channels_last():
    x = torch.rand(16, 3, 20, 28, generator=gen(6)).contiguous(memory_format=torch.channels_last)
    out = rand_augment(x, p=1.0, g=gen(9))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)
    out64 = rand_augment(x.double().contiguous(), g=gen(9))
    assert out64.dtype == torch.float64 and out64.is_contiguous()
    with pytest.raises(TypeError):
        rand_augment((x * 255).to(torch.uint8), g=gen(9))


def test_per_sample_independence_and_layer_order():
    x = torch.rand(12, 3, 16, 20, generator=gen(10))
    prm = sample_rand_augment(12, gen(11), p=1.0)
    out = apply_rand_augment(x, prm)
    for i in range(12):
        alone = apply_rand_augment(x[i:i + 1], RandAugmentParams(*(t[:, i:i + 1] for t in fields(prm))))
        assert (alone[0] - out[i]).abs().max() <= 1e-6, i
    first = apply_rand_augment(x, RandAugmentParams(*(t[:1] for t in fields(prm))))
    both = apply_rand_augment(first, RandAugmentParams(*(t[1:] for t in fields(prm))))
    assert torch.equal(both, out)


def test_two_layers_match_pil_chain():
    # the reference truncates to uint8 after each op, we carry floats: two truncations at most
    x8 = smooth_images(24, 24, seed=3)
    names = [("Color", "Rotate"), ("Equalize", "ShearY"), ("TranslateXRel", "Solarize")]
    op = torch.tensor([[OPS.index(a) for a, _ in names], [OPS.index(b) for _, b in names]])
    mag = torch.tensor([[9.0, 10.0, 8.0], [10.0, 9.5, 10.0]], dtype=torch.float64)
    sign = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    prm = RandAugmentParams(op, torch.ones(2, 3, dtype=torch.bool), mag, sign, torch.zeros(2, 3, dtype=torch.bool))
    out = apply_rand_augment(x8.float() / 255, prm)
    for i, pair in enumerate(names):
        im = to_pil(x8[i])
        for t, name in enumerate(pair):
            im = pil_op(name, im, mag[t, i].item(), sign[t, i].item(), False)
        diff = (out[i] - from_pil(im)).abs()
        assert diff.mean() <= 1.0 / 255 and diff.max() <= 2.5 / 255, pair  # measured <= 0.76 and 1.87
