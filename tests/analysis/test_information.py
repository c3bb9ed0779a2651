"""Ericsson et al. 2021's "what information do the features keep" analyses (§4.8, §4.9, App. A.8–A.9): planted
encoders that see only colour, only luma or only one quadrant give the answers they must; RRSE, attentive diffusion
and the per-channel MSE are their formulas on hand-made inputs; the inversion fits the features and scores a perfect
reconstruction 0; everything is seeded, JSON-ready and leaves the backbone as it found it."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfsup import backbones
from selfsup.analysis import information
from selfsup.analysis.information import (
    attentive_diffusion,
    channel_mse,
    inversion,
    mask_size,
    rrse,
    saliency,
    sensitivity,
)
from selfsup.backbones.base import Backbone
from selfsup.evaluate.features import Encoder
from selfsup.views.color import rgb_to_grayscale

RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # planted encoders see the [0, 1] image itself


class _Planted(Backbone):
    """A parameter-free backbone whose pre-logits are ``fn(x)``."""

    def __init__(self, fn, dim):
        super().__init__()
        self.fn = fn
        self.taps = {"pre_logits": dim}

    def run_stage(self, name, x):
        return self.fn(x)


def _planted(fn, dim):
    return Encoder(_Planted(fn, dim), "planted", "planted", *RAW)


def _tiny(seed=0):
    torch.manual_seed(seed)
    net = backbones.build("resnet18", width=0.0625, cifar_stem=True)
    return Encoder(net, "tiny", f"random-{seed}", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _images(n=8, side=32, seed=0):
    """A saturated random colour per image, times a left-to-right ramp (spatial structure), plus pixel noise."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 1, (n, 1, 1, 3)) ** 2
    colour /= colour.max(-1, keepdims=True)
    ramp = np.linspace(0.3, 1.0, side)[None, None, :, None]
    x = 230 * colour * ramp + rng.normal(0, 12, (n, side, side, 3))
    return x.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- (a) sensitivity


def test_an_encoder_that_sees_only_colour_is_moved_by_colour_and_not_at_all_by_flips_or_rotations():
    enc = _planted(lambda x: x.mean((2, 3)), 3)  # per-channel means: colour and nothing else
    r = sensitivity(enc, _images(16), seed=0)
    per = r["per_perturbation"]
    assert per["flip"] < 1e-5 and per["rotate90"] < 1e-5            # a mean is blind to where things are
    assert min(per["hue"], per["saturation"], per["grayscale"]) > 0.1
    assert r["colour"] > 5 * r["spatial"]
    assert r["colour"] == pytest.approx(np.mean([per[k] for k in ("hue", "saturation", "grayscale")]))
    assert r["spatial"] == pytest.approx(np.mean([per[k] for k in ("crop", "flip", "rotate90")]))
    assert per["hue"] == pytest.approx(r["distances"]["hue"] / r["pair_distance"])


def test_a_colour_blind_encoder_does_not_see_grayscale_but_sees_flips():
    enc = _planted(lambda x: F.adaptive_avg_pool2d(rgb_to_grayscale(x), 4).flatten(1), 16)  # luma, 4×4 cells
    per = sensitivity(enc, _images(16), seed=1)["per_perturbation"]
    assert per["grayscale"] < 1e-5
    assert per["flip"] > 0.1 and per["crop"] > 0.1


def test_a_dead_encoder_gets_no_normalised_sensitivity_rather_than_a_nan():
    r = sensitivity(_planted(lambda x: torch.zeros(len(x), 2), 2), _images(4))
    assert r["pair_distance"] == 0 and r["colour"] is None and r["spatial"] is None and r["colour_to_spatial"] is None
    assert set(r["per_perturbation"].values()) == {None} and json.loads(json.dumps(r)) == r


def test_sensitivity_is_seeded_json_ready_and_leaves_the_backbone_as_it_was():
    enc = _tiny()
    net = enc.backbone.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    images = _images(12)
    a, b = sensitivity(enc, images, seed=3, batch_size=5), sensitivity(enc, images, seed=3, batch_size=5)
    c = sensitivity(enc, images, seed=4, batch_size=5)
    assert a == b and a["per_perturbation"] != c["per_perturbation"]
    assert json.loads(json.dumps(a)) == a
    assert all(np.isfinite(v) and v > 0 for v in a["per_perturbation"].values())
    # only the chosen perturbations, and each one's draws do not depend on the others
    only = sensitivity(enc, images, seed=3, colour=("grayscale",), spatial=("crop",), batch_size=5)
    assert set(only["per_perturbation"]) == {"grayscale", "crop"}
    assert only["per_perturbation"]["crop"] == pytest.approx(a["per_perturbation"]["crop"])
    assert net.training and all(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():  # eval mode: no BatchNorm statistic moved
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="perturbations"):
        sensitivity(enc, images, colour=("sepia",))


# --------------------------------------------------------------------------- (b) saliency


def test_rrse_and_attentive_diffusion_are_their_formulas_on_hand_made_inputs():
    clean = torch.tensor([1.0, 2.0, 3.0])                              # Σ (f − mean f)² = 1 + 0 + 1 = 2
    occluded = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 3.0], [3.0, 4.0, 1.0]])
    torch.testing.assert_close(rrse(clean, occluded), torch.tensor([0.0, (1 / 2) ** 0.5, (12 / 2) ** 0.5]))
    torch.testing.assert_close(rrse(10 * clean, 10 * occluded), rrse(clean, occluded))  # scale-invariant
    assert attentive_diffusion([[0, 0], [0, 4]]) == 25.0                 # mean 1: one cell of four above it
    assert attentive_diffusion([[1, 2, 3, 4]]) == 50.0                   # mean 2.5
    assert attentive_diffusion(np.ones((3, 3))) == 0.0                   # "above", strictly
    assert mask_size(224) == 10 and mask_size(64) == 3 and mask_size(32) == 1


