"""Instance discrimination with a memory bank: NPID / InstDisc (Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", CVPR) and NPID++ (Misra & van der Maaten 2020, PIRL §4.2).

Every training image is its own class. f = backbone pre-logits → linear 128, L2-normalised (Wu et al. §3.1,
their ``low_dim`` fc + ``Normalize``). Its positive is the image's own memory-bank entry m_I and its N
negatives are bank entries drawn uniformly (``nn.memory_bank``); the loss is NCE (Wu et al. §3.2 eq. 6–7 =
PIRL eq. 3–4, ``losses.nce_loss``) with τ = 0.07 and the normalising constant Z estimated from the first
batch and then fixed (``NormalizingConstant``, as their code and VISSL). After the optimiser step the bank
takes m_I ← normalise(0.5 m_I + 0.5 f(v_I)) with the f of that step's forward pass (``after_step``): the
same values VISSL and lemniscate write during the forward, one step's loss never sees its own write, and
the bank stays out of the autograd graph.

``npid``: N = 4,096 and the recipe of Wu et al.'s code (lemniscate.pytorch ``main.py``): random resized
crop scale 0.2–1, grayscale 0.2, colour jitter 0.4 (all four, always), flip; SGD momentum 0.9, lr 0.03 ×
batch/256, weight decay 1e-4 on all parameters, 200 epochs with ×0.1 at 120 and 160. Deviation: their
order is crop, grayscale, jitter, flip; ``make_view``'s is crop+flip, jitter, grayscale.
``npid++``: PIRL with λ = 0 (PIRL §4.2, "NPID++"): N = 32,000, PIRL's image augmentation
(``views.pirl_views``) and PIRL's optimisation, 800 epochs in the paper. (VISSL's npid++ config uses a
plainer augmentation, jitter 0.4 with hue 0.4, crop and flip; we keep PIRL's so that the λ ablation changes
only λ.)

Options beyond the papers: ``norm_constant`` ("first_batch", VISSL; "every_step" re-estimates Z on every
batch; "none" is eq. 3 as printed, Z = 1) and ``shared_negatives`` (one set of N negatives for the whole
batch instead of N per sample: B× less gathering and memory; the negatives may then include a sample's own
image, with probability N/|D|). N is capped at |D| − 1: negatives are drawn with replacement from the
other images, and N/|D| ≤ 1 keeps the prior of eq. 3 a probability ratio. A bank that large for its data (N ≥
|D| − 1, e.g. the ImageNet defaults on a small set) trains, but ``setup`` warns once (rank 0): every sample is then
compared at every step with draws from all the other images, bank entries written up to an epoch ago, and the
small-data recipes pass a smaller ``num_negatives``.

``insdis``: InsDis as PyContrast trains it (Tian et al. 2020, HobbitLong/PyContrast ``--method InsDis``), the
checkpoint Ericsson et al. 2021 evaluate (59.5 % ImageNet linear). The same f, bank and update as NPID (their
``RGBMem``: ``--mem bank --nce_m 0.5``, ``-d 128``, ``--head linear`` = Linear(2048, 128) + L2 normalisation), but
the loss is a softmax over the own entry and K = 65,536 drawn entries (``--nce_k 65536 --nce_t 0.07``;
``losses.info_nce``)::

    L = −log exp(m_I·f/τ) / (exp(m_I·f/τ) + Σ_{k=1}^{K} exp(m_k·f/τ)),     τ = 0.07,

cross-entropy with label 0 over their ``bmm(w, x) / T`` logits. Wu et al.'s paper and code (lemniscate.pytorch)
instead train NCE (eq. 6–7) with N = 4,096 (``npid`` above): a binary classifier against a noise prior N/|D| with a
normalising constant Z, where the softmax needs neither. The rest is PyContrast's augmentation ``A`` with the crop
scale it uses for memory banks (``build_transforms``: RandomResizedCrop scale 0.08–1, flip, ColorJitter(0.4, 0.4,
0.4, 0.4), grayscale 0.2, in ``make_view``'s order, which is theirs) and its defaults (``options/base_options.py``):
SGD momentum 0.9, lr 0.03 at batch 256 (their RUN.md scales it linearly: 0.06 at 512), weight decay 1e-4 on every
parameter, 200 epochs, ×0.1 at 120 and 160 (``NPID_OPTIM``). Differences: PyContrast warms up (5 epochs from 0.01)
only for batches over 256, initialises the bank with normalised Gaussians (ours: VISSL's normalised uniform), draws
negatives from all of D (ours never the sample's own image) and writes the bank inside its forward (ours after the
optimiser step, from the same f; the loss never sees its own write in either).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.config import FRACTION_BELOW_ONE, Range, one_of
from selfsup.errors import UserError
from selfsup.losses import estimate_nce_z, info_nce, nce_from_scores, nce_scores
from selfsup.methods.base import Method, StepInfo, TrainSet
from selfsup.nn.distributed import is_distributed
from selfsup.nn.memory_bank import MemoryBank, sample_negatives
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, ViewConfig, make_view
from selfsup.views.pirl_views import pirl_image_view

# Wu et al.'s code (lemniscate.pytorch main.py): RandomResizedCrop(224, scale=(0.2, 1)), RandomGrayscale(0.2),
# ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip, ImageNet normalisation.
NPID_VIEW = ViewConfig(size=224, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)

# PyContrast's augmentation "A" for memory-bank methods (datasets/util.py build_transforms: "memory bank likes 0.08"):
# RandomResizedCrop(224, scale=(0.08, 1)), RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(0.2).
INSDIS_VIEW = dataclasses.replace(NPID_VIEW, crop_scale=(0.08, 1.0))

# Wu et al.'s code: SGD momentum 0.9, lr 0.03 (batch 256), weight decay 1e-4, 200 epochs, ×0.1 at 120 and 160.
NPID_OPTIM = dict(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, schedule="step", milestones=[120, 160],
                  gamma=0.1, warmup_epochs=0)

# PIRL (§4.1, VISSL pirl_jigsaw_4node_resnet): SGD momentum 0.9, weight decay 1e-4 without BN and biases,
# cosine from 0.12 at batch 1024 (VISSL's auto-scaling of 0.03 × batch/256) to 0.12e-3, 800 epochs.
PIRL_OPTIM = dict(name="sgd", lr=0.03, scale_lr=True, momentum=0.9, weight_decay=1e-4, exclude_norm_and_bias=True,
                  schedule="cosine", final_lr_ratio=1e-3, warmup_epochs=0)

NORM_CONSTANT_MODES = ("first_batch", "every_step", "none")


@dataclass
class NPIDConfig:
    num_negatives: int = 4096       # Wu et al. §4 / lemniscate --nce-k; capped at |D| - 1
    temperature: float = 0.07       # τ
    embed_dim: int = 128            # f's output (their low_dim)
    momentum: float = 0.5           # bank update weight on the old entry (their η = 0.5)
    norm_constant: str = "first_batch"  # Z: first_batch (VISSL) | every_step | none (eq. 3 as printed)
    shared_negatives: bool = False  # one set of negatives per batch instead of per sample
    view: str = "npid"              # image augmentation: npid (Wu et al.'s code) | pirl (PIRL / VISSL)
    size: int | None = None         # crop size; None = the images' own size


class NormalizingConstant(nn.Module):
    """Z of the NCE scores (VISSL ``NCEAverage``): ``first_batch`` estimates Z = mean(exp(s/τ))·|D| on the
    first call and keeps it (a buffer, so a resumed run keeps it too); ``every_step`` re-estimates it on
    every call; ``none`` is Z = 1. With several processes the batch means are averaged over ranks
    (equal batch sizes), so every rank holds the same Z, the single-process value of the global batch."""

    def __init__(self, num_items: int, mode: str = "first_batch"):
        super().__init__()
        if mode not in NORM_CONSTANT_MODES:
            raise UserError(f"norm_constant={mode!r} is not one of {', '.join(NORM_CONSTANT_MODES)}")
        self.num_items, self.mode = num_items, mode
        self.register_buffer("value", torch.tensor(-1.0))   # < 0: not estimated yet

    @torch.no_grad()
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return torch.ones((), device=scores.device)
        if self.mode == "every_step" or bool(self.value < 0):
            z = estimate_nce_z(scores, self.num_items)
            if is_distributed():
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.value.copy_(z)
        return self.value.clone()


class NPID(Method):
    name = "npid"
    summary = "NPID / InstDisc (Wu et al. 2018): NCE against a memory bank, own entry positive, 4,096 negatives"
    Config = NPIDConfig
    limits = {"num_negatives": Range(1), "momentum": FRACTION_BELOW_ONE, "view": one_of("npid", "pirl"),
              "norm_constant": one_of(*NORM_CONSTANT_MODES)}
    optim_defaults = NPID_OPTIM

    def __init__(self, backbone, cfg: NPIDConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.head = nn.Linear(backbone.out_dim, cfg.embed_dim)
        self.bank = MemoryBank(num_images, cfg.embed_dim, cfg.momentum)
        self.z = NormalizingConstant(num_images, cfg.norm_constant)
        self.num_negatives = min(cfg.num_negatives, num_images - 1)

    def setup(self, train_set: TrainSet) -> None:
        n, asked = train_set.num_images, self.cfg.num_negatives
        if asked >= n - 1 and train_set.rank == 0:
            fix = max(1, 1 << ((n // 2).bit_length() - 1))      # a power of two at most half the images
            warnings.warn(f"method.num_negatives={asked} is at least the {n - 1} other images of {train_set.name}: "
                          f"each sample is compared with {self.num_negatives} draws from all of them at every step "
                          f"(N capped at |D| - 1), i.e. with most of the dataset as bank entries written up to an "
                          f"epoch ago. Small-data recipes use a smaller bank: pass e.g. method.num_negatives={fix}",
                          stacklevel=2)

    @classmethod
    def input_stats(cls, cfg) -> tuple[tuple, tuple, bool]:
        return IMAGENET_MEAN, IMAGENET_STD, False

    # ------------------------------------------------------------------ views
    def image_view(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        size = self.cfg.size or images.shape[-1]
        if self.cfg.view == "pirl":
            return pirl_image_view(images, size, g=g)
        return make_view(images, dataclasses.replace(NPID_VIEW, size=size), g=g)

    def negatives(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        neg = sample_negatives(index.cpu(), self.num_negatives, self.num_images, g, shared=self.cfg.shared_negatives)
        return neg.to(index.device)

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        x = self.image_view(images, g)
        return {"x": x, "index": index, "negatives": self.negatives(index, g)}

    # ------------------------------------------------------------------ model
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(v_I): pre-logits → linear 128, L2-normalised."""
        return F.normalize(self.head(self.backbone(x)["pre_logits"]).float(), dim=1)

    def bank_entries(self, views: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_I B × d, m_I' B × N × d or N × d) in one exchange with the bank's owners."""
        index, neg = views["index"], views["negatives"]
        if neg.dim() == 1:
            rows = self.bank.lookup(torch.cat([index, neg]))
            return rows[: index.shape[0]], rows[index.shape[0]:]
        rows = self.bank.lookup(torch.cat([index[:, None], neg], 1))
        return rows[:, 0], rows[:, 1:]

    def forward(self, views: dict, info: StepInfo) -> dict:
        f = self.embed(views["x"])
        positive, negatives = self.bank_entries(views)
        scores = nce_scores(f, positive, negatives, self.cfg.temperature)
        z = self.z(scores)
        loss = nce_from_scores(scores, self.num_images, z)
        return {"loss": loss, **self.diagnostics(scores, z), "state": {"index": views["index"], "f": f.detach()}}

    @staticmethod
    def diagnostics(scores: torch.Tensor, z: torch.Tensor) -> dict:
        """pretext_acc: how often the own bank entry outscores all N negatives; z: the normalising constant."""
        with torch.no_grad():
            acc = (scores[:, 0] > scores[:, 1:].amax(1)).float().mean()
        return {"pretext_acc": acc, "nce_z": z.detach()}

    def after_step(self, state: dict, info: StepInfo) -> None:
        self.bank.update(state["index"], state["f"])   # m_I <- normalise(0.5 m_I + 0.5 f(v_I))


@dataclass
class NPIDPlusPlusConfig(NPIDConfig):
    num_negatives: int = 32_000     # PIRL §4.2 / VISSL npid++ config
    view: str = "pirl"


class NPIDPlusPlus(NPID):
    name = "npid++"
    summary = "NPID++ (Misra & van der Maaten 2020 §4.2): NPID with 32,000 negatives, PIRL's recipe (PIRL at λ = 0)"
    Config = NPIDPlusPlusConfig
    optim_defaults = PIRL_OPTIM


@dataclass
class InsDisConfig:
    num_negatives: int = 65_536     # PyContrast --nce_k (K); capped at |D| - 1
    temperature: float = 0.07       # --nce_t
    embed_dim: int = 128            # -d / --feat_dim
    momentum: float = 0.5           # --nce_m: bank update weight on the old entry
    shared_negatives: bool = False  # one set of K negatives per batch instead of per sample (B× less memory)
    view: str = "insdis"            # insdis (PyContrast, crop 0.08-1) | npid (Wu et al., crop 0.2-1) | pirl
    size: int | None = None         # crop size; None = the images' own size
    norm_constant: ClassVar[str] = "none"   # NCE's Z: the softmax has none (not an option)


class InsDis(NPID):
    name = "insdis"
    summary = ("InsDis as PyContrast trains it (Ericsson et al.'s checkpoint): softmax over the own bank entry and "
               "65,536 drawn ones, τ 0.07")
    Config = InsDisConfig
    limits = {"num_negatives": Range(1), "momentum": FRACTION_BELOW_ONE, "view": one_of("insdis", "npid", "pirl")}
    optim_defaults = NPID_OPTIM     # PyContrast's defaults are lemniscate's: SGD 0.03, wd 1e-4, 200 ep, ×0.1 at 120/160

    def __init__(self, backbone, cfg: InsDisConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        del self.z                   # NPID's normalising constant: nothing to estimate for a softmax

    def image_view(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.cfg.view == "insdis":
            return make_view(images, dataclasses.replace(INSDIS_VIEW, size=self.cfg.size or images.shape[-1]), g=g)
        return super().image_view(images, g)

    def forward(self, views: dict, info: StepInfo) -> dict:
        f = self.embed(views["x"])
        positive, negatives = self.bank_entries(views)
        loss = info_nce(f, positive, negatives, self.cfg.temperature)
        with torch.no_grad():   # how often the own entry outscores every drawn one (PyContrast's top-1 "a_I")
            own = (f * positive).sum(1)
            others = f @ negatives.T if negatives.dim() == 2 else torch.einsum("bd,bkd->bk", f, negatives)
            acc = (own > others.amax(1)).float().mean()
        return {"loss": loss, "pretext_acc": acc, "state": {"index": views["index"], "f": f.detach()}}
