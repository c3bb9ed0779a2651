"""Fine-tuning the whole network with a new linear head: the one training loop, and the semi-supervised recipe.

``train_loop`` is the loop of both fine-tuning protocols of this package, this module's semi-supervised recipe
(PIRL §3.3, below) and Ericsson et al. 2021's transfer recipe (``evaluate.transfer_finetune``): a given number
of SGD steps of softmax cross-entropy over seeded epochs of a labelled subset, each step's learning rate from a
function of the step, an optional callback after every epoch (the recipes score and log there). ``predict``
scores a split through a deterministic view; ``train_view`` is the random-resized-crop + flip view of both.

Semi-supervised evaluation (``finetune``): fine-tune the whole network on 1 % or 10 % of the labels.

Misra & van der Maaten 2020 (PIRL), §3.3 and Table 3: "we randomly select 1% and 10% of the ImageNet training
data (with labels). We finetune our models on these training-data subsets following the procedure of [Wu et
al. 2018]" and report single-crop top-5 on the validation set (PIRL 57.2 / 83.8). The setup is S4L's (Zhai,
Oliver, Kolesnikov, Beyer 2019), whose subsets are class-balanced (SimCLR §6: "sampled in a class-balanced
way", ~12.8 and ~128 images per class). Neither paper prints the fine-tuning hyperparameters; we follow
PIRL's released reproduction in VISSL (``configs/config/benchmark/semi_supervised/
eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml`` with ``dataset/pirl_in1k_per01.yaml`` and
``pirl_in1k_per10.yaml``), identical for 1 % and 10 %:

- the pretrained trunk plus one new linear layer pre-logits → classes (VISSL ``mlp [2048, 1000]``, torch's
  default ``nn.Linear`` initialisation), everything trained, batch-norm in training mode;
- SGD with Nesterov momentum 0.9, weight decay 0 (none on BN, ``regularize_bn: False``), one learning rate
  for trunk and head (``head_lr_mult`` = 1; other protocols give the head more), lr 0.01 × batch/256 at batch
  256 (32 × 8 GPUs), ×0.1 at epoch 30, 70 epochs;
- training views: ``RandomResizedCrop(224)`` (scale 0.08–1) + horizontal flip; test: ``Resize(256)`` +
  ``CenterCrop(224)``; both normalised as the encoder expects. At an image size S (the images' own by
  default) the crop is S and the test resize round(S·256/224), as ``sgd_probe.probe_view``, which we reuse.

Our choices: the subset takes the same number of images from every class, max(1, round(fraction · N / C))
(``label_subset``; a class with fewer gives all it has), so small sets keep every class. Each epoch is a
seeded permutation of the subset and keeps its last partial batch (VISSL drops it, but 1 % of a small set
can be smaller than one batch); only a trailing batch of one image is skipped, as batch-norm statistics of a
single image are meaningless. The test split is scored every ``eval_every`` epochs (VISSL: every epoch),
which gives the curve. The caller's backbone is deep-copied and never changed.

Usage::

    out = finetune(encoder, train.images, train.labels, test.images, test.labels, 10, fraction=0.01, log=print)
    out["top5"], out["top1"], out["train_images"], out["curve"]     # [[epoch, top1, top5], ...]
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones.base import Backbone
from selfsup.data.registry import per_class_subset
from selfsup.errors import UserError
from selfsup.evaluate.features import Encoder
from selfsup.evaluate.metrics import score
from selfsup.evaluate.sgd_probe import epoch_line, probe_view
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop, to_float
from selfsup.views.patches import standardize_patches


@dataclass
class FinetuneConfig:
    epochs: int = 70
    milestones: list = field(default_factory=lambda: [30])
    gamma: float = 0.1
    batch_size: int = 256
    lr: float = 0.01                  # × batch/256 (VISSL auto_lr_scaling); the trunk's
    head_lr_mult: float = 1.0         # the new linear layer's lr over the trunk's (VISSL: the same)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0         # never on batch-norm parameters
    crop_scale: tuple = (0.08, 1.0)   # RandomResizedCrop's area range
    eval_every: int = 1               # epochs between points of the curve (the last epoch is always scored)


def label_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced, seeded subset holding ``fraction`` of the labelled images: the same
    max(1, round(fraction · N / C)) images from each of the C classes (all of a smaller class)."""
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    classes = len(np.unique(labels))
    per_class = max(1, math.floor(fraction * len(labels) / max(classes, 1) + 0.5))   # round half up
    return per_class_subset(labels, per_class, seed)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 5) -> float:
    """Share of rows whose label is among the k largest logits, in percent (k is capped at the classes)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels.view(-1, 1).to(logits.device)).any(1)
    return 100.0 * hits.double().mean().item()


def lr_at(epoch: int, cfg: FinetuneConfig) -> float:
    """The trunk's learning rate during 0-based ``epoch``: lr · batch/256 · gamma^(milestones reached)."""
    return cfg.lr * cfg.batch_size / 256 * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


