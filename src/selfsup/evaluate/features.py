"""Encoders and their cached features.

An ``Encoder`` is a backbone with the input normalisation it was trained with and a hash of its
weights. ``features`` encodes a dataset split once per (weights, dataset, split, tap, resolution)
and caches the result in safetensors under ``$SELFSUP_HOME/cache/features``: every protocol after the
first reads the cache, so evaluation never re-encodes an image it has already encoded.

Preprocessing is Ericsson et al. 2021's for frozen protocols: the (square, cached) image is resized
to the evaluation resolution with bicubic interpolation, no augmentation. Feature-map taps are pooled
to at most ~9,000 features as Kolesnikov et al.'s layer-wise evaluation does (``pool_to_dims``), and
all requested taps come from one forward pass.

Views (``view``): ``"image"`` feeds the whole image, the representation of every model in Kolesnikov et
al. 2019's main study, patch-trained ones included. ``"tiles"`` is their evaluation of patch models
against prior work (``config/evaluation/jigsaw_or_relative_patch_location.sh``): the nine un-jittered
eval tiles of ``views.patches.eval_patches`` go through the backbone one by one, each tap of each tile
is pooled, and the nine are averaged (``combine_patches avg_pool`` in their ``patch_utils``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from selfsup import backbones
from selfsup.backbones.base import Backbone
from selfsup.config import BackboneConfig, config_hash
from selfsup.data import ImageSet
from selfsup.errors import UserError
from selfsup.paths import cache_dir
from selfsup.train.checkpoint import load_into, read_safetensors
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float
from selfsup.views.patches import eval_patches, standardize_patches


@dataclass
class Encoder:
    backbone: Backbone
    label: str                 # what tables call the model
    weights_hash: str          # identifies the weights, so a retrained model is a new model
    mean: tuple[float, ...]
    std: tuple[float, ...]
    standardize: bool = False  # per-image standardisation instead of mean/std (patch-trained models)
    architecture: dict | None = None  # the BackboneConfig fields it was built from (for ``random_copy``)


def weights_hash(path: Path) -> str:
    """A hash of a safetensors file's tensors (names, dtypes, shapes, bytes) and metadata, in sorted order.
    Not of the file's bytes: safetensors writes its metadata map in no fixed order, so re-exporting the same
    weights (a finished run re-run, say) gave a new file hash, hence a "new model" and recomputed figures."""
    digest = hashlib.sha256()
    with safe_open(path, "pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _build(cfg: dict) -> Backbone:
    bb = BackboneConfig(**cfg)
    return backbones.build(bb.name, width=bb.width, cifar_stem=bb.cifar_stem, **bb.options)


def random_encoder(backbone: BackboneConfig, seed: int = 0, label: str | None = None) -> Encoder:
    """A randomly initialised copy of an architecture: the floor every pretrained model must beat."""
    torch.manual_seed(seed)
    cfg = asdict(backbone)
    net = _build(cfg)
    return Encoder(net, label or f"random-init {backbone.name}", "random-" + config_hash({**cfg, "seed": seed}),
                   IMAGENET_MEAN, IMAGENET_STD, architecture=cfg)


def random_copy(encoder: Encoder, seed: int = 0) -> Encoder:
    """A randomly initialised copy of ``encoder``'s backbone, fed the same input normalisation: the
    baseline a pretrained model must beat, probed exactly as the model itself."""
    if encoder.architecture is None:
        raise UserError(f"{encoder.label}: its architecture is unknown, so it has no random-init copy")
    copy = random_encoder(BackboneConfig(**encoder.architecture), seed, label=f"random-init {encoder.label}")
    return Encoder(copy.backbone, copy.label, copy.weights_hash, encoder.mean, encoder.std, encoder.standardize,
                   encoder.architecture)


def load_encoder(path: str | Path, label: str | None = None) -> Encoder:
    """Load a run directory (its exported ``backbone.safetensors``, else its latest checkpoint), or a
    ``.safetensors`` backbone written by selfsup. Weights are read with safetensors: nothing unpickles."""
    path = Path(path)
    if path.is_dir() and (path / "backbone.safetensors").exists():
        return load_encoder(path / "backbone.safetensors", label or path.name)
    if path.is_dir():
        return _from_checkpoint(path, label)
    if path.suffix != ".safetensors" or not path.exists():
        raise FileNotFoundError(f"{path} is neither a run directory nor a .safetensors backbone; pass the --out "
                                f"directory of `selfsup pretrain` or its backbone.safetensors")
    state, meta = read_safetensors(path)
    if "backbone" not in meta:
        raise UserError(f"{path} has no 'backbone' metadata: it was not written by selfsup. Convert it first "
                        f"(a state_dict of a selfsup backbone plus metadata {{'backbone': json}}).")
    architecture = json.loads(meta["backbone"])
    net = _build(architecture)
    load_into(net, state, path, f"its recorded architecture {architecture}")
    mean = tuple(json.loads(meta.get("mean", json.dumps(IMAGENET_MEAN))))
    std = tuple(json.loads(meta.get("std", json.dumps(IMAGENET_STD))))
    standardize = json.loads(meta.get("standardize", "false"))
    name = label or (path.parent.name if path.name == "backbone.safetensors" else path.stem)
    return Encoder(net, name, weights_hash(path), mean, std, standardize, architecture)


def _from_checkpoint(path: Path, label: str | None) -> Encoder:
    """An unfinished run: the backbone part of its latest checkpoint (``step-*/model.safetensors``)."""
    import yaml

    from selfsup import methods
    from selfsup.train import checkpoint

    run = path.parent.parent if path.name.startswith("step-") else path
    ckpt = path if path.name.startswith("step-") else checkpoint.latest(run)
    if ckpt is None or not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{path} holds no selfsup checkpoint (expected config.yaml and checkpoints/step-*)")
    with open(run / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    net = _build(cfg["backbone"])
    state = checkpoint.load_model_state(ckpt)
    load_into(net, {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}, ckpt,
              f"the backbone of {run / 'config.yaml'} ({cfg['backbone']})")
    mean, std, standardize = methods.input_normalization(cfg["method"])
    return Encoder(net, label or f"{run.name}@{ckpt.name}", weights_hash(ckpt / "model.safetensors"), mean, std,
                   standardize, cfg["backbone"])


MAX_DIMS = 9000  # Kolesnikov et al.'s layer-wise heads: each tap pooled to at most ~9,000 features
VIEWS = ("image", "tiles")


def pool_to_dims(fmap: torch.Tensor, max_dims: int = MAX_DIMS, mode: str = "max") -> torch.Tensor:
    """Flatten a B×C×H×W tap to at most ~``max_dims`` features, as Kolesnikov et al.'s evaluation code
    (``utils.adaptive_pool``, ``pool_mode max`` in their configs): a map already under ``max_dims`` is
    flattened as is; otherwise ``max``/``avg`` pool with kernel = stride = ceil(sqrt(C·H·W / max_dims)).
    (Their ``adaptive_*`` modes use TF's pseudo-random fractional pooling; with features cached once we
    keep the deterministic ``max``/``avg`` rule.) 2-D inputs (pre-logits) pass through."""
    if fmap.ndim == 2:
        return fmap
    b, c, h, w = fmap.shape
    if c * h * w > max_dims:
        k = min(max(1, math.ceil(math.sqrt(c * h * w / max_dims))), h, w)
        fmap = F.max_pool2d(fmap, k, k) if mode == "max" else F.avg_pool2d(fmap, k, k)
    return fmap.flatten(1)


@torch.no_grad()
def encode(encoder: Encoder, images: np.ndarray, taps: tuple[str, ...] = ("pre_logits",),
           resolution: int | None = None, device: str | torch.device = "cpu", batch_size: int = 256,
           pool: str = "max", max_dims: int = MAX_DIMS, view: str = "image") -> dict[str, torch.Tensor]:
    """Features of uint8 N×H×W×3 images at every tap in ``taps``, in one forward pass per batch: resize
    (bicubic) to ``resolution``, normalise, forward, pool feature maps (``pool_to_dims``). float32 on the CPU.
    ``view="tiles"``: the mean over the nine eval tiles of a patch model trained at this image size."""
    if view not in VIEWS:
        raise UserError(f"view must be one of {VIEWS}, got {view!r}")
    net = encoder.backbone.to(device).eval()
    out: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # a copy: memmaps are read-only
        x = to_float(x.permute(0, 3, 1, 2))
        if resolution and x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
        b = x.shape[0]
        if view == "tiles":  # B×9×C×p×p tiles → a batch of 9B small images
            x = eval_patches(x, x.shape[-1]).flatten(0, 1)
        x = standardize_patches(x) if encoder.standardize else normalize(x, encoder.mean, encoder.std)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            maps = net(x, taps=tuple(taps))
        for tap in taps:
            f = pool_to_dims(maps[tap].float(), max_dims, mode=pool)
            out[tap].append(f.view(b, -1, f.shape[1]).mean(1).cpu())  # the mean over tiles; one "tile" for images
    return {tap: torch.cat(parts) for tap, parts in out.items()}


def _cache_path(encoder: Encoder, data: ImageSet, tap: str, resolution: int | None, pool: str,
                max_dims: int, view: str) -> Path:
    key = config_hash({"weights": encoder.weights_hash, "mean": encoder.mean, "std": encoder.std,
                       "standardize": encoder.standardize,
                       "data": data.name, "split": data.split, "shape": list(data.images.shape), "tap": tap,
                       "resolution": resolution, "pool": pool, "max_dims": max_dims, "version": 2,
                       **({"view": view} if view != "image" else {})})
    return cache_dir("features") / f"{key}.safetensors"


def tap_features(encoder: Encoder, data: ImageSet, taps: tuple[str, ...], resolution: int | None = None,
                 device: str | torch.device = "cpu", pool: str = "max",
                 max_dims: int = MAX_DIMS, view: str = "image") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Cached features of several taps: cached ones are read, the missing ones encoded in a single pass.
    Returns tap -> (features N×D float32, labels N int64)."""
    paths = {tap: _cache_path(encoder, data, tap, resolution, pool, max_dims, view) for tap in taps}
    result = {}
    for tap, path in paths.items():
        if path.exists():
            cached = load_file(str(path))
            result[tap] = (cached["features"], cached["labels"])
    missing = tuple(t for t in taps if t not in result)
    if missing:
        y = torch.tensor(np.asarray(data.labels), dtype=torch.int64)
        encoded = encode(encoder, data.images, missing, resolution, device, pool=pool, max_dims=max_dims, view=view)
        for tap, x in encoded.items():
            tmp = paths[tap].with_suffix(f".tmp{os.getpid()}")
            save_file({"features": x, "labels": y}, str(tmp),
                      metadata={"model": encoder.label, "data": data.name, "split": data.split, "tap": tap})
            tmp.replace(paths[tap])
            result[tap] = (x, y)
    return result


def features(encoder: Encoder, data: ImageSet, tap: str = "pre_logits", resolution: int | None = None,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Cached features of one tap: (features N×D float32, labels N int64)."""
    return tap_features(encoder, data, (tap,), resolution, device)[tap]
