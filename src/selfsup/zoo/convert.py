"""Converters from published checkpoint layouts to a selfsup backbone file, so that any checkpoint is judged by
the same protocols (Ericsson et al. 2021 evaluate 13 published self-supervised ResNet-50s this way).

Ericsson et al.'s code (linusericsson/ssl-transfer, ``models/``) loads each model's state dict into torchvision's
ResNet-50 after stripping the wrapper's prefix: ``module.encoder_q.`` (MoCo, PCL), ``module.encoder.`` (InsDis,
PIRL, InfoMin) or ``module.`` (the SwAV family), and drops the heads; SimCLR's checkpoints take inputs without
mean/std normalisation. Our ResNets use torchvision's layout (``backbones/resnet.py``), so conversion is:
read the file safely (safetensors, or ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and
plain containers), take the state dict out of its wrapper (``state_dict`` / ``model`` / ``network`` keys), find
the prefix under which the backbone's keys are (tried: those above, ``backbone.``, ``encoder.``, ``model.``,
none), keep exactly the backbone's tensors (heads and projection layers dropped, counted), and write a
``.safetensors`` file with the architecture and input normalisation in its metadata, as ``train.loop`` exports.

Usage::

    selfsup convert moco_v2_800ep.pth.tar --backbone resnet50 --out zoo/moco-v2.safetensors
    selfsup convert simclr_r50.pth --backbone resnet50 --no-normalization --out zoo/simclr-v1.safetensors
    selfsup evaluate zoo/moco-v2.safetensors zoo/simclr-v1.safetensors --suite transfer_paper
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfsup import backbones
from selfsup.config import BackboneConfig
from selfsup.errors import UserError
from selfsup.train.checkpoint import read_safetensors
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD

PREFIXES = ("module.encoder_q.", "module.encoder.", "module.", "backbone.", "encoder.", "model.", "")
WRAPPERS = ("state_dict", "model", "network")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual training-script containers."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that holds more than tensors and plain containers
        raise UserError(f"{path}: not loadable with torch.load(weights_only=True) ({e}); re-save its state dict "
                        f"(torch.save(model.state_dict(), ...)) or as safetensors, then convert that") from e
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise UserError(f"{path}: no state dict found (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert(path: str | Path, out: str | Path, backbone: str = "resnet50", width: float = 1.0,
            normalization: bool = True, options: dict | None = None) -> dict:
    """Write ``out`` (a selfsup backbone file) from checkpoint ``path``; returns what was kept and dropped."""
    path, out = Path(path), Path(out)
    state = read_state_dict(path)
    arch = BackboneConfig(backbone, width, False, dict(options or {}))
    net = backbones.build(arch.name, width=arch.width, cifar_stem=arch.cifar_stem, **arch.options)
    wanted = net.state_dict()
    best, matched = "", {}
    for prefix in PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
        if len(found) > len(matched):
            best, matched = prefix, found
    missing = sorted(set(wanted) - set(matched))
    if missing:
        raise UserError(f"{path}: {len(missing)} of {backbone}'s {len(wanted)} tensors are not in the checkpoint "
                        f"under any known prefix (best {best!r}; first missing: {missing[:5]}); check --backbone "
                        f"and --width")
    for name, tensor in matched.items():
        if tensor.shape != wanted[name].shape:
            raise UserError(f"{path}: {best}{name} has shape {tuple(tensor.shape)}, {backbone} expects "
                            f"{tuple(wanted[name].shape)}; check --backbone and --width")
    net.load_state_dict(matched)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    meta = {"backbone": json.dumps(asdict(arch)), "method": f"converted:{path.name}", "format": "selfsup-1",
            "mean": json.dumps(list(mean)), "std": json.dumps(list(std)), "standardize": "false"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    dropped = sorted(k for k in state if not (k.startswith(best) and k[len(best):] in wanted))
    return {"prefix": best, "kept": len(matched), "dropped": len(dropped), "dropped_examples": dropped[:5]}