# --------------------------------------------------------------------------- the shared loop
def linear_head(dim: int, classes: int, g: torch.Generator) -> nn.Linear:
    """The new layer pre-logits → classes with torch's default ``nn.Linear`` initialisation (VISSL's mlp head,
    Ericsson et al.'s ``nn.Linear``), drawn from ``g``: U(±1/√dim) for weight and bias."""
    head = nn.Linear(dim, classes)
    bound = 1 / math.sqrt(dim)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.uniform_(-bound, bound, generator=g)
    return head


def _batch_starts(n: int, batch_size: int) -> list[int]:
    """Offsets of an epoch's batches: the last partial batch is kept, unless it is a single image after others
    (batch-norm statistics of one image are meaningless)."""
    return [i for i in range(0, n, batch_size) if i == 0 or min(batch_size, n - i) >= 2]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """SGD steps of one epoch over ``n`` images: ceil(n / batch), less a trailing single-image batch."""
    return len(_batch_starts(n, batch_size))


def _epochs(subset: np.ndarray, batch_size: int, g: torch.Generator) -> Iterator[tuple[np.ndarray, bool]]:
    """Endless (sorted indices, last batch of its epoch?): each epoch a fresh seeded permutation of ``subset``,
    drawn when the epoch begins. Indices are sorted within a batch so that memmap reads stay sequential."""
    starts = _batch_starts(len(subset), batch_size)
    while True:
        order = subset[torch.randperm(len(subset), generator=g).numpy()]
        for j, i in enumerate(starts):
            yield np.sort(order[i:i + batch_size]), j == len(starts) - 1


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()


def train_loop(net: nn.Module, head: nn.Linear, opt: torch.optim.Optimizer, images, labels: Tensor,
               subset: np.ndarray, steps: int, batch_size: int, lr_of: Callable[[int], float],
               view: Callable[[np.ndarray], Tensor], g: torch.Generator, device: str | torch.device = "cpu",
               on_epoch: Callable[[int, float, float], None] | None = None) -> dict:
    """Train ``head(net(view(images[idx]))["pre_logits"])`` with softmax cross-entropy for ``steps`` SGD steps.

    Batches come from seeded epochs of ``subset`` (``_epochs``, from ``g``, as the views' randomness); ``images``
    is anything indexed by a sorted int array (an array, a memmap). Before 0-based step t every parameter group's
    lr is set to ``lr_of(t)`` × its ``"mult"`` (1 when absent). Network and head train in training mode
    (batch-norm included). ``on_epoch(epoch, mean loss of the epoch, training seconds so far)`` is called after
    each completed epoch and after the last step (time spent in it is not counted; training mode is restored
    after it). Returns {"loss": the last epoch's mean loss, "images": images trained on, "seconds"}."""
    subset = np.asarray(subset)
    if len(subset) == 0:
        raise UserError("nothing to fine-tune on: the training subset is empty")
    autocast = _autocast(device)
    batches = _epochs(subset, batch_size, g)
    epoch, total, count, seen, seconds, last_loss = 0, 0.0, 0, 0, 0.0, float("nan")
    net.train()
    head.train()
    tick = time.perf_counter()
    for step in range(steps):
        idx, epoch_end = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_of(step) * group.get("mult", 1.0)
        x = view(images[idx])
        with autocast:
            logits = head(net(x)["pre_logits"]).float()
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, count = total + loss.item() * len(idx), count + len(idx)
        if epoch_end or step == steps - 1:
            seconds += time.perf_counter() - tick
            epoch, seen, last_loss, total, count = epoch + 1, seen + count, total / count, 0.0, 0
            if on_epoch:
                on_epoch(epoch, last_loss, seconds)
                net.train()
                head.train()
            tick = time.perf_counter()
    return {"loss": last_loss, "images": seen, "seconds": seconds}


@torch.no_grad()
def predict(net: nn.Module, head: nn.Linear, images, view: Callable[[np.ndarray], Tensor], batch_size: int,
            device: str | torch.device = "cpu", index: np.ndarray | None = None) -> Tensor:
    """Logits (float32, on the CPU) of ``images[index]`` (all of them by default) through the deterministic
    ``view``, network and head in inference mode."""
    net.eval()
    head.eval()
    n = len(images) if index is None else len(index)
    parts = []
    for i in range(0, n, batch_size):
        x = view(images[i:i + batch_size] if index is None else images[np.asarray(index[i:i + batch_size])])
        with _autocast(device):
            parts.append(head(net(x)["pre_logits"]).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, head.out_features)


