"""Fine-tuning for transfer: Ericsson, Gouk, Hospedales 2021, §3 "Finetune".

*How Well Do Self-Supervised Models Transfer?* (CVPR 2021) fine-tunes every pretrained ResNet-50 on each
many-shot target; we follow their released ``finetune.py`` (linusericsson/ssl-transfer) where the text is brief:

- the pretrained backbone plus one new linear layer pre-logits → classes (``nn.Sequential(model,
  nn.Linear(2048, C))``, torch's default initialisation), all trained end to end, batch-norm in training mode;
- SGD with Nesterov momentum 0.9, batch 64, one learning rate and one weight decay for every parameter,
  batch-norm and biases included (``optim.SGD(self.model.parameters(), ...)``);
- 5000 steps, the learning rate annealed to 0 by ``CosineAnnealingLR(T_max=steps)`` stepped after every step:
  lr_t = lr · (1 + cos(π t / T)) / 2 at 0-based step t (``cosine_lr``);
- training data: epochs of the reshuffled train set, last partial batch kept (their ``DataLoader``: shuffle,
  no ``drop_last``; we skip only a trailing batch of one image), repeated until the steps are spent;
  training view ``RandomResizedCrop(S, bicubic)`` (scale 0.08–1; ``views.augment.random_resized_crop``, one
  batched resample without PIL's antialiasing) + ``RandomHorizontalFlip``; val and test view
  ``Resize(S, bicubic)`` + ``CenterCrop(S)`` (``eval_view``), the view of the frozen protocols
  (``features.encode`` resizes the square cached images the same way); S = 224 in the paper, by default the
  train images' own shorter side here; normalised as the encoder expects;
- hyperparameters from the grid lr ∈ {1e-1, 1e-2, 1e-3, 1e-4} × wd ∈ {0, 1e-6, 1e-5, 1e-4, 1e-3}: each of the
  20 configurations fine-tuned from the pretrained weights on train and scored on val with the dataset's
  metric (``metrics.score``: top-1 or mean per-class accuracy); the best (the first in grid order on a tie:
  their strict ``>``) fine-tuned again on train+val and scored on test. Val is the official split where there
  is one (Aircraft, DTD, Flowers, VOC), else a seeded, class-stratified 20 % of train
  (``data.registry.train_val_split``; their code takes an unstratified 20 % under ``np.random.seed(0)``), and
  train+val is then the whole train split.

**Weight decay** (``wd_mode``). The text lists wd values; the code builds ``grid = [(lr, wd / lr) ...]`` and
passes wd/lr as SGD's ``weight_decay``. ``"divide_by_lr"`` (the default) does as the code, because the
published numbers were produced by it, and because it gives the grid's wd one meaning at every lr: SGD's
decay term lr_t · (wd/lr) · θ = wd · (lr_t/lr) · θ removes the share wd of the weights per step at the peak
of the schedule, whatever the lr (as the decoupled decay of Loshchilov & Hutter's SGDW, except that it still
goes through the momentum buffer). ``"plain"`` passes wd unchanged (the text read literally): the decay is
then lr times that, 10 to 10,000 times weaker at the grid's lrs.

**Steps** (``steps_for``). 5000 steps of 64 images are 320,000 images: 8 epochs of the 40,000 CIFAR-10 images left
after the val split, 314 of Flowers' 1,020 training images, the most any of their datasets gets. A run on N images
trains ``steps(N) = min(cfg.steps, ceil(cfg.epochs_cap · N / batch))`` steps. The default ``epochs_cap = 314``
never binds on the paper's datasets (Flowers: ceil(314 · 1020 / 64) = 5005 > 5000), which therefore get the paper's
5000; a smaller set (a CPU subset) is trained for at most as many epochs as Flowers was. Lower ``epochs_cap`` (e.g.
30) to shorten a CPU run; ``None`` always trains ``cfg.steps``. The rule is applied to each run's own N: the search
runs see train, the final run train+val, so when it binds both get the same number of epochs, and when it does not
both get ``cfg.steps``, as in the paper.

**Search** (``search``). ``"grid"`` trains all 20 configurations for the full steps (the paper).
``"halving"`` is successive halving (Jamieson & Talwalkar 2016): all configurations are trained for a fraction
of the steps, the better half (ceil, by val score; ties to grid order) is kept, the budget doubled, and so on
until one remains; the budgets are chosen so the last round, with two finalists, trains for the full steps
(``halving_rounds``: for 20 configurations 20, 10, 5, 3, 2 runs at 1/16, 1/8, 1/4, 1/2, 1 of the steps, 7.25
full runs instead of 20). Every run starts from the pretrained weights (the cosine schedule depends on the
run's length, so a longer budget cannot resume a shorter run). It selects on short runs, so it can drop a
configuration that starts slowly and would win at full length; ``"grid"`` is the protocol, ``"halving"`` a
cheaper approximation. Every run, of either search, uses the same seed (head, batch order, crops): the
configurations differ by lr and wd alone, and halving's last round repeats the grid's runs of its finalists.

Usage::

    out = transfer_finetune(encoder, train.images, train.labels, None, None, test.images, test.labels, 102,
                            "mean_per_class", TransferFinetuneConfig(search="halving"), device="cuda", log=print)
    out["value"], out["best_lr"], out["best_wd"], out["grid"], out["steps_spent"]
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones.base import Backbone
from selfsup.data.registry import train_val_split
from selfsup.errors import UserError
from selfsup.evaluate.features import Encoder
from selfsup.evaluate.finetune import as_encoder, linear_head, predict, train_loop, train_view
from selfsup.evaluate.metrics import score
from selfsup.views.augment import normalize, to_float
from selfsup.views.patches import standardize_patches

WD_MODES = ("divide_by_lr", "plain")
SEARCHES = ("grid", "halving")


@dataclass
class TransferFinetuneConfig:
    lrs: tuple = (1e-1, 1e-2, 1e-3, 1e-4)
    wds: tuple = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
    wd_mode: str = "divide_by_lr"     # SGD's weight_decay = wd / lr, as their code ("plain": wd)
    steps: int = 5000                 # per run, unless epochs_cap binds (steps_for)
    epochs_cap: float | None = 314.0  # at most this many epochs a run; 314 never binds on the paper's datasets
    batch_size: int = 64
    momentum: float = 0.9
    nesterov: bool = True
    crop_scale: tuple = (0.08, 1.0)   # RandomResizedCrop's area range
    search: str = "grid"              # or "halving" (successive halving)
    val_fraction: float = 0.2         # held out of train when there is no official val split
    eval_batch: int = 256
    seed: int = 0                     # val split, head, order and crops of every run


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """``CosineAnnealingLR(T_max=steps, eta_min=0)``'s lr at 0-based step t: lr · (1 + cos(π t / steps)) / 2."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def sgd_weight_decay(lr: float, wd: float, mode: str = "divide_by_lr") -> float:
    """SGD's ``weight_decay`` for the grid's (lr, wd): wd / lr (``"divide_by_lr"``, their code) or wd (``"plain"``)."""
    if mode not in WD_MODES:
        raise UserError(f"wd_mode must be one of {WD_MODES}, got {mode!r}")
    return wd / lr if mode == "divide_by_lr" else wd


