"""Relative Patch Location (Doersch, Gupta, Efros 2015) as studied by Kolesnikov, Zhai, Beyer 2019 §3
("Relative Patch Location"; public code ``self_supervision/relative_patch_location.py``).

From the 3×3 grid of patches of an image, each of the 8 neighbours is paired with the centre patch,
the pair's embeddings are concatenated in the order (neighbour, centre) and an 8-way softmax predicts
which neighbour it was; all 8 pairs of every image are used (``generate_patch_locations``). Views,
embedding and head are ``methods.patch_task``'s.

Optimisation as their config (``config/relative_patch_location/imagenet.sh``): batch 128 images, SGD
momentum 0.9, lr 0.1 × batch/256, 5 warmup epochs, 35 epochs with ×0.1 at 15 and 25, weight decay 1e-4
(5e-4 on the fc head); ResNet-50 v1 at k = 8 (width 2.0) is their best model.
"""

from __future__ import annotations

import torch

from selfsup.methods.base import REVISITING_OPTIM
from selfsup.methods.patch_task import PatchTask, PatchTaskConfig

# (neighbour, centre) for the 8 neighbours of cell 4, row-major: the label of pair i is i.
PAIRS = torch.tensor([(i, 4) for i in range(9) if i != 4])


class RelativePatchLocation(PatchTask):
    name = "relative_patch"
    summary = "Relative Patch Location (Doersch et al. 2015; Kolesnikov et al. 2019 §3): 8-way neighbour position"
    Config = PatchTaskConfig
    optim_defaults = REVISITING_OPTIM
    num_classes = 8
    tuple_len = 2

    def tuples(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return PAIRS, torch.arange(len(PAIRS))
