"""Jigsaw puzzles (Noroozi & Favaro 2016) as studied by Kolesnikov, Zhai, Beyer 2019 §3 ("Jigsaw";
public code ``self_supervision/jigsaw.py``).

The 9 patch embeddings of an image are concatenated in the order of a permutation drawn from a set of
100 with maximal Hamming distance (``views.permutations.hamming_permutations``, Noroozi & Favaro's
greedy Algorithm 1, generated here with a fixed seed), and a 100-way softmax predicts which
permutation it was. As in their code, each training batch draws a subset of 8 permutations
(``perm_subset_size``) and applies all 8 to every image ("method 2" of their comment). Views,
embedding and head are ``methods.patch_task``'s; the head sees 9 × 1000 = 9000 inputs.

Optimisation as their config (``config/jigsaw/imagenet.sh``): the same as Relative Patch Location.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.config import Range
from selfsup.methods.base import REVISITING_OPTIM
from selfsup.methods.patch_task import PatchTask, PatchTaskConfig
from selfsup.views.permutations import hamming_permutations


@dataclass
class JigsawConfig(PatchTaskConfig):
    num_permutations: int = 100    # size of the maximal-Hamming set (the classes)
    perm_subset_size: int = 8      # permutations drawn per batch, each applied to every image
    permutation_seed: int = 0


class Jigsaw(PatchTask):
    name = "jigsaw"
    summary = "Jigsaw (Noroozi & Favaro 2016; Kolesnikov et al. 2019 §3): which of 100 maximal-Hamming orders"
    Config = JigsawConfig
    optim_defaults = REVISITING_OPTIM
    tuple_len = 9
    limits = {**PatchTask.limits, "num_permutations": Range(2, 362_880), "perm_subset_size": Range(1),
              "permutation_seed": Range(0)}

    def __init__(self, backbone, cfg: JigsawConfig, num_images: int):
        self.num_classes = cfg.num_permutations
        super().__init__(backbone, cfg, num_images)
        self.register_buffer("permutations", hamming_permutations(cfg.num_permutations, seed=cfg.permutation_seed))

    def tuples(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randperm(self.cfg.num_permutations, generator=g)[: self.cfg.perm_subset_size]
        return self.permutations.cpu()[labels], labels
