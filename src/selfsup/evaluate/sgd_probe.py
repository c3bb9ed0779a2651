"""The SGD linear probe with augmentation of Kolesnikov, Zhai, Beyer 2019, and its accuracy-against-epoch curve.

Kolesnikov et al., *Revisiting Self-Supervised Visual Representation Learning* (CVPR 2019), §4 "Comparison
to prior work": the linear logistic regression on a frozen network is trained with SGD and data
augmentation, and the paper's schedule study finds it needs very long training (~500 epochs) to converge;
its reported numbers use 520 epochs with ×0.1 decays at epochs 480 and 500 (batch 2048 on TPUs, per the
comment in ``config/evaluation/rotation_or_exemplar.sh``). The public code's config defaults, which are ours:

- frozen backbone, batch-norm in inference mode (``hub.Module`` is not trainable and is called without
  the ``train`` tag);
- ``linear_eval.py``: every tap gets its own plain linear head (1×1 conv with bias over the flattened
  tap, Glorot-uniform kernel, zero bias, L2 ``weight_decay`` on the kernel only, default 0), after the
  tap is max-pooled to at most ~9,000 features (``pool_mode max``; ``features.pool_to_dims``); the loss
  is the sum over taps of each head's mean softmax cross-entropy, so all taps train in one pass;
- ``trainer.py``: momentum 0.9 (TF's momentum = torch's SGD), lr 0.1 × batch/256, batch 512, 70 epochs,
  ×0.1 at epochs 30 and 50 (``--decay_epochs 30,50``), no warmup;
- ``preprocess.py``, ``resize_small,crop`` with smaller_size 256, crop 224: the shorter side is resized
  (``tf.image.resize_area``, aspect kept) to 256, then a random 224 crop per image in training and the
  central one (offset ``(side - 224) // 2``) at test time; no flip. For an evaluation size S (the images'
  own size by default) we keep the 256/224 ratio: shorter side to round(S·256/224), S×S crop.

Then the images are normalised as the encoder expects (``Encoder.mean/std`` or per-image standardisation),
in place of the code's ``-1_to_1``, which was simply what its modules were trained on.

Differences from the code, and why: each epoch is one pass over a fresh seeded permutation and keeps its
last partial batch (their TPU input pipeline repeats the data and counts ``N // batch`` steps an epoch);
the test split, being preprocessed deterministically, is encoded once and its pooled features scored after
every ``eval_every`` epochs, which gives the accuracy-against-epoch curve per tap.

Usage::

    result = sgd_probe(encoder, train.images, train.labels, test.images, test.labels, 10,
                       taps=("block3", "pre_logits"), log=print)
    result["pre_logits"]["value"], result["pre_logits"]["curve"]   # 61.2, [[1, 40.3], [2, 47.9], ...]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import UserError
from selfsup.evaluate.features import MAX_DIMS, Encoder, pool_to_dims
from selfsup.evaluate.metrics import score
from selfsup.views.augment import normalize, to_float
from selfsup.views.patches import crop_patches, standardize_patches

RESIZE, CROP = 256, 224  # the code's --smaller_size and --crop_size: we keep their ratio at any size


@dataclass
class SGDProbeConfig:
    epochs: int = 70                  # the paper's reported runs: 520
    milestones: list = field(default_factory=lambda: [30, 50])  # the paper's reported runs: [480, 500]
    batch_size: int = 512
    lr: float = 0.1                   # × batch/256
    momentum: float = 0.9
    weight_decay: float = 0.0         # L2 on the head's weights (not its bias), as the code's kernel_regularizer
    eval_every: int = 1               # epochs between points of the curve (the last epoch is always scored)
    seed: int = 0


def lr_at(epoch: int, cfg: SGDProbeConfig) -> float:
    """Learning rate during 0-based ``epoch``: lr · batch/256, ×0.1 for every milestone already reached."""
    return cfg.lr * cfg.batch_size / 256 * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``resize_small``: the shorter side to round(size·256/224), the other side scaled alike (TF rounding)."""
    ratio = round(size * RESIZE / CROP) / min(height, width)
    return round(height * ratio), round(width * ratio)


def _area_matrix(n_in: int, n_out: int) -> Tensor:
    """n_out × n_in weights of an exact area resize along one axis: output pixel i averages the input over
    [i·s, (i+1)·s), s = n_in / n_out, each input pixel weighted by its overlap (TF's ``resize_area``)."""
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * s
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    return (torch.minimum(lo + s, j + 1) - torch.maximum(lo, j)).clamp_(min=0) / s


def area_resize(x: Tensor, height: int, width: int) -> Tensor:
    """Area resize of float B×C×H×W (up or down): two small matmuls, exact for any ratio."""
    if x.shape[-2:] == (height, width):
        return x
    ah = _area_matrix(x.shape[-2], height).to(x.device, x.dtype)
    aw = _area_matrix(x.shape[-1], width).to(x.device, x.dtype)
    return ah @ x @ aw.T


