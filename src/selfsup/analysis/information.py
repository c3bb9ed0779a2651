"""What information the features keep: colour against spatial sensitivity, occlusion saliency, feature inversion.

Ericsson, Gouk, Hospedales 2021, *How Well Do Self-Supervised Models Transfer?* (CVPR 2021, arXiv 2011.13377),
the "what information is retained" analyses: §4.8 "What information is retained in features?" with App. A.8
(deep-image-prior inversion, scored by LPIPS and per-channel MSE; Fig. 4 left and middle, Fig. 8) and §4.9 "Does
pre-training strategy influence where downstream networks attend?" with App. A.9 (occlusion saliency, "attentive
diffusion"; Fig. 4 right, Fig. 9). The authors' repository (linusericsson/ssl-transfer) publishes the linear,
finetune, few-shot, detection, dense and calibration code but no saliency or inversion script, so the paper's text
is followed and every choice it leaves open is named below. Each analysis takes an :class:`Encoder` and uint8
N×H×W×3 images and returns plain Python data (floats, lists, strings) fit for a JSON column.

**(a) ``sensitivity``: colour against spatial.** The paper's question (do self-supervised features drop colour?)
is asked of the features directly, with this operationalisation (ours, not the paper's). With f the ``tap``
features (pre-logits by default) of the un-augmented image and t_i a perturbation drawn per image::

    D(t)   = 1/N Σ_i ‖f(x_i) − f(t_i(x_i))‖₂          how far t moves an image's features
    D_pair = 1/N Σ_i ‖f(x_i) − f(x_π(i))‖₂            how far apart two different images are
    s(t)   = D(t) / D_pair                            0 = invariant, 1 = as different as another image

π is a random derangement (a cyclic shift of a random permutation: every image meets another one). The
perturbations are the single operations of SimCLR's view recipe at strength 1 (Chen et al. 2020, App. A), the
augmentations the paper blames for colour-invariant features, always applied (p = 1), from ``views``:

- colour: ``hue`` = hue rotation by U[−0.2, 0.2] turns (ColorJitter hue 0.2); ``saturation`` = saturation
  factor U[0.2, 1.8] (ColorJitter saturation 0.8); ``grayscale`` = luma replicated to three channels.
- spatial: ``crop`` = Inception random resized crop, area U[0.08, 1], ratio [3/4, 4/3], resized back to the
  input size, no flip; ``flip`` = horizontal flip; ``rotate90`` = rotation by k·90°, k uniform in {1, 2, 3}.
  (Small-angle rotations are left out: ``views`` has no arbitrary-angle rotation, and one would bring border
  filling into the measure.)

``colour`` and ``spatial`` are the plain means of s(t) over their groups. The draws of each perturbation come
from its own CPU generator seeded from (seed, name), so a value does not depend on which others are measured.

**(b) ``saliency``: task-agnostic occlusion saliency (App. A.9).** The paper slides a 10×10 mask over images
resized to 242×242 and then cropped to 224×224 "to ensure all pixels are occluded the same number of times", and
scores each placement by the root relative squared error of the occluded features against the original ones,
averaged at each pixel over the 10² placements covering it. Here, at input side S:

- mask side m = max(1, round(10·S/224)) (1 px at 32 px, 3 px at 64 px), stride 1 as in the paper.
- Placements: top-left corners at −(m−1), −(m−1)+stride, …, < S on each axis, masks clipped to the image. With
  stride 1 every pixel is covered by exactly m² placements; this is the 242 → 224 construction without the
  242/224 zoom it also brings. (A stride dividing m covers every pixel (m/stride)² times; otherwise the per-pixel
  average divides by each pixel's own count.)
- Occluded pixels take the encoder's input mean colour (0 after mean/std normalisation). The paper does not say.
- Score of a placement: RRSE(f, f̃) = sqrt(Σ_d (f̃_d − f_d)² / Σ_d (f_d − mean_d f)²), f the ``tap`` features
  (pre-logits) of the clean image, f̃ of the occluded one, so the score is invariant to the features' scale. The
  brief's alternative (a drop in cosine similarity) is not what the paper describes, so it is not used.
- The saliency of a pixel is the mean score of the placements covering it; the map is S×S.
- Attentive diffusion of a map = 100 · (share of its cells strictly above the map's mean), per image, then
  averaged (the paper's "percentage of the attention map with values above its mean").

All placements of one image run as batched forward passes (``batch_size`` occluded images per pass).

**(c) ``inversion``: deep-image-prior feature inversion (App. A.8).** A randomly initialised encoder-decoder g_θ
maps a fixed noise tensor z to an image; θ is optimised with Adam (lr 1e-3) to minimise
MSE(f(g_θ(z)), f(x)) with f the backbone's ``block4`` (the last feature map, 2048×7×7 for a ResNet-50 at 224 px).
The generator is a small version of the "skip" hourglass of Ulyanov et al.'s feature-inversion notebook
(DmitryUlyanov/deep-image-prior: z is 32-channel U[0, 0.1) noise; conv + BatchNorm + LeakyReLU(0.2) blocks,
average-pool down, nearest up, 4-channel skip connections, a sigmoid output, the generator's side rounded up to a
multiple of 2^levels and its output cropped). Theirs has six levels of 16…128 channels with 7/5/3 kernels; ours
has len(channels) levels (default 16, 32, 64) of 3×3 kernels, enough at 32–64 px. The paper runs 3000 steps at
224 px; the default here is 300 steps, sized for a CPU at 32–64 px: pass ``steps=3000`` for the paper's budget.
The score is the per-channel MSE between the inverted and the original image in [0, 1],
``mse_c = mean over pixels (x̂_c − x_c)²`` for c in R, G, B, and their mean, the "colour error". The paper's
LPIPS score needs pretrained VGG/AlexNet weights and is not computed.

All three run the backbone in eval mode (BatchNorm running statistics) and restore the caller's mode and
``requires_grad`` flags; (a) and (b) run under ``no_grad``; (c) back-propagates through the frozen backbone.

Usage::

    enc = load_encoder("runs/simclr")
    sens = sensitivity(enc, val.images[:256])             # {"colour": 0.41, "spatial": 0.63, ...}
    sal = saliency(enc, val.images[:8])                    # {"attentive_diffusion": 38.2, "maps": [...], ...}
    inv = inversion(enc, val.images[0], steps=3000)        # {"colour_error": 0.021, "inverted_png": ..., ...}
"""

