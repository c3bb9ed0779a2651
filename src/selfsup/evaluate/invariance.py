"""PIRL's invariance analysis: how far a representation moves when the pretext transformation t is applied.

Misra & van der Maaten 2020 (CVPR, §4.1 "Analyzing PIRL Representations", paragraph "Does PIRL learn
invariant representations?", Figure 4; Figure 3 is the method overview, §4.3 the other pretext tasks): "we normalize the
representations to have unit norm and compute l2 distances between the (normalized) representation of image,
f(v_I), and the (normalized) representation its transformed version, g(v_I^t)", for "a large set of images"
(we pass a held-out split), one histogram per model. PIRL's distances are small; Jigsaw's have "a much larger
mean and variance". So the compared features are PIRL's two 128-d *heads* (supplementary A.1): f = pooled
res5 of the image → linear 128, g = pooled res5 of each of the nine tiles → linear 128 → concatenated in the
shuffled order → linear 128; not the res5 features themselves.

    d(I, t) = ‖ f(v_I)/‖f(v_I)‖ − g(v_I^t)/‖g(v_I^t)‖ ‖₂  ∈ [0, 2]                  (``unit_distances``)

Choices, where the paper is silent:

- **Which t, which views.** t is the model's own pretext transformation, drawn from its own T, and nothing
  else: the analysis asks about invariance to t, not to the photometric augmentation (an invariance NPID++
  has too). PIRL: a random resized crop of ≥ 60 % of the image, the 3×3 grid, a random patch per cell and a
  uniformly random permutation of all 9! (supplementary A.1, ``views.pirl_views`` geometry). The revisiting
  Jigsaw: its training geometry (``views.patches.patch_geometry``), a permutation from its 100-element
  maximal-Hamming T and per-tile standardisation. No colour jitter, grey or flip. The untransformed image I
  is the whole image at the training size, normalised as evaluation does (``features.encode``).
- **The covariant baseline.** The Jigsaw network has no f or g, so we have to say what they are.
  ``representation="trunk"`` (the default for Jigsaw) uses the layer PIRL's heads read from and the one every
  evaluation of Jigsaw uses (Table 2, Figure 5): f = pooled res5 (``pre_logits``) of the whole image,
  g = the mean over the nine tiles of t(I) of their pooled res5, the patch-model representation of
  Kolesnikov et al.'s evaluation (``features.encode(view="tiles")``). This is the reading closest to the
  paper's wording ("Jigsaw representations", res5 features that "covary with the image transformation"), but
  the mean does not depend on the order of the tiles, so it measures the crop-and-tile part of t only.
  ``representation="head"`` isolates the shuffle: f and g are the Jigsaw head's fc7 activations (after
  BN + ReLU, eval mode) for the same nine tile embeddings concatenated in their original order and in the
  order t, which is the place where the Jigsaw network represents the permutation. PIRL's ``"trunk"`` mode
  applies the Jigsaw default to a PIRL network, so both models can be compared on one footing as well.
- **BN statistics.** ``bn="running"`` (the default): evaluation mode, as every probe. ``bn="batch"``: each
  pass (the images, then the tiles) is normalised by its own batch's statistics, as in training; the running
  statistics are left as they were. PIRL (as VISSL's) sends images and tiles through the same BN layers in
  separate passes, so its running statistics average two input distributions; at small sizes (32 px images,
  9 px tiles) they fit neither, and ``"running"`` then measures that mismatch as much as the invariance (our
  CPU study's PIRL: mean distance 1.51 with running statistics, 1.07 with batch ones; docs/REPRODUCTIONS.md).
- No gradients, batched; the model's ``training`` flag is restored afterwards. The draws come from one CPU
  generator seeded with ``seed`` and consumed batch by batch, so the distances are a function of (weights,
  images, seed, batch_size).

Usage::

    d = invariance_distances("runs/pirl", val.images, seed=0)        # a run directory or a Method
    row_extra = {"mean": d.mean().item(), **histogram(d, bins=50)}   # counts and edges as lists
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import UserError
from selfsup.methods.base import Method
from selfsup.methods.jigsaw import Jigsaw
from selfsup.methods.pirl import PIRL
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, resized_crop, sample_crop_boxes, to_float
from selfsup.views.patches import GRID, extract_patches, patch_geometry, standardize_patches
from selfsup.views.permutations import permute_tiles
from selfsup.views.pirl_views import pirl_geometry

REPRESENTATIONS = {"pirl": ("heads", "trunk"), "jigsaw": ("trunk", "head")}
BN_MODES = ("running", "batch")


def unit_distances(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ‖a/‖a‖ − b/‖b‖‖₂ of two B × D tensors, in float32 (a zero row stays zero, as F.normalize)."""
    return (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).norm(dim=1)


