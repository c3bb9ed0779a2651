"""SimCLR v2 (Chen, Kornblith, Swersky, Norouzi, Hinton 2020b, "Big Self-Supervised Models are Strong
Semi-Supervised Learners", NeurIPS; SimCLR-v2 of Ericsson et al. 2021's model zoo, r50_1x_sk0).

SimCLR (``methods.simclr``: two views, NT-Xent of SimCLR eq. 1 over the global batch, ``losses.nt_xent``) with
what §2 ("Self-supervised pretraining with SimCLRv2") changes and the released code (google-research/simclr,
``tf2/``) implements:

- a deeper projector (§2 "increase the capacity of the non-linear network g(·)"; tf2/model.py ``ProjectionHead``,
  ``proj_head_mode=nonlinear``, ``num_proj_layers=3``, ``proj_out_dim=128``): Linear → BN → ReLU twice at the
  backbone's width, then Linear → BN (γ, no β) to 128, no biases on the linears (``nn.heads.SIMCLR_V2``);
- fine-tuning from the projector's first layer (§2, "we fine-tune from a middle layer of the projection head";
  tf2 ``ft_proj_selector``): ``export_projector_layers=1`` exports it with the backbone (below);
- the tf2/README ImageNet command, "the default hyperparameters in our paper": τ = 0.1, LARS, lr 0.075·√B
  (``learning_rate_scaling=sqrt``), weight decay 1e-4 with BN and biases excluded from decay and LARS
  (tf2 ``exclude_from_weight_decay``), 10 warm-up epochs (``warmup_epochs`` flag) then cosine to 0, momentum 0.9;
  the SimCLR views (colour jitter strength 1.0 with p 0.8, grayscale 0.2, blur p 0.5, crop 0.08–1: ``simclr``).

Where we differ, and why:

- Memory: §2 adds a MoCo-style memory (a momentum encoder's projections, a 64K buffer, "~1 %" linear-eval gain).
  The released code has none, and Ericsson et al.'s checkpoint comes from that code: we follow the code.
- lr scaling: the paper's square-root rule, ``optim.lr_scaling=sqrt``: lr = 0.075·√B (B = 256: 1.2; B = 4096:
  4.8, which is also 0.3 × 4096/256, the equivalence tf2/README states for linear scaling).
- Global BN (tf2 ``global_bn=True``): the backbone's and projector's BN see what the training loop gives them.

Export (``export_projector_layers``): 0 (default) writes the backbone, as SimCLR. 1 writes the backbone with the
projector's first layer as its representation layer (:meth:`Backbone.add_representation`): that layer's BN folded
into the Linear with its running statistics (exact in eval mode) and a ReLU after it, so the exported
``pre_logits`` is tf2's ``hiddens_list[1]`` = ReLU(BN(W₁ h)) and the backbone's own pooled vector stays readable as
the ``"pooled"`` tap. (Without the ReLU the layer would be an affine map of h: a linear probe on it would equal one
on h.) Fine-tuning the export trains an affine layer where tf2 trains Dense + BN. The module carries
``build_options`` (``representation_dim``, ``representation_relu``): the ``backbones.build`` options that rebuild it.
Deeper layers (tf2 ``ft_proj_selector`` 2, 3) would need a stack of representation layers and are refused.

Example::

    method = SimCLRv2(backbones.build("resnet50"), SimCLRv2Config(export_projector_layers=1), num_images)
    loss = method(method.views(images, index, g, info), info)["loss"]
    exported = method.export()          # a Backbone: taps {..., "pooled": 2048, "pre_logits": 2048}
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.base import Backbone
from selfsup.config import Range
from selfsup.errors import UserError
from selfsup.methods.simclr import SimCLR, SimCLRConfig
from selfsup.nn.heads import SIMCLR_V2, HeadSpec, build_head

# tf2/README's ImageNet pretraining command (learning_rate_scaling=sqrt): LARS, lr 0.075·√B (4.8 at B = 4096),
# weight decay 1e-4, no decay / LARS on BN and biases, 10 warm-up epochs,
# cosine to 0.
SIMCLR_V2_OPTIM = dict(name="lars", lr=0.075, scale_lr=True, lr_scaling="sqrt", momentum=0.9, weight_decay=1e-4,
                       exclude_norm_and_bias=True, warmup_epochs=10, schedule="cosine", final_lr_ratio=0.0)


@dataclass
class SimCLRv2Config(SimCLRConfig):
    temperature: float = 0.1          # tf2/README ImageNet command --temperature=0.1 (0.5 for CIFAR-10)
    proj_layers: int = 3              # tf2 --num_proj_layers=3 (§2: "3-layer projection head")
    export_projector_layers: int = 0  # 0: the backbone; 1: + the projector's first layer (§2, tf2 ft_proj_selector)


class ProjectorLayer(nn.Linear):
    """ReLU(W x + b): one projector layer Linear → BN → ReLU with the BN (eval mode) folded into W and b.
    Its state-dict keys are ``nn.Linear``'s, so it stands where a representation layer stands."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def fold_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with W' x + b' = BN(W x + b) in eval mode: s = γ / √(var + ε), W' = s W, b' = β + s (b − μ)."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    return linear.weight * scale[:, None], beta + scale * (bias - bn.running_mean)


class SimCLRv2(SimCLR):
    name = "simclr_v2"
    summary = "SimCLR v2 (Chen et al. 2020b): SimCLR with a 3-layer BN projector, τ 0.1, LARS 0.075·√B, wd 1e-4"
    Config = SimCLRv2Config
    limits = {**SimCLR.limits, "proj_layers": Range(1), "export_projector_layers": Range(0, 1)}
    optim_defaults = SIMCLR_V2_OPTIM

    def __init__(self, backbone, cfg: SimCLRv2Config, num_images: int):
        super().__init__(backbone, cfg, num_images)
        if cfg.export_projector_layers > cfg.proj_layers - 1:
            raise UserError(f"method.export_projector_layers={cfg.export_projector_layers} exports hidden projector "
                            f"layers, but method.proj_layers={cfg.proj_layers} leaves {cfg.proj_layers - 1}; use "
                            f"method.proj_layers=3 (the paper's) or method.export_projector_layers=0")
        # SimCLR built v1's 2-layer head; v2's replaces it (same attribute, so SimCLR's forward uses it)
        self.projector = build_head(backbone.out_dim, self.projector_spec(cfg))

    @staticmethod
    def projector_spec(cfg: SimCLRv2Config) -> HeadSpec:
        """``SIMCLR_V2`` with the configured width (None = the backbone's), output size and depth."""
        return dataclasses.replace(SIMCLR_V2, hidden_dim=cfg.proj_hidden, out_dim=cfg.proj_dim, layers=cfg.proj_layers)

    def export(self) -> Backbone:
        """The backbone, or (``export_projector_layers=1``) a copy of it whose ``pre_logits`` is the projector's
        first layer ReLU(BN(W₁ h)), BN folded in eval mode (see the module doc)."""
        if not self.cfg.export_projector_layers:
            return self.backbone
        linear, bn = self.projector[0], self.projector[1]
        net = copy.deepcopy(self.backbone)
        net.add_representation(linear.out_features)   # taps: the old pre-logits become "pooled"
        ref = linear.weight
        layer = ProjectorLayer(linear.in_features, linear.out_features, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            weight, bias = fold_bn(linear, bn)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        net.representation = layer
        net.build_options = {"representation_dim": linear.out_features, "representation_relu": True}
        return net