def train_view(encoder: Encoder, images: np.ndarray, size: int, scale: tuple, device, g: torch.Generator,
               mode: str = "bilinear") -> Tensor:
    """uint8 B×H×W×3 → random resized crop to size with flip, normalised as the encoder expects. ``mode`` is the
    resampling (VISSL: bilinear; Ericsson et al.: bicubic, whose overshoot is clamped to [0, 1])."""
    x = torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2)   # a copy: memmaps are read-only
    x = random_resized_crop(to_float(x), size, scale, flip_p=0.5, g=g, mode=mode)
    if mode == "bicubic":
        x = x.clamp_(0, 1)
    x = standardize_patches(x) if encoder.standardize else normalize(x, encoder.mean, encoder.std)
    return x.contiguous(memory_format=torch.channels_last)


def as_encoder(model: Encoder | Backbone) -> Encoder:
    """An ``Encoder`` as is; a bare backbone with ImageNet normalisation."""
    if isinstance(model, Encoder):
        return model
    return Encoder(model, type(model).__name__, "", IMAGENET_MEAN, IMAGENET_STD)


# --------------------------------------------------------------------------- the semi-supervised recipe
def _param_groups(net: nn.Module, head: nn.Linear, cfg: FinetuneConfig) -> list[dict]:
    norm = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()}
    trunk = [p for p in net.parameters() if id(p) not in norm]
    groups = [{"params": trunk, "weight_decay": cfg.weight_decay, "mult": 1.0},
              {"params": [p for p in net.parameters() if id(p) in norm], "weight_decay": 0.0, "mult": 1.0},
              {"params": list(head.parameters()), "weight_decay": cfg.weight_decay, "mult": cfg.head_lr_mult}]
    return [group for group in groups if group["params"]]   # a backbone without batch-norm has no norm group


def finetune(model: Encoder | Backbone, train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels,
             num_classes: int, cfg: FinetuneConfig | None = None, fraction: float | None = 0.01, seed: int = 0,
             metric: str = "top1", size: int | None = None, device: str | torch.device = "cpu",
             log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune a copy of the backbone with a new linear head on a class-balanced ``fraction`` of the train
    labels (None: all), score the test split. Returns {"top1", "top5", "value" (``metric``), "metric",
    "train_images", "curve": [[epoch, top1, top5], ...], "seconds"}; the seed fixes subset, head, order, crops."""
    cfg = cfg or FinetuneConfig()
    start = time.perf_counter()
    encoder = as_encoder(model)
    size = size or min(train_images.shape[1:3])
    g = torch.Generator().manual_seed(seed)
    subset = label_subset(train_labels, fraction, seed) if fraction is not None else np.arange(len(train_labels))
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    net = copy.deepcopy(encoder.backbone).to(device)           # the caller's weights stay as they are
    head = linear_head(net.out_dim, num_classes, g).to(device)
    opt = torch.optim.SGD(_param_groups(net, head, cfg), lr=lr_at(0, cfg), momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    n = len(subset)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    curve: list[list] = []
    value = float("nan")

    def on_epoch(done: int, loss: float, seconds: float) -> None:
        nonlocal value
        msg = epoch_line("finetune", done, cfg.epochs, loss, lr_at(done - 1, cfg), n, seconds)
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            logits = predict(net, head, test_images, lambda x: probe_view(encoder, x, size, device), cfg.batch_size,
                             device)
            top1, top5 = topk_accuracy(logits, yte, 1), topk_accuracy(logits, yte, 5)
            value = score(metric, logits.argmax(1), yte, num_classes)
            curve.append([done, top1, top5])
            msg += f" | top1 {top1:.2f} top5 {top5:.2f}"
        if log:
            log(msg)

    train_loop(net, head, opt, train_images, ytr, subset, cfg.epochs * per_epoch, cfg.batch_size,
               lambda step: lr_at(step // per_epoch, cfg),
               lambda x: train_view(encoder, x, size, cfg.crop_scale, device, g), g, device, on_epoch)
    top1, top5 = (curve[-1][1], curve[-1][2]) if curve else (float("nan"), float("nan"))
    return {"top1": top1, "top5": top5, "value": value, "metric": metric, "train_images": int(n), "curve": curve,
            "seconds": time.perf_counter() - start}
