"""PIRL (Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant Representations", CVPR).

The representation of an image should not change under a pretext transformation t: an image branch
f(v_I) and a transformed branch g(v_I^t) are both pulled towards the image's memory-bank entry m_I and
pushed from N = 32,000 uniformly drawn entries m_I' (§3.2):

    L = λ · L_NCE(m_I, g(v_I^t)) + (1 − λ) · L_NCE(m_I, f(v_I)),    λ = 0.5        (eq. 5, ``losses.pirl_loss``)

with L_NCE of eq. 3–4 (τ = 0.07, Z fixed from the first batch as VISSL), and the bank updated from f only,
m_I ← normalise(0.5 m_I + 0.5 f(v_I)) (``methods.npid`` holds the bank, Z and the image branch).

Heads (§4.1; VISSL ``pirl_jigsaw_4node_resnet``): f = pooled pre-logits → linear 128. ``transform``:

- ``jigsaw`` (default, §4.1): nine tiles of a separate crop (``views.pirl_views.jigsaw_view``), shuffled by a
  random permutation, each through the same backbone → pre-logits → linear 128; the nine vectors
  concatenated in the shuffled order (1152) → linear 128. Each tile is its own BN batch member; the tiles
  and the images go through the backbone in separate passes, as VISSL feeds its two inputs.
- ``rotation`` (§5, "PIRL with other pretext tasks"): v_I rotated by 0/90/180/270° (uniform per image),
  g = pre-logits → linear 128 (its own head).
- ``jigsaw+rotation`` (§5, Rot+Jig): our reading, as the combination is not spelled out in eq. 5: both
  transformed branches are computed and each gives an L_NCE term against m_I with the same negatives; the
  two terms are averaged, so L = λ · ½ (L_jig + L_rot) + (1 − λ) · L_img and λ keeps its meaning.

``num_permutations`` (the analysis "Effect of the number of image transforms"): the paper varies how many
jigsaw permutations PIRL trains with, up to all 9!; which ones it keeps is not said, so a K-permutation run
draws from the first K rows of the same seeded greedy maximal-Hamming set the Jigsaw pretext task uses
(``views.permutations``), uniformly per image.

Choices, documented: the two (or three) terms share one draw of negatives per sample (eq. 4–5 name one set
D_N; VISSL draws a set per term), which halves the gathering. Z is estimated from the scores of all terms
together: VISSL estimates it from its first output (the patches), on the first batch, where every branch
faces the same random bank, so the expectation is the same; pooling keeps the ``every_step`` variant from
being driven by one branch (a transformed branch pushed away from a still-collapsed bank drives its own
mean exp(s/τ), hence Z, towards 0 and saturates the image term). The jigsaw geometry is PIRL's
255 / 85 / 64 scaled with the image crop (``pirl_geometry``). Defaults are the paper's: SGD momentum 0.9,
weight decay 1e-4 (none on BN and biases, as VISSL), cosine lr 0.12 at batch 1024 (0.03 × batch/256) →
1.2e-4, 800 epochs (400 and N = 4,096 in the ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import PROBABILITY, Range, one_of
from selfsup.losses import nce_scores, pirl_loss
from selfsup.methods.base import StepInfo
from selfsup.methods.npid import NPID, PIRL_OPTIM, NPIDConfig
from selfsup.views.augment import rotate90
from selfsup.views.permutations import hamming_permutations
from selfsup.views.pirl_views import jigsaw_view

TRANSFORMS = ("jigsaw", "rotation", "jigsaw+rotation")


@dataclass
class PIRLConfig(NPIDConfig):
    num_negatives: int = 32_000     # §4.1 (4,096 in the ablations)
    view: str = "pirl"              # the image branch's augmentation
    transform: str = "jigsaw"       # jigsaw | rotation | jigsaw+rotation
    lam: float = 0.5                # λ of eq. 5; 0 = NPID++
    jigsaw_scale: tuple = (0.6, 1.0)  # area scale of the jigsaw branch's random resized crop
    num_permutations: int | None = None  # None: all 9! orders; K: the first K maximal-Hamming ones (ablation)


class PIRL(NPID):
    name = "pirl"
    summary = "PIRL (Misra & van der Maaten 2020): jigsaw/rotation-invariant NCE against a memory bank (eq. 5)"
    Config = PIRLConfig
    limits = {**NPID.limits, "transform": one_of(*TRANSFORMS), "lam": PROBABILITY,
              "jigsaw_scale": Range(0, 1, low_open=True), "num_permutations": Range(1, 362_880)}
    optim_defaults = PIRL_OPTIM

    def __init__(self, backbone, cfg: PIRLConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        dim, e = backbone.out_dim, cfg.embed_dim
        self.jigsaw = "jigsaw" in cfg.transform
        self.rotation = "rotation" in cfg.transform
        # only the heads in use exist: DDP rejects parameters that never receive a gradient
        if self.jigsaw:
            self.tile_head = nn.Linear(dim, e)
            self.jigsaw_head = nn.Linear(9 * e, e)
        if self.rotation:
            self.rotation_head = nn.Linear(dim, e)
        # the ablation's fixed set: the greedy maximal-Hamming set of Noroozi & Favaro (seed 0), never trained
        self.permutations = None if cfg.num_permutations is None else hamming_permutations(cfg.num_permutations)

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        x = self.image_view(images, g)
        out = {"x": x, "index": index}
        if self.jigsaw:
            size = self.cfg.size or images.shape[-1]
            out["tiles"], out["perms"] = jigsaw_view(images, size, tuple(self.cfg.jigsaw_scale), g=g,
                                                     permutations=self.permutations)
            out["perms"] = out["perms"].to(x.device)
        if self.rotation:
            k = torch.randint(0, 4, (x.shape[0],), generator=g, device=g.device)
            out["rotated"], out["rotation"] = rotate90(x, k), k.to(x.device)
        out["negatives"] = self.negatives(index, g)
        return out

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """B × 9 × C × p × p tiles → B × 9 × 128: each tile through the backbone and the shared linear head."""
        b, n = tiles.shape[:2]
        return self.tile_head(self.backbone(tiles.flatten(0, 1))["pre_logits"]).view(b, n, -1)

    def jigsaw_embedding(self, tiles: torch.Tensor) -> torch.Tensor:
        """g(v_I^t): the nine tile vectors concatenated in the order the tiles come (the shuffled one) → 128."""
        return F.normalize(self.jigsaw_head(self.tile_features(tiles).flatten(1)).float(), dim=1)

    def rotation_embedding(self, rotated: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.rotation_head(self.backbone(rotated)["pre_logits"]).float(), dim=1)

    def forward(self, views: dict, info: StepInfo) -> dict:
        f = self.embed(views["x"])
        transformed = []
        if self.jigsaw:
            transformed.append(self.jigsaw_embedding(views["tiles"]))
        if self.rotation:
            transformed.append(self.rotation_embedding(views["rotated"]))
        positive, negatives = self.bank_entries(views)
        t_scores = [nce_scores(t, positive, negatives, self.cfg.temperature) for t in transformed]
        i_scores = nce_scores(f, positive, negatives, self.cfg.temperature)
        z = self.z(torch.cat([*t_scores, i_scores]))   # one Z for all terms, from all their scores
        loss = pirl_loss(i_scores, t_scores, self.num_images, self.cfg.lam, z)
        with torch.no_grad():  # how close g(v_I^t) and f(v_I) are: the invariance PIRL asks for
            invariance = torch.stack([(t * f).sum(1).mean() for t in transformed]).mean()
        return {"loss": loss, **self.diagnostics(t_scores[0], z), "image_acc": self.diagnostics(i_scores, z)
                ["pretext_acc"], "invariance": invariance, "state": {"index": views["index"], "f": f.detach()}}