def crop_corners(batch: int, height: int, width: int, size: int, g: torch.Generator | None = None) -> Tensor:
    """B × 2 (row, col) corners of size×size crops: uniform over the valid positions with ``g`` (TF's
    ``random_crop``), else central with the code's floor ``(side - size) // 2``."""
    if g is None:
        return torch.tensor([(height - size) // 2, (width - size) // 2]).expand(batch, 2)
    return torch.stack([torch.randint(0, height - size + 1, (batch,), generator=g),
                        torch.randint(0, width - size + 1, (batch,), generator=g)], 1)


def probe_view(encoder: Encoder, images: np.ndarray | Tensor, size: int, device, g: torch.Generator | None = None
               ) -> Tensor:
    """uint8 B×H×W×3 -> the backbone's input: resize_small, a random (``g``) or central size×size crop,
    the encoder's normalisation (as ``features.encode``), channels_last."""
    x = torch.as_tensor(np.array(images)).to(device)  # a copy: memmaps are read-only
    x = area_resize(to_float(x.permute(0, 3, 1, 2)), *resize_shape(x.shape[1], x.shape[2], size))
    x = crop_patches(x, crop_corners(len(x), x.shape[-2], x.shape[-1], size, g)[:, None], size)[:, 0]
    x = standardize_patches(x) if encoder.standardize else normalize(x, encoder.mean, encoder.std)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def _pooled(encoder: Encoder, x: Tensor, taps: Sequence[str], max_dims: int) -> dict[str, Tensor]:
    cuda = x.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
        maps = encoder.backbone(x, taps=tuple(taps))
    return {t: pool_to_dims(maps[t].float(), max_dims) for t in taps}


def _head(dim: int, num_classes: int, g: torch.Generator) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.xavier_uniform_(head.weight, generator=g)  # TF's conv2d default: Glorot-uniform kernel, zero bias
    nn.init.zeros_(head.bias)
    return head


def epoch_line(what: str, done: int, epochs: int, loss: float, lr: float, images: int, seconds: float) -> str:
    """The progress line of an image-level probe after ``done`` epochs of ``images`` each in ``seconds``."""
    return (f"{what} epoch {done}/{epochs} loss {loss:.4f} lr {lr:.4g} {done * images / seconds:.0f} img/s "
            f"ETA {seconds / done * (epochs - done):.0f}s")


def _check(images, labels, split: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{split} images must be uint8 N×H×W×3, got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise UserError(f"{split} has {len(images)} images but {len(labels)} labels")


def sgd_probe(encoder: Encoder, train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels,
              num_classes: int, taps: Sequence[str] = ("pre_logits",), cfg: SGDProbeConfig | None = None,
              metric: str = "top1", size: int | None = None, max_dims: int = MAX_DIMS,
              device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Train a linear head on every tap of the frozen ``encoder`` with augmented SGD; score the test split
    after every ``cfg.eval_every`` epochs. Returns {tap: {"value": final test score, "curve": [[epoch,
    score], ...], "seconds": ...}}; ``size`` is the crop size S (default: the train images' shorter side)."""
    cfg = cfg or SGDProbeConfig()
    _check(train_images, train_labels, "train")
    _check(test_images, test_labels, "test")
    unknown = [t for t in taps if t not in encoder.backbone.taps]
    if unknown:
        raise UserError(f"unknown tap(s) {unknown}; {encoder.label} has: {', '.join(encoder.backbone.taps)}")
    start = time.perf_counter()
    size = size or min(train_images.shape[1:3])
    encoder.backbone.to(device).eval()  # frozen, batch-norm statistics included
    g = torch.Generator().manual_seed(cfg.seed)  # heads, order and crops: the whole run follows from the seed
    ytr = torch.tensor(np.asarray(train_labels), dtype=torch.int64)
    yte = torch.tensor(np.asarray(test_labels), dtype=torch.int64)

    # The test views are deterministic: encode them once (on the CPU, they can be large) for the whole curve.
    parts: dict[str, list[Tensor]] = {t: [] for t in taps}
    for i in range(0, len(test_images), cfg.batch_size):
        for t, f in _pooled(encoder, probe_view(encoder, test_images[i:i + cfg.batch_size], size, device),
                            taps, max_dims).items():
            parts[t].append(f.cpu())
    xte = {t: torch.cat(p) for t, p in parts.items()}

    heads = nn.ModuleDict({t: _head(x.shape[1], num_classes, g) for t, x in xte.items()}).to(device)
    weights = [h.weight for h in heads.values()]
    biases = [h.bias for h in heads.values()]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": cfg.weight_decay},
                           {"params": biases, "weight_decay": 0.0}], lr=lr_at(0, cfg), momentum=cfg.momentum)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        heads.eval()
        out = {}
        for t, x in xte.items():
            pred = torch.cat([heads[t](x[i:i + 4096].to(device)).argmax(1).cpu() for i in range(0, len(x), 4096)])
            out[t] = score(metric, pred, yte, num_classes)
        return out

    curves: dict[str, list] = {t: [] for t in taps}
    n, train_time = len(train_images), 0.0
    for epoch in range(cfg.epochs):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        heads.train()
        order, total = torch.randperm(n, generator=g), 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size].sort().values.numpy()  # sorted: memmap reads stay sequential
            feats = _pooled(encoder, probe_view(encoder, train_images[idx], size, device, g), taps, max_dims)
            y = ytr[idx].to(device)
            loss = sum(F.cross_entropy(heads[t](f), y) for t, f in feats.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_time += time.perf_counter() - tick
        done = epoch + 1
        msg = epoch_line("sgd probe", done, cfg.epochs, total / n, lr_at(epoch, cfg), n, train_time)
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            for t, s in evaluate().items():
                curves[t].append([done, s])
            msg += " | " + " ".join(f"{t} {c[-1][1]:.2f}" for t, c in curves.items())
        if log:
            log(msg)
    seconds = time.perf_counter() - start
    return {t: {"value": c[-1][1] if c else float("nan"), "curve": c, "seconds": seconds} for t, c in curves.items()}