def test_every_pixel_is_covered_by_mask_squared_placements_at_stride_1():
    side, mask = 9, 3
    pos = information._placements(side, mask, 1).numpy()
    assert pos[0] == -(mask - 1) and pos[-1] == side - 1
    cover = np.zeros(side, int)
    for t in pos:
        cover[max(t, 0):t + mask] += 1
    assert (cover == mask).all() and (np.outer(cover, cover) == mask**2).all()  # rows × columns


@pytest.mark.parametrize("mask", [1, 3])
def test_saliency_of_an_encoder_that_sees_one_quadrant_lies_in_that_quadrant(mask):
    side, half = 16, 8
    enc = _planted(lambda x: x[:, :, :half, :half].flatten(1), 3 * half * half)  # only the top-left quadrant
    r = saliency(enc, _images(3, side), mask=mask, n_maps=3)
    smap = np.array(r["maps"][0])
    assert smap.shape == (side, side)
    near = np.zeros((side, side), bool)
    near[:half + mask - 1, :half + mask - 1] = True           # the quadrant, grown by what a mask overlapping it covers
    assert (smap[:half, :half] > 0).all() and np.abs(smap[~near]).max() == 0
    assert smap[:half, :half].sum() / smap.sum() > 0.75
    for m, d in zip(r["maps"], r["per_image"], strict=True):  # every cell above the mean is near the quadrant
        m = np.array(m)
        assert near[m > m.mean()].all() and d == pytest.approx(attentive_diffusion(m))
    assert r["attentive_diffusion"] == pytest.approx(np.mean(r["per_image"]))
    assert 10 < r["attentive_diffusion"] <= 100 * near.mean()


def test_saliency_of_a_real_backbone_is_deterministic_json_ready_and_batch_size_free():
    enc = _tiny()
    images = _images(2)
    a = saliency(enc, images, n_maps=1, map_size=8, batch_size=200)
    b = saliency(enc, images, n_maps=1, map_size=8, batch_size=512)
    assert a["mask"] == 1 and a["stride"] == 1 and a["size"] == 32 and len(a["per_image"]) == 2
    assert np.array(a["maps"][0]).shape == (8, 8) and len(a["maps"]) == 1
    np.testing.assert_allclose(a["per_image"], b["per_image"], atol=1e-9)
    np.testing.assert_allclose(a["maps"], b["maps"], rtol=1e-3)
    assert 0 < a["attentive_diffusion"] < 100 and json.loads(json.dumps(a)) == a


# --------------------------------------------------------------------------- (c) inversion


def test_channel_mse_is_the_per_channel_mean_squared_error():
    original = np.zeros((2, 2, 3))
    original[0, 0, 0] = 1.0          # R: one pixel of four off by 1          -> 1/4
    original[..., 1] = 0.5           # G: every pixel off by 0.5              -> 0.25
    original[1, 1, 2] = 0.2          # B: one pixel of four off by 0.2        -> 0.01
    assert channel_mse(np.zeros((2, 2, 3)), original) == pytest.approx([0.25, 0.25, 0.01])
    assert channel_mse(original, original) == [0.0, 0.0, 0.0]


def test_inversion_fits_the_block4_features_and_is_seeded():
    enc = _tiny()
    image = _images(1)[0]
    r = inversion(enc, image, steps=40, seed=0)
    assert r["loss_final"] < 0.2 * r["loss_initial"]
    assert r["loss_curve"][0][0] == 0 and r["loss_curve"][-1] == [40, r["loss_final"]]
    assert r["colour_error"] == pytest.approx(np.mean(r["channel_mse"])) and 0 < r["colour_error"] < 1
    assert r["tap"] == "block4" and r["lr"] == 1e-3 and json.loads(json.dumps(r)) == r
    inverted = np.array(Image.open(io.BytesIO(base64.b64decode(r["inverted_png"]))))
    original = np.array(Image.open(io.BytesIO(base64.b64decode(r["original_png"]))))
    assert inverted.shape == original.shape == (32, 32, 3) and np.array_equal(original, image)
    again = inversion(enc, image, steps=5, seed=1)
    assert again == inversion(enc, image, steps=5, seed=1)
    assert again["loss_curve"][0] != inversion(enc, image, steps=5, seed=2)["loss_curve"][0]
    assert enc.backbone.training and all(p.requires_grad for p in enc.backbone.parameters())  # restored


def test_a_perfect_reconstruction_has_zero_colour_error_and_zero_loss(monkeypatch):
    image = _images(1)[0]
    target = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255

    class Perfect(torch.nn.Module):  # a "generator" that already outputs the image; Adam's step on 0 grads is 0
        levels = 0

        def __init__(self, *args):
            super().__init__()
            self.image = torch.nn.Parameter(target.clone())

        def forward(self, z):
            return self.image

    monkeypatch.setattr(information, "DeepImagePrior", Perfect)
    r = inversion(_tiny(), image, steps=3)
    assert r["channel_mse"] == [0.0, 0.0, 0.0] and r["colour_error"] == 0.0
    assert r["loss_initial"] == 0.0 and r["loss_final"] == 0.0