def make_optimizer(net: nn.Module, head: nn.Linear, lr: float, wd: float, cfg: TransferFinetuneConfig
                   ) -> torch.optim.SGD:
    """One parameter group, every parameter of backbone and head, as their ``optim.SGD(model.parameters())``."""
    params = list(net.parameters()) + list(head.parameters())
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=sgd_weight_decay(lr, wd, cfg.wd_mode))


def steps_for(n: int, cfg: TransferFinetuneConfig) -> int:
    """Steps of a run on ``n`` images: min(cfg.steps, ceil(epochs_cap · n / batch)), cfg.steps without a cap."""
    if cfg.epochs_cap is None:
        return cfg.steps
    return max(1, min(cfg.steps, math.ceil(cfg.epochs_cap * n / cfg.batch_size)))


def halving_rounds(configs: int, steps: int) -> list[tuple[int, int]]:
    """(runs, steps each) of every round of successive halving over ``configs`` configurations: ``configs``,
    then ceil of half the previous, down to 2 finalists trained for ``steps``; each round before has half the
    next's steps (at least 1). One configuration needs no round."""
    sizes = []
    while configs > 1:
        sizes.append(configs)
        configs = math.ceil(configs / 2)
    return [(k, max(1, math.ceil(steps / 2 ** (len(sizes) - 1 - r)))) for r, k in enumerate(sizes)]


