"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS;
BYOL of Ericsson et al. 2021's model zoo).

Networks (§3.1; "Implementation details", §3.2 of arXiv v1). The online network is the backbone f_θ, a
projector g_θ and a predictor q_θ, each the MLP Linear(·, 4096) → BN → ReLU → Linear(4096, 256)
(``nn.heads.BYOL_PROJECTOR`` / ``BYOL_PREDICTOR``; widths ``proj_hidden``, ``proj_dim``, ``pred_hidden``). The
target network f_ξ, g_ξ (no predictor) is an exponential moving average of the online one (``nn.momentum``):

    ξ ← τ_k ξ + (1 − τ_k) θ,      τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2,      τ_base = 0.996

done in ``after_step``, after the optimiser step (eq. 3: θ ← optimizer(θ, ∇_θ L^BYOL), then ξ), with the online
weights just updated and k = ``info.step``, the 0-based step just taken, K = ``info.total``: the first update
uses τ_0 = τ_base, the last τ_{K−1}, as BYOL's ``_update_fn`` (byol_experiment.py) calls
``schedules.target_ema(global_step)`` after ``optax.apply_updates``. τ is a function of StepInfo alone, so a
resumed run uses the same values. ``tau_schedule=constant`` keeps τ_k = τ_base throughout (not the paper's: the
recipe of lightly's CIFAR-10 benchmark, ``configs/lightly/byol_cifar10.yaml``).

Loss (eq. 2). The per-pair loss is L = ‖q̄_θ(z_1) − z̄′_2‖² = 2 − 2 cos(q_θ(z_1), sg(z′_2)), x̄ = x/‖x‖, z′ the
target's projection; it is symmetrised by feeding v′ to the online network and v to the target, L^BYOL =
L + L̃. BYOL's code sums the two per-example losses and averages over the batch (``repr_loss``), which is
``byol_loss(q1, z′2) + byol_loss(q2, z′1)``: the logged ``loss``, in [0, 8]. Also logged: ``tau`` (the τ_k of
this step) and ``z_std``, the per-dimension std of the ℓ2-normalised online projections over the batch,
averaged over dimensions (≈ 1/√256 when spread out, 0 at collapse; SimSiam §4.1's monitor).

Views (App. B, Table 6): asymmetric, v from ``byol_1`` (blur p 1.0, no solarize), v′ from ``byol_2`` (blur
p 0.1, solarize p 0.2), both crop (0.08, 1) + flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2, at the
images' own size unless ``size`` is set.

Optimisation (``optim_defaults``, the 1000-epoch recipe): LARS (η 1e-3, momentum 0.9), lr 0.2 × batch/256,
weight decay 1.5e-6, biases and BN excluded from both weight decay and LARS adaptation, cosine decay after
10 warm-up epochs (BYOL used batch 4096 for 1000 epochs). The code's 300-epoch preset is lr 0.3, wd 1e-6,
τ_base 0.99 (configs/byol.py).

Where the paper leaves it open and the code decides, or the two differ:

- Target initialisation. The paper's Algorithm 1 takes "initial online and target parameters"; the code
  initialises them independently (``_make_initial_state``, a second rng; its comment reports no
  significant difference). We copy the online network (``MomentumEncoder``, as MoCo, solo-learn and
  lightly): then ξ is an average over θ's own trajectory from step 0, whereas an independent random
  network keeps a weight τ_base^k in the target, ~2 % after 1000 steps of a 300k-step ImageNet run but
  most of the target in a short run.
- Target BN. Unstated in the paper; the code runs the target with ``is_training=True``: batch statistics,
  and its own running statistics from its own passes, never averaged. We do the same (buffers "own").
- One pass per view. The code applies each network to view1 and view2 separately (``apply_once_fn``), so
  BN statistics are those of one view's batch; we do the same rather than one pass over both views.
- Not kept: the code's online linear classifier on sg(f_θ) (an evaluation aid; see ``evaluate/``), its
  target predictor (computed, never used) and cross-replica BN (our BN is per process under DDP).

``export()`` is the online backbone f_θ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.config import PROBABILITY, Range, one_of
from selfsup.errors import UserError
from selfsup.losses import byol_loss
from selfsup.methods.base import Method, StepInfo
from selfsup.nn.heads import BYOL_PREDICTOR, BYOL_PROJECTOR, build_head
from selfsup.nn.momentum import MomentumEncoder, byol_tau
from selfsup.views.augment import PRESETS, make_view


@dataclass
class BYOLConfig:
    tau_base: float = 0.996       # §3.2: τ_base of the 1000-epoch run (the code's 300-epoch preset: 0.99)
    tau_schedule: str = "cosine"  # cosine: §3.2's τ_k rising to 1; constant: τ_base throughout (lightly's benchmark)
    proj_hidden: int = 4096       # projector g: Linear(d, 4096) → BN → ReLU → Linear(4096, 256)
    proj_dim: int = 256           # the projection (and prediction) dimension
    pred_hidden: int = 4096       # predictor q: the same MLP on the projection
    view1: str = "byol_1"         # App. B, Table 6: T  (blur p 1.0, solarize p 0)
    view2: str = "byol_2"         #                  T′ (blur p 0.1, solarize p 0.2)
    size: int | None = None       # crop size; None = the images' own size


class BYOL(Method):
    name = "byol"
    summary = "BYOL (Grill et al. 2020): an online predictor regresses an EMA target's projection, no negatives"
    Config = BYOLConfig
    limits = {"tau_base": PROBABILITY, "tau_schedule": one_of("cosine", "constant"),
              "proj_hidden": Range(1), "proj_dim": Range(1), "pred_hidden": Range(1),
              "view1": one_of(*PRESETS), "view2": one_of(*PRESETS)}
    optim_defaults = dict(name="lars", lr=0.2, scale_lr=True, momentum=0.9, lars_eta=1e-3, weight_decay=1.5e-6,
                          exclude_norm_and_bias=True, warmup_epochs=10, schedule="cosine", final_lr_ratio=0.0)

    def __init__(self, backbone, cfg: BYOLConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.projector = build_head(backbone.out_dim, dataclasses.replace(
            BYOL_PROJECTOR, hidden_dim=cfg.proj_hidden, out_dim=cfg.proj_dim))
        self.predictor = build_head(cfg.proj_dim, dataclasses.replace(
            BYOL_PREDICTOR, hidden_dim=cfg.pred_hidden, out_dim=cfg.proj_dim))
        self.target_backbone = MomentumEncoder(backbone)          # ξ: copies of f_θ and g_θ, never trained
        self.target_projector = MomentumEncoder(self.projector)
        self.view_cfgs = (PRESETS[cfg.view1], PRESETS[cfg.view2])
        v1, v2 = self.view_cfgs
        if (v1.mean, v1.std) != (v2.mean, v2.std):
            raise UserError(f"method.view1={cfg.view1!r} and method.view2={cfg.view2!r} normalise images "
                            "differently; evaluation needs one normalisation: pick presets with the same mean/std")

    @classmethod
    def input_stats(cls, cfg: BYOLConfig) -> tuple[tuple, tuple, bool]:
        view = PRESETS[cfg.view1]
        if view.mean is None:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False
        return tuple(view.mean), tuple(view.std), False

    def tau(self, info: StepInfo) -> float:
        """τ_k of step k = ``info.step`` in a run of K = ``info.total`` steps (§3.2), or τ_base if constant."""
        if self.cfg.tau_schedule == "constant":
            return self.cfg.tau_base
        return byol_tau(info.step, info.total, self.cfg.tau_base)

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        size = self.cfg.size or images.shape[-1]
        v1, v2 = (dataclasses.replace(v, size=size) for v in self.view_cfgs)
        return {"x1": make_view(images, v1, g=g), "x2": make_view(images, v2, g=g)}

    def online_projection(self, x: torch.Tensor) -> torch.Tensor:
        """z = g_θ(f_θ(x))."""
        return self.projector(self.backbone(x)["pre_logits"])

    def target_projection(self, x: torch.Tensor) -> torch.Tensor:
        """z′ = g_ξ(f_ξ(x)), under no_grad: sg(z′)."""
        return self.target_projector(self.target_backbone(x)["pre_logits"])

    def forward(self, views: dict, info: StepInfo) -> dict:
        z1, z2 = self.online_projection(views["x1"]), self.online_projection(views["x2"])  # one BN batch per view
        t1, t2 = self.target_projection(views["x1"]), self.target_projection(views["x2"])
        loss = byol_loss(self.predictor(z1), t2) + byol_loss(self.predictor(z2), t1)      # L + L̃ (eq. 2)
        with torch.no_grad():
            z_std = torch.stack([F.normalize(z.float(), dim=1).std(0).mean() for z in (z1, z2)]).mean()
        return {"loss": loss, "tau": torch.tensor(self.tau(info)), "z_std": z_std, "state": {}}

    def after_step(self, state: dict, info: StepInfo) -> None:
        """ξ ← τ_k ξ + (1 − τ_k) θ with the weights the optimiser step of step k has just written."""
        tau = self.tau(info)
        self.target_backbone.update(self.backbone, tau)
        self.target_projector.update(self.projector, tau)

    def export(self) -> torch.nn.Module:
        """The online backbone f_θ (the target is discarded, §3.1)."""
        return self.backbone