from __future__ import annotations

import base64
import io
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones.base import PRE_LOGITS
from selfsup.errors import UserError
from selfsup.evaluate.features import Encoder
from selfsup.views.augment import hflip, normalize, random_resized_crop, rotate90, to_float
from selfsup.views.color import color_jitter, random_grayscale
from selfsup.views.patches import standardize_patches

__all__ = [
    "COLOUR",
    "SPATIAL",
    "attentive_diffusion",
    "channel_mse",
    "inversion",
    "mask_size",
    "rrse",
    "saliency",
    "sensitivity",
]

# --------------------------------------------------------------------------- shared plumbing


def _as_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise UserError(f"{what} must be uint8 N×H×W×3 (or one H×W×3 image), got {arr.dtype} {arr.shape}")
    if len(arr) == 0:
        raise UserError(f"{what} is empty")
    return arr


def _to_input(images: np.ndarray, resolution: int | None, device: str | torch.device) -> Tensor:
    """uint8 N×H×W×3 → float N×3×S×S in [0, 1] on ``device``, resized as ``features.encode`` does (bicubic)."""
    x = to_float(torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2)).contiguous()
    if resolution and tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 1)
    return x


def _prepare(encoder: Encoder, x: Tensor) -> Tensor:
    """[0, 1] images → the backbone's input: per-image standardisation or the encoder's mean/std."""
    return standardize_patches(x) if encoder.standardize else normalize(x, encoder.mean, encoder.std)


