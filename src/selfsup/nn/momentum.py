"""The momentum (target) encoder of MoCo (He et al. 2020) and BYOL (Grill et al. 2020): an exponential
moving average of the online network's weights.

MoCo (§3.2, eq. 2) updates the key encoder after every step as

    θ_k ← m·θ_k + (1 − m)·θ_q,      m = 0.999

and BYOL (§3.1) its target as ξ ← τ·ξ + (1 − τ)·θ with τ rising from τ_base = 0.996 to 1 over training
(§3.2, App. A; ``byol_tau``). Both are ``MomentumEncoder.update(online, m)``, done in place with
``torch._foreach`` ops (the same arithmetic as the formula, one kernel per group of tensors).

The target starts as a deep copy of the online module, as in MoCo's code (``param_k.data.copy_(param_q.data)``);
BYOL's code initialises it independently and notes no significant difference. Its forward runs the copy
under ``torch.no_grad()``: the output is BYOL's sg(·) / MoCo's keys, and no activations are kept.

Buffers (BN running statistics) follow ``buffers``:

- ``"own"`` (default): left to the target's own forward passes, ``update`` never touches them. This is what
  both papers' code does: MoCo's ``_momentum_update_key_encoder`` loops over ``parameters()`` only, and
  BYOL's ``_update_fn`` averages ``target_params`` while ``target_state`` comes from the target's forward.
- ``"copy"``: copied from the online module at each update.
- ``"ema"``: floating-point buffers averaged with the same m; integer ones (``num_batches_tracked``) copied.

The target is a submodule, so ``state_dict()`` holds it (key prefix ``target.``) and a checkpoint resumes it
exactly. Its parameters have ``requires_grad=False``: they are among ``method.parameters()`` but never get a
gradient, and optimisers built from the parameters that require grad (``selfsup.train.optim``) skip them.

Example::

    self.key_encoder = MomentumEncoder(self.encoder)            # in Method.__init__
    k = F.normalize(self.key_encoder(views["key"]), dim=1)      # in forward: no grad
    self.key_encoder.update(self.encoder, 0.999)                # in after_step (BYOL: byol_tau(step, total))
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from selfsup.errors import UserError

BufferMode = Literal["own", "copy", "ema"]


def byol_tau(step: int, total: int, base: float = 0.996) -> float:
    """BYOL's target decay at step k of K: τ_k = 1 − (1 − τ_base)·(cos(π k / K) + 1) / 2, so τ_0 = τ_base and
    τ_K = 1. Steps past K give 1, as BYOL's ``schedules.target_ema`` (which clamps k at K)."""
    if total < 1 or step < 0:
        raise UserError(f"byol_tau needs 0 <= step and total >= 1 steps, got step={step}, total={total}")
    if not 0.0 <= base <= 1.0:
        raise UserError(f"the base target decay τ_base must be in [0, 1] (BYOL: 0.996), got {base}")
    k = min(step, total)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


class MomentumEncoder(nn.Module):
    """An EMA copy ``target`` of an online module; ``update(online, m)`` is θ_t ← m·θ_t + (1 − m)·θ_online."""

    def __init__(self, online: nn.Module, buffers: BufferMode = "own"):
        super().__init__()
        if buffers not in ("own", "copy", "ema"):
            raise UserError(f"buffers must be 'own', 'copy' or 'ema', got {buffers!r}")
        self.buffer_mode = buffers
        self.target = copy.deepcopy(online).requires_grad_(False)
        for p in self.target.parameters():
            p.grad = None

    def extra_repr(self) -> str:
        return f"buffers={self.buffer_mode!r}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.target(*args, **kwargs)

    def _paired(self, online: nn.Module, kind: str) -> tuple[list[Tensor], list[Tensor]]:
        mine, theirs = dict(getattr(self.target, kind)()), dict(getattr(online, kind)())
        if mine.keys() != theirs.keys():
            differ = sorted(mine.keys() ^ theirs.keys())[:4]
            raise ValueError(f"update() needs the module the target was copied from; their {kind} differ: {differ} "
                             f"(pass the unwrapped module, not a DDP wrapper)")
        return list(mine.values()), [theirs[name] for name in mine]

    @torch.no_grad()
    def update(self, online: nn.Module, m: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_online for every parameter, in place; buffers as ``buffer_mode`` says."""
        if not 0.0 <= m <= 1.0:
            raise UserError(f"the momentum m must be in [0, 1] (MoCo: 0.999, BYOL: byol_tau), got {m}")
        target, source = self._paired(online, "named_parameters")
        if target:
            torch._foreach_mul_(target, m)
            torch._foreach_add_(target, source, alpha=1.0 - m)
        if self.buffer_mode == "own":
            return
        for t, s in zip(*self._paired(online, "named_buffers"), strict=True):
            if self.buffer_mode == "ema" and t.is_floating_point():
                t.mul_(m).add_(s, alpha=1.0 - m)
            else:
                t.copy_(s)
