"""Atomic checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``step-00001000/`` in ``<run>/checkpoints/`` holding

- ``model.safetensors``  the method's full ``state_dict`` (backbone, heads, memory banks, queues, EMA);
- ``optim.safetensors``  the optimizer's tensor state, flattened to ``state.<param>.<name>`` keys;
- ``meta.json``          step, the optimizer's non-tensor state (param groups) and free-form metadata.

It is first written to a temporary directory beside it, every file fsynced, then renamed into place:
a run killed at any instant (even by SIGKILL) leaves either the complete checkpoint or none, and
resume always finds the last complete one. A write that fails (disk full) removes its temporary copy
and leaves the previous checkpoint as it was. Nothing here unpickles: loading untrusted checkpoints is safe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfsup.durable import fsync_dir, write_json
from selfsup.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap next to disk I/O.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         meta: dict | None = None, keep: int = 2, state: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep only the ``keep`` newest ones. ``state`` replaces
    ``model.state_dict()`` (e.g. with sharded memory banks gathered whole)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_tensors(tmp / "model.safetensors", model.state_dict() if state is None else state)
        info = {"step": step, "meta": meta or {}}
        if optimizer is not None:
            tensors, info["optimizer"] = _flatten_optimizer(optimizer.state_dict())
            _write_tensors(tmp / "optim.safetensors", tensors)
        write_json(tmp / "meta.json", info)
        fsync_dir(tmp)
    except OSError as err:  # disk full, quota, I/O: the half-written copy goes, the previous checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(run_dir)
        raise UserError(f"could not write checkpoint {final} ({err.strerror or err}); "
                        f"{'the previous checkpoint ' + str(kept) + ' is intact' if kept else 'no checkpoint yet'}. "
                        f"Free space in {root.parent} and re-run the same command to resume") from err
    if final.exists():  # a re-save of the same step (e.g. the final one) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def size_estimate(model: torch.nn.Module, optimizer_slots: int) -> int:
    """Bytes of one checkpoint of ``model``: its state plus ``optimizer_slots`` tensors per parameter
    (momentum: 1, Adam: 2), for the free-space check before a run starts."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + optimizer_slots * params


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary leftovers of a killed save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; a corrupt, truncated or foreign file is a
    :class:`~selfsup.errors.UserError` naming it, not a parser traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise UserError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); re-export it "
                        f"or convert the source checkpoint (selfsup convert)") from err


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``module.load_state_dict(state)``, or a UserError naming ``path`` when its tensors belong to another
    architecture (missing keys, unexpected keys, other shapes)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path} does not fit {what}: {detail[:300]}{' ...' if len(detail) > 300 else ''}; pass "
                        f"the architecture it was trained with (check --backbone / --width)") from err


def load_meta(ckpt_dir: Path) -> dict:
    with open(Path(ckpt_dir) / "meta.json") as f:
        return json.load(f)


def load_model_state(ckpt_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return read_safetensors(Path(ckpt_dir) / "model.safetensors", device)[0]


def restore(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (and optimizer) state in place; returns the checkpoint's meta.json content."""
    ckpt_dir = Path(ckpt_dir)
    info = load_meta(ckpt_dir)
    device = next(model.parameters()).device
    load_into(model, load_model_state(ckpt_dir, device), ckpt_dir, f"this run's {type(model).__name__}")
    if optimizer is not None and "optimizer" in info:
        tensors = read_safetensors(ckpt_dir / "optim.safetensors", device)[0]
        state = _unflatten_optimizer(tensors, info["optimizer"])
        # JSON turned tuples (Adam's betas) into lists: give them back the optimizer's own types.
        for saved, current in zip(state["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
            for key, value in current.items():
                if isinstance(value, tuple) and isinstance(saved.get(key), list):
                    saved[key] = tuple(saved[key])
        optimizer.load_state_dict(state)
    return info