def histogram(distances: Tensor | np.ndarray, bins: int = 50, range: tuple[float, float] = (0.0, 2.0)) -> dict:
    """``numpy.histogram`` of the distances as JSON-ready lists: {"counts": [...], "edges": [...]}, bins + 1
    edges. The default range [0, 2] holds every distance between unit vectors."""
    counts, edges = np.histogram(np.asarray(distances, dtype=np.float64), bins=bins, range=range)
    return {"counts": [float(c) for c in counts], "edges": [float(e) for e in edges]}


# --------------------------------------------------------------------------- loading
def load_method(path: str | Path) -> Method:
    """The whole pretraining Method (backbone and heads) of a run directory's latest checkpoint, or of one
    ``checkpoints/step-*`` directory, as ``features._from_checkpoint`` rebuilds the backbone alone."""
    import yaml

    from selfsup import methods
    from selfsup.evaluate.features import _build
    from selfsup.train import checkpoint

    path = Path(path)
    run = path.parent.parent if path.name.startswith("step-") else path
    ckpt = path if path.name.startswith("step-") else checkpoint.latest(run)
    if ckpt is None or not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{path} holds no selfsup checkpoint (expected config.yaml and checkpoints/step-*); "
                                f"the invariance analysis needs the method's heads, which backbone.safetensors lacks")
    with open(run / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    state = checkpoint.load_model_state(ckpt)
    # a memory bank's size is |D| of the pretraining set; the heads do not depend on it
    shard = state.get("bank.shard")
    num_images = int(shard[2]) if shard is not None else 2
    method = methods.build(cfg["method"]["name"], _build(cfg["backbone"]), cfg["method"], num_images)
    method.load_state_dict(state)
    return method.eval()


# --------------------------------------------------------------------------- the transformation t
def _random_perms(batch: int, g: torch.Generator) -> Tensor:
    return torch.rand(batch, GRID * GRID, generator=g).argsort(1)   # uniform over all 9! orders


def pirl_tiles(x: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """PIRL's jigsaw t without its photometric augmentation: [0, 1] floats B×C×H×W → (tiles B×9×C×p×p in the
    shuffled order and ImageNet-normalised, perms B×9), cut as ``views.pirl_views.jigsaw_view`` cuts them."""
    geom = pirl_geometry(size)
    crop = resized_crop(x, sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, g=g), geom.crop)
    tiles = extract_patches(crop, replace(geom, resize=geom.crop), g)
    perms = _random_perms(x.shape[0], g)
    tiles = permute_tiles(tiles, perms)
    return normalize(tiles.flatten(0, 1), IMAGENET_MEAN, IMAGENET_STD).view_as(tiles), perms


def jigsaw_tiles(x: Tensor, size: int, permutations: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The revisiting Jigsaw's t without grey: its training patches (``patch_geometry``), unshuffled, and a
    permutation per image drawn uniformly from its set T (B×9)."""
    patches = standardize_patches(extract_patches(x, patch_geometry(size), g))
    pick = torch.randint(0, len(permutations), (x.shape[0],), generator=g)
    return patches, permutations.cpu()[pick]


# --------------------------------------------------------------------------- f and g of each model
def _at_size(x: Tensor, size: int) -> Tensor:
    """The whole image at the training size, resized as ``features.encode`` does (bicubic, antialiased)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


def _pooled(backbone, x: Tensor) -> Tensor:
    return backbone(x)["pre_logits"].float()


def _tile_mean(backbone, tiles: Tensor) -> Tensor:
    """Mean over the nine tiles of their pooled features (order-free): B×9×C×p×p → B×D."""
    return _pooled(backbone, tiles.flatten(0, 1)).view(*tiles.shape[:2], -1).mean(1)


def pirl_pair(method: PIRL, images: Tensor, g: torch.Generator, representation: str = "heads") -> tuple[Tensor, Tensor]:
    """(f(v_I), g(v_I^t)) of a uint8 batch B×3×H×W: the 128-d heads (the paper's Figure 4) or, with
    ``representation="trunk"``, pooled features of the image and the mean over the tiles of t(I)."""
    if not method.jigsaw:
        raise UserError(f"the PIRL model was trained with transform={method.cfg.transform!r}; this analysis "
                        f"applies its jigsaw transformation")
    size = method.cfg.size or images.shape[-1]
    x = to_float(images)
    tiles, _ = pirl_tiles(x, size, tuple(method.cfg.jigsaw_scale), g)
    image = normalize(_at_size(x, size), IMAGENET_MEAN, IMAGENET_STD)
    if representation == "trunk":
        return _pooled(method.backbone, image), _tile_mean(method.backbone, tiles)
    return method.embed(image), method.jigsaw_embedding(tiles)


def jigsaw_pair(method: Jigsaw, images: Tensor, g: torch.Generator, representation: str = "trunk"
                ) -> tuple[Tensor, Tensor]:
    """(f, g) of the covariant Jigsaw model (see the module docstring): ``"trunk"`` = pooled features of the
    whole image vs the mean over the tiles of t(I); ``"head"`` = fc7 of the tiles in their own order vs in
    the order t."""
    size = method.cfg.size or images.shape[-1]
    x = to_float(images)
    tiles, perms = jigsaw_tiles(x, size, method.permutations, g)
    if representation == "trunk":
        return _pooled(method.backbone, standardize_patches(_at_size(x, size))), _tile_mean(method.backbone, tiles)
    e = method.embed(_pooled(method.backbone, tiles.flatten(0, 1))).view(*tiles.shape[:2], -1)    # B×9×E
    fc7 = method.head[:3]                     # Linear → BN → ReLU: the hidden layer that encodes the order
    return fc7(e.flatten(1)), fc7(permute_tiles(e, perms).flatten(1))


_PAIRS: dict[str, Callable] = {"pirl": pirl_pair, "jigsaw": jigsaw_pair}


@torch.no_grad()
def invariance_pairs(model: Method | str | Path, images: np.ndarray, seed: int = 0, batch_size: int = 256,
                     representation: str | None = None, device: str | torch.device = "cpu",
                     bn: str = "running") -> tuple[Tensor, Tensor]:
    """(f(v_I), g(v_I^t)), each N × D, unit-normalised float32 on the CPU, of uint8 N×H×W×3 images under one random
    t each, for a PIRL or Jigsaw model (a Method, or a run directory / checkpoint to load)."""
    method = model if isinstance(model, Method) else load_method(model)
    if method.name not in _PAIRS:
        raise UserError(f"the invariance analysis is defined for {', '.join(_PAIRS)}, not {method.name!r}")
    representation = representation or REPRESENTATIONS[method.name][0]
    if representation not in REPRESENTATIONS[method.name]:
        raise UserError(f"representation={representation!r} is not one of {REPRESENTATIONS[method.name]} "
                        f"for {method.name}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"images must be uint8 N×H×W×3, got {images.dtype} {tuple(images.shape)}")
    if bn not in BN_MODES:
        raise UserError(f"bn={bn!r} is not one of {', '.join(BN_MODES)}")
    was_training = method.training
    method.to(device).train(bn == "batch")
    kept = {name: buf.clone() for name, buf in method.named_buffers() if "running_" in name or "num_batches" in name}
    g = torch.Generator().manual_seed(seed)
    fs, gs = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start:start + batch_size])).to(device).permute(0, 3, 1, 2)
            f, gt = _PAIRS[method.name](method, x, g, representation)
            fs.append(F.normalize(f.float(), dim=1).cpu())
            gs.append(F.normalize(gt.float(), dim=1).cpu())
    finally:
        method.train(was_training)
        for name, buf in method.named_buffers():   # batch-statistics passes must not move the running ones
            if name in kept:
                buf.copy_(kept[name])
    if not fs:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(fs), torch.cat(gs)


def invariance_distances(model: Method | str | Path, images: np.ndarray, seed: int = 0, batch_size: int = 256,
                         representation: str | None = None, device: str | torch.device = "cpu",
                         bn: str = "running") -> Tensor:
    """Per-image ‖f̂(v_I) − ĝ(v_I^t)‖₂ (``unit_distances`` of ``invariance_pairs``): a 1-D float32 CPU tensor of N."""
    f, g = invariance_pairs(model, images, seed, batch_size, representation, device, bn)
    return unit_distances(f, g) if len(f) else torch.empty(0)
