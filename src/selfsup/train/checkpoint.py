"""Atomic checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``step-00001000/`` in ``<run>/checkpoints/`` holding

- ``model.safetensors``  the method's full ``state_dict`` (backbone, heads, memory banks, queues, EMA);
- ``optim.safetensors``  the optimizer's tensor state, flattened to ``state.<param>.<name>`` keys;
- ``meta.json``          step, the optimizer's non-tensor state (param groups) and free-form metadata.

It is first written to a temporary directory beside it, every file fsynced, then renamed into place:
a run killed at any instant (even by SIGKILL) leaves either the complete checkpoint or none, and
resume always finds the last complete one. Nothing here unpickles: loading untrusted checkpoints is safe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfsup.durable import fsync_dir, write_json

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
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_tensors(tmp / "model.safetensors", model.state_dict() if state is None else state)
    info = {"step": step, "meta": meta or {}}
    if optimizer is not None:
        tensors, info["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        _write_tensors(tmp / "optim.safetensors", tensors)
    write_json(tmp / "meta.json", info)
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. the final one) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_meta(ckpt_dir: Path) -> dict:
    with open(Path(ckpt_dir) / "meta.json") as f:
        return json.load(f)


def load_model_state(ckpt_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt_dir) / "model.safetensors"), device=str(device))


def restore(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (and optimizer) state in place; returns the checkpoint's meta.json content."""
    ckpt_dir = Path(ckpt_dir)
    info = load_meta(ckpt_dir)
    device = next(model.parameters()).device
    model.load_state_dict(load_model_state(ckpt_dir, device))
    if optimizer is not None and "optimizer" in info:
        tensors = load_file(str(ckpt_dir / "optim.safetensors"), device=str(device))
        state = _unflatten_optimizer(tensors, info["optimizer"])
        # JSON turned tuples (Adam's betas) into lists: give them back the optimizer's own types.
        for saved, current in zip(state["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
            for key, value in current.items():
                if isinstance(value, tuple) and isinstance(saved.get(key), list):
                    saved[key] = tuple(saved[key])
        optimizer.load_state_dict(state)
    return info