def select(configs: Sequence[tuple[float, float]], steps: int, evaluate: Callable[[float, float, int], float],
           search: str = "grid") -> tuple[tuple[float, float], list[list]]:
    """The configuration (lr, wd) with the best ``evaluate(lr, wd, steps)`` (its val score), and the rows
    [lr, wd, val score, steps] of every run made. ``"grid"``: each configuration once at ``steps``, the first
    best in grid order wins. ``"halving"``: the rounds of ``halving_rounds``, each keeping the better half;
    ties go to grid order. The steps spent are the sum of the rows' steps."""
    if search not in SEARCHES:
        raise UserError(f"search must be one of {SEARCHES}, got {search!r}")
    configs = [tuple(c) for c in configs]
    if not configs:
        raise UserError("the grid is empty: give at least one lr and one wd")
    rows: list[list] = []
    if search == "grid":
        scores = []
        for lr, wd in configs:
            scores.append(evaluate(lr, wd, steps))
            rows.append([lr, wd, scores[-1], steps])
        return configs[max(range(len(configs)), key=lambda i: (scores[i], -i))], rows
    alive = list(range(len(configs)))
    for _, budget in halving_rounds(len(configs), steps):
        scores = {}
        for i in alive:
            scores[i] = evaluate(*configs[i], budget)
            rows.append([*configs[i], scores[i], budget])
        alive = sorted(alive, key=lambda i: (-scores[i], i))[:math.ceil(len(alive) / 2)]
    return configs[alive[0]], rows


def eval_view(encoder: Encoder, images: np.ndarray | Tensor, size: int, device) -> Tensor:
    """torchvision ``Resize(size, bicubic)`` + ``CenterCrop(size)`` of uint8 B×H×W×3: the shorter side to size
    (antialiased bicubic, clamped to [0, 1]), the central size×size crop, the encoder's normalisation."""
    x = to_float(torch.as_tensor(np.array(images)).to(device).permute(0, 3, 1, 2))
    h, w = x.shape[-2:]
    if min(h, w) != size:
        rh, rw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)   # torchvision's rounding
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    top, left = int(round((x.shape[-2] - size) / 2)), int(round((x.shape[-1] - size) / 2))
    x = x[..., top:top + size, left:left + size]
    x = standardize_patches(x) if encoder.standardize else normalize(x, encoder.mean, encoder.std)
    return x.contiguous(memory_format=torch.channels_last)