@contextmanager
def _frozen(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; the caller's mode and flags come back after."""
    training = net.training
    flags = [p.requires_grad for p in net.parameters()]
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield net
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        net.train(training)


def _flat(t: Tensor) -> Tensor:
    return t.float().flatten(1)


@torch.no_grad()
def _features(encoder: Encoder, x: Tensor, tap: str, batch_size: int) -> Tensor:
    """Flattened ``tap`` features of [0, 1] images, in float32 on the CPU (the backbone must already be in eval)."""
    out = [_flat(encoder.backbone(_prepare(encoder, x[i:i + batch_size]), taps=(tap,))[tap]).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one named stream of draws: a function of (seed, name) only."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


# --------------------------------------------------------------------------- (a) colour vs spatial sensitivity

Perturbation = Callable[[Tensor, torch.Generator], Tensor]

#: Colour perturbations: SimCLR's colour ops at strength 1 (Chen et al. 2020, App. A), one at a time, always on.
COLOUR: dict[str, Perturbation] = {
    "hue": lambda x, g: color_jitter(x, hue=0.2, p=1.0, g=g),
    "saturation": lambda x, g: color_jitter(x, saturation=0.8, p=1.0, g=g),
    "grayscale": lambda x, g: random_grayscale(x, p=1.0, g=g),
}

#: Spatial perturbations: the Inception crop (no flip), a horizontal flip, a rotation by 90°, 180° or 270°.
SPATIAL: dict[str, Perturbation] = {
    "crop": lambda x, g: random_resized_crop(x, x.shape[-1], scale=(0.08, 1.0), flip_p=0.0, g=g),
    "flip": lambda x, g: hflip(x, p=1.0, g=g),
    "rotate90": lambda x, g: rotate90(x, torch.randint(1, 4, (x.shape[0],), generator=g)),
}


def _derangement(n: int, g: torch.Generator) -> Tensor:
    """partner[i] ≠ i for every i: each image meets the next one along a random permutation (a cycle)."""
    perm = torch.randperm(n, generator=g)
    partner = torch.empty(n, dtype=torch.long)
    partner[perm] = perm.roll(-1)
    return partner


def sensitivity(encoder: Encoder, images: np.ndarray, seed: int = 0, tap: str = PRE_LOGITS,
                colour: Sequence[str] = tuple(COLOUR), spatial: Sequence[str] = tuple(SPATIAL),
                resolution: int | None = None, device: str | torch.device = "cpu", batch_size: int = 256) -> dict:
    """How far colour and spatial perturbations move the features, relative to the distance between two images.

    Ericsson et al. 2021, §4.8 (colour fidelity of inversions, Fig. 4 middle) asks whether self-supervised features
    drop colour; this measures it on the features themselves (module docstring, (a)):
    ``s(t) = mean_i ‖f(x_i) − f(t_i(x_i))‖ / mean_i ‖f(x_i) − f(x_π(i))‖``, 1.0 = as different as another image.

    Returns ``{"colour": mean s over colour ops, "spatial": mean s over spatial ops, "colour_to_spatial": their
    ratio (None if spatial is 0), "per_perturbation": {name: s}, "distances": {name: D(t)}, "pair_distance":
    D_pair, "tap", "n_images", "seed", "size"}``; the normalised values are None when D_pair is 0. Images must be
    square (``rotate90``; pass ``resolution``). Deterministic in (weights, images, seed, batch_size).
    """
    arr = _as_images(images)
    if len(arr) < 2:
        raise UserError("sensitivity needs at least 2 images (the baseline pairs different images)")
    unknown = [n for n in colour if n not in COLOUR] + [n for n in spatial if n not in SPATIAL]
    if unknown or not colour or not spatial:
        raise UserError(f"unknown or missing perturbations {unknown}; colour ⊆ {list(COLOUR)}, "
                        f"spatial ⊆ {list(SPATIAL)}, one of each at least")
    net = encoder.backbone.to(device)
    x = _to_input(arr, resolution, device)
    ops = {**{n: COLOUR[n] for n in colour}, **{n: SPATIAL[n] for n in spatial}}
    with _frozen(net), torch.no_grad():
        f = _features(encoder, x, tap, batch_size)
        pair = (f - f[_derangement(len(f), _generator(seed, "pairs"))]).norm(dim=1).mean().item()
        distances = {}
        for name, op in ops.items():
            g = _generator(seed, name)
            moved = torch.cat([op(x[i:i + batch_size], g) for i in range(0, len(x), batch_size)])
            distances[name] = (f - _features(encoder, moved, tap, batch_size)).norm(dim=1).mean().item()
    if pair == 0:  # every image has the same features (a dead encoder): nothing to normalise by
        per: dict[str, float | None] = dict.fromkeys(distances)
        c = s = None
    else:
        per = {name: d / pair for name, d in distances.items()}
        c = float(np.mean([per[n] for n in colour]))
        s = float(np.mean([per[n] for n in spatial]))
    return {"colour": c, "spatial": s, "colour_to_spatial": c / s if c is not None and s else None,
            "per_perturbation": per,
            "distances": distances, "pair_distance": pair, "tap": tap, "n_images": len(arr), "seed": seed,
            "size": int(x.shape[-1])}


# --------------------------------------------------------------------------- (b) occlusion saliency


def mask_size(side: int) -> int:
    """The paper's 10×10 mask at 224 px, scaled to an input side: ``max(1, round(10·side/224))``."""
    return max(1, int(round(10 * side / 224)))


def rrse(clean: Tensor, occluded: Tensor, eps: float = 1e-12) -> Tensor:
    """Root relative squared error of each row of ``occluded`` (B×D) against one clean feature vector (D or 1×D):
    ``sqrt(Σ_d (f̃_d − f_d)² / Σ_d (f_d − mean(f))²)`` (Ericsson et al. 2021, App. A.9)."""
    clean = clean.reshape(1, -1).float()
    spread = ((clean - clean.mean()) ** 2).sum().clamp(min=eps)
    return (((occluded.float() - clean) ** 2).sum(1) / spread).sqrt()


def attentive_diffusion(saliency_map: Tensor | np.ndarray | Sequence) -> float:
    """Percentage of a map's cells strictly above the map's mean (Ericsson et al. 2021, §4.9, Fig. 4 right)."""
    m = torch.as_tensor(np.asarray(saliency_map, dtype=np.float64))
    return 100.0 * (m > m.mean()).double().mean().item()


def _placements(side: int, mask: int, stride: int) -> Tensor:
    """Top-left corners of the masks along one axis: −(mask−1), −(mask−1)+stride, … < side (masks clipped)."""
    return torch.arange(-(mask - 1), side, stride)


def _occlusion_map(encoder: Encoder, x: Tensor, clean: Tensor, tap: str, mask: int, stride: int,
                   fill: Tensor, batch_size: int) -> Tensor:
    """S×S saliency of one [0, 1] image (1×3×S×S): at each pixel, the mean RRSE of the placements covering it."""
    side = x.shape[-1]
    pos = _placements(side, mask, stride).to(x.device)
    tops, lefts = (t.reshape(-1) for t in torch.meshgrid(pos, pos, indexing="ij"))
    coords = torch.arange(side, device=x.device)
    total = torch.zeros(side, side, device=x.device)
    count = torch.zeros(side, side, device=x.device)
    for i in range(0, len(tops), batch_size):
        t, left = tops[i:i + batch_size, None], lefts[i:i + batch_size, None]
        rows = (coords >= t) & (coords < t + mask)        # B×S
        cols = (coords >= left) & (coords < left + mask)  # B×S
        m = (rows[:, :, None] & cols[:, None, :]).to(x.dtype)[:, None]  # B×1×S×S
        occluded = x * (1 - m) + fill * m
        feats = _flat(encoder.backbone(_prepare(encoder, occluded), taps=(tap,))[tap])
        score = rrse(clean.to(feats.device), feats)
        total += (score.view(-1, 1, 1, 1) * m).sum((0, 1))
        count += m.sum((0, 1))
    return (total / count.clamp(min=1)).cpu()


def saliency(encoder: Encoder, images: np.ndarray, mask: int | None = None, stride: int = 1,
             tap: str = PRE_LOGITS, n_maps: int = 4, map_size: int = 32, resolution: int | None = None,
             device: str | torch.device = "cpu", batch_size: int = 256) -> dict:
    """Task-agnostic occlusion saliency and attentive diffusion (Ericsson et al. 2021, §4.9 and App. A.9).

    A ``mask``×``mask`` square of the encoder's mean colour slides over each image with ``stride`` (default: the
    paper's 10 px at 224 scaled to the input, ``mask_size``; stride 1 as the paper); each placement scores the
    RRSE between the ``tap`` features of the clean and occluded image; a pixel's saliency is the mean score of the
    placements covering it (module docstring, (b)). Cost: ((S + mask − 1)/stride)² forward passes an image.

    Returns ``{"attentive_diffusion": mean % of cells above their map's mean, "per_image": [% per image],
    "maps": the first ``n_maps`` maps, average-pooled to at most ``map_size``² and rounded to 5 significant
    digits, as nested lists, "mask", "stride", "size", "tap", "score": "rrse"}``.
    """
    arr = _as_images(images)
    net = encoder.backbone.to(device)
    x = _to_input(arr, resolution, device)
    side = x.shape[-1]
    if x.shape[-2] != side:
        raise UserError(f"saliency needs square images, got {tuple(x.shape[-2:])}; pass resolution=")
    mask = mask_size(side) if mask is None else int(mask)
    if not 1 <= mask <= side or stride < 1:
        raise UserError(f"need 1 ≤ mask ≤ {side} and stride ≥ 1, got mask={mask}, stride={stride}")
    fill = torch.tensor(encoder.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    maps, per_image = [], []
    with _frozen(net), torch.no_grad():
        clean = _features(encoder, x, tap, batch_size)
        for i in range(len(x)):
            smap = _occlusion_map(encoder, x[i:i + 1], clean[i], tap, mask, stride, fill, batch_size)
            per_image.append(attentive_diffusion(smap))
            if len(maps) < n_maps:
                small = F.adaptive_avg_pool2d(smap[None, None], min(side, map_size))[0, 0]
                maps.append([[float(f"{v:.5g}") for v in row] for row in small.tolist()])
    return {"attentive_diffusion": float(np.mean(per_image)), "per_image": per_image, "maps": maps,
            "mask": mask, "stride": stride, "size": side, "tap": tap, "score": "rrse"}


# --------------------------------------------------------------------------- (c) deep-image-prior inversion


def _block(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]


class _Level(nn.Module):
    """One level of the hourglass: a 4-channel skip at this resolution, and down → deeper → up, concatenated."""

    def __init__(self, cin: int, channels: Sequence[int], skip: int) -> None:
        super().__init__()
        c = channels[0]
        self.skip = nn.Sequential(*_block(cin, skip, 1))
        self.down = nn.Sequential(*_block(cin, c), nn.AvgPool2d(2), *_block(c, c))
        self.deeper = _Level(c, channels[1:], skip) if len(channels) > 1 else None
        up_in = skip + (channels[1] if len(channels) > 1 else c)
        self.up = nn.Sequential(nn.BatchNorm2d(up_in), *_block(up_in, c), *_block(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(x)
        if self.deeper is not None:
            y = self.deeper(y)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        return self.up(torch.cat((self.skip(x), y), 1))


class DeepImagePrior(nn.Module):
    """A small "skip" encoder-decoder of Ulyanov et al.'s deep image prior: noise (B×depth×S×S) → image in [0, 1]."""

    def __init__(self, depth: int = 32, channels: Sequence[int] = (16, 32, 64), skip: int = 4) -> None:
        super().__init__()
        self.levels = len(channels)
        self.body = _Level(depth, list(channels), skip)
        self.head = nn.Conv2d(channels[0], 3, 1)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.body(z)))


def channel_mse(inverted: Tensor | np.ndarray, original: Tensor | np.ndarray) -> list[float]:
    """Per-channel MSE of two channel-last images (…×H×W×3) with values in [0, 1]: ``[mse_R, mse_G, mse_B]``,
    ``mse_c = mean over pixels (x̂_c − x_c)²`` (Ericsson et al. 2021, §4.8, Fig. 4 middle)."""
    a = np.asarray(inverted, dtype=np.float64)
    b = np.asarray(original, dtype=np.float64)
    if a.shape != b.shape or a.shape[-1] != 3:
        raise UserError(f"need two channel-last images of one shape, got {a.shape} and {b.shape}")
    return [float(v) for v in ((a - b) ** 2).reshape(-1, 3).mean(0)]


def _png(x01: Tensor) -> str:
    """3×H×W in [0, 1] → base64 PNG (for ``<img src="data:image/png;base64,...">``)."""
    from PIL import Image

    arr = (x01.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def inversion(encoder: Encoder, image: np.ndarray, steps: int = 300, lr: float = 1e-3, tap: str = "block4",
              seed: int = 0, resolution: int | None = None, device: str | torch.device = "cpu",
              noise_depth: int = 32, channels: Sequence[int] = (16, 32, 64), skip: int = 4,
              curve_points: int = 20) -> dict:
    """Deep-image-prior inversion of the last feature map (Ericsson et al. 2021, §4.8 and App. A.8).

    A fresh :class:`DeepImagePrior` g_θ (weights and noise z seeded by ``seed``) is trained with Adam (``lr``
    1e-3, the paper's) for ``steps`` steps (paper: 3000 at 224 px; default 300 for a CPU at 32–64 px) to minimise
    ``MSE(tap(g_θ(z)), tap(x))`` through the frozen backbone in eval mode (``tap`` = "block4", the paper's layer 4).

    Returns ``{"colour_error": mean of the three, "channel_mse": [R, G, B], "loss_initial", "loss_final",
    "loss_curve": [[step, loss], ...] (about ``curve_points`` points, the last one at ``steps``), "steps", "lr",
    "tap", "seed", "size", "inverted_png", "original_png"}``; the PNGs are base64 strings of the inverted image and
    of the original as the backbone saw it. ``loss_final`` is measured on the returned image.
    """
    arr = _as_images(image, "image")
    if len(arr) != 1:
        raise UserError(f"inversion inverts one image at a time, got {len(arr)}")
    if steps < 1:
        raise UserError(f"steps must be ≥ 1, got {steps}")
    net = encoder.backbone.to(device)
    x = _to_input(arr, resolution, device)
    h, w = x.shape[-2:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:dip".encode()))
        gen = DeepImagePrior(noise_depth, channels, skip)
    gen = gen.to(device).train()
    unit = 2 ** gen.levels
    side_h, side_w = math.ceil(h / unit) * unit, math.ceil(w / unit) * unit
    z = (0.1 * torch.rand(1, noise_depth, side_h, side_w, generator=_generator(seed, "noise"))).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    every = max(1, steps // max(1, curve_points))
    curve: list[list[float]] = []
    with _frozen(net):
        with torch.no_grad():
            target = net(_prepare(encoder, x), taps=(tap,))[tap].float()
        for step in range(steps):
            out = gen(z)[..., :h, :w]
            loss = F.mse_loss(net(_prepare(encoder, out), taps=(tap,))[tap].float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % every == 0:
                curve.append([step, loss.item()])
        with torch.no_grad():
            out = gen(z)[..., :h, :w].detach()  # as trained: BatchNorm on batch statistics, as the DIP code
            final = F.mse_loss(net(_prepare(encoder, out), taps=(tap,))[tap].float(), target).item()
    curve.append([steps, final])
    per_channel = channel_mse(out[0].permute(1, 2, 0).cpu().numpy(), x[0].permute(1, 2, 0).cpu().numpy())
    return {"colour_error": float(np.mean(per_channel)), "channel_mse": per_channel, "loss_initial": curve[0][1],
            "loss_final": final, "loss_curve": curve, "steps": steps, "lr": lr, "tap": tap, "seed": seed,
            "size": int(h), "inverted_png": _png(out[0]), "original_png": _png(x[0])}