class _Joined:
    """Two image arrays read as one (train then val) without copying either, so memmaps stay on disk;
    indexed by sorted int arrays, as ``train_loop`` does."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx, n = np.asarray(idx), len(self.first)
        return np.concatenate([self.first[idx[idx < n]], self.second[idx[idx >= n] - n]])


def _check(images, labels, split: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{split} images must be uint8 N×H×W×3, got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise UserError(f"{split} has {len(images)} images but {len(labels)} labels")


def transfer_finetune(model: Encoder | Backbone, train_images: np.ndarray, train_labels,
                      val_images: np.ndarray | None, val_labels, test_images: np.ndarray, test_labels,
                      num_classes: int, metric: str = "top1", cfg: TransferFinetuneConfig | None = None,
                      size: int | None = None, device: str | torch.device = "cpu",
                      log: Callable[[str], None] | None = None) -> dict:
    """Ericsson et al.'s fine-tuning protocol: choose (lr, wd) on val, fine-tune on train+val, score test.

    ``val_images``/``val_labels`` None: a seeded stratified ``cfg.val_fraction`` of train is the val split and
    train+val the whole train split. ``metric``: "top1" or "mean_per_class". ``size``: the crop size S (default
    the train images' shorter side). The caller's backbone is deep-copied for every run and never changed.
    ``log`` gets one line per run (val score, images/s, ETA of the whole protocol). Returns {"value": test
    score in %, "metric", "best_lr", "best_wd", "best_val", "grid": [[lr, wd, val score, steps], ...] (one row
    per search run, in order), "search", "wd_mode", "steps": the final run's, "search_steps_spent" (the sum of
    the rows' steps), "steps_spent" (search + final), "train_images", "val_images", "trainval_images",
    "seconds"}. A one-configuration grid skips the search."""
    cfg = cfg or TransferFinetuneConfig()
    sgd_weight_decay(1.0, 0.0, cfg.wd_mode)                       # unknown modes fail before any training
    if cfg.search not in SEARCHES:
        raise UserError(f"search must be one of {SEARCHES}, got {cfg.search!r}")
    if (val_images is None) != (val_labels is None):
        raise UserError("give both val_images and val_labels, or neither (a split of train is then held out)")
    _check(train_images, train_labels, "train")
    _check(test_images, test_labels, "test")
    start = time.perf_counter()
    encoder = as_encoder(model)
    size = size or min(train_images.shape[1:3])
    ytrain = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    if val_images is None:
        fit_idx, val_idx = train_val_split(np.asarray(train_labels), seed=cfg.seed, fraction=cfg.val_fraction)
        val_x, yval = train_images, ytrain
        trainval, ytrainval = train_images, ytrain
    else:
        _check(val_images, val_labels, "val")
        if val_images.shape[1:] != train_images.shape[1:]:
            raise UserError(f"val images are {tuple(val_images.shape[1:])} but train images "
                            f"{tuple(train_images.shape[1:])}: resize both splits alike (data.load(..., size=))")
        fit_idx, val_idx = np.arange(len(train_images)), np.arange(len(val_images))
        val_x, yval = val_images, torch.as_tensor(np.asarray(val_labels), dtype=torch.int64)
        trainval = _Joined(train_images, val_images)
        ytrainval = torch.cat([ytrain, yval])
    yval_split = yval[torch.as_tensor(val_idx)]
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)

    configs = [(float(lr), float(wd)) for lr in cfg.lrs for wd in cfg.wds]
    run_steps, final_steps = steps_for(len(fit_idx), cfg), steps_for(len(trainval), cfg)
    rounds = [(len(configs), run_steps)] if cfg.search == "grid" else halving_rounds(len(configs), run_steps)
    planned = (sum(k * s for k, s in rounds) if len(configs) > 1 else 0) + final_steps
    progress = {"runs": 0, "steps": 0}
    total_runs = (sum(k for k, _ in rounds) if len(configs) > 1 else 0) + 1

    def run(lr: float, wd: float, steps: int, images, labels: Tensor, subset: np.ndarray, eval_x, eval_y: Tensor,
            eval_idx: np.ndarray | None, what: str) -> float:
        """Fine-tune a fresh copy for ``steps`` and return its score on the evaluation split."""
        g = torch.Generator().manual_seed(cfg.seed)
        net = copy.deepcopy(encoder.backbone).to(device)
        head = linear_head(net.out_dim, num_classes, g).to(device)
        opt = make_optimizer(net, head, lr, wd, cfg)
        fit = train_loop(net, head, opt, images, labels, subset, steps, cfg.batch_size,
                         lambda t: cosine_lr(t, steps, lr),
                         lambda x: train_view(encoder, x, size, cfg.crop_scale, device, g, mode="bicubic"), g, device)
        logits = predict(net, head, eval_x, lambda x: eval_view(encoder, x, size, device), cfg.eval_batch, device,
                         eval_idx)
        value = score(metric, logits.argmax(1), eval_y, num_classes)
        progress["runs"] += 1
        progress["steps"] += steps
        if log:
            elapsed = time.perf_counter() - start
            eta = elapsed / progress["steps"] * (planned - progress["steps"])
            log(f"finetune run {progress['runs']}/{total_runs} lr {lr:g} wd {wd:g} {steps} steps "
                f"loss {fit['loss']:.4f} {what} {value:.2f} | {fit['images'] / max(fit['seconds'], 1e-9):.0f} img/s "
                f"ETA {eta:.0f}s")
        return value

    def on_val(lr: float, wd: float, steps: int) -> float:
        return run(lr, wd, steps, train_images, ytrain, fit_idx, val_x, yval_split, val_idx, f"val {metric}")

    if len(configs) > 1:
        (best_lr, best_wd), rows = select(configs, run_steps, on_val, cfg.search)
    else:
        (best_lr, best_wd), rows = configs[0], []
    best_val = max((r[2] for r in rows if (r[0], r[1]) == (best_lr, best_wd) and r[3] == run_steps),
                   default=float("nan"))
    value = run(best_lr, best_wd, final_steps, trainval, ytrainval, np.arange(len(trainval)), test_images, yte,
                None, f"test {metric}")
    spent = sum(r[3] for r in rows)
    return {"value": value, "metric": metric, "best_lr": best_lr, "best_wd": best_wd, "best_val": best_val,
            "grid": rows, "search": cfg.search, "wd_mode": cfg.wd_mode, "steps": final_steps,
            "search_steps_spent": spent, "steps_spent": spent + final_steps, "train_images": int(len(fit_idx)),
            "val_images": int(len(val_idx)), "trainval_images": int(len(trainval)),
            "seconds": time.perf_counter() - start}
