"""Run configuration: dataclass schemas, YAML recipes and dotted ``key=value`` overrides.

Layering, later wins: schema defaults < the method's recommended optimiser settings < YAML file <
command-line flags < ``key=value`` overrides. Every run writes the resolved result to
``<out>/config.yaml``, so a run directory always says exactly what produced it.

Example::

    cfg = load_config("configs/small/simclr_cifar10.yaml", ["optim.lr=0.5", "method.temperature=0.2"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    width: float = 1.0          # 1.0 = the published network (Kolesnikov et al.'s k=4 for ResNets)
    cifar_stem: bool = False    # 3x3 stride-1 root conv, no max-pool, for 32-64 px inputs
    options: dict = field(default_factory=dict)  # extra keyword arguments of backbones.build


@dataclass
class DataConfig:
    name: str = "sample"        # a registered dataset name or a path (folder, zip, CIFAR pickles)
    split: str = "train"
    size: int | None = None     # decode-time resolution (shorter side + centre crop); None = native
    per_class: int | None = None  # pretrain on a seeded, class-balanced subset of this many images per class
    on_error: str = "raise"     # "raise" on an undecodable image, or "skip" and count it
    resident_bytes: int = 2 << 30  # keep the uint8 images on the device when they fit under this


@dataclass
class OptimConfig:
    name: str = "sgd"           # sgd | lars | adamw
    lr: float = 0.1
    scale_lr: bool = True       # lr × global batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    exclude_norm_and_bias: bool = False  # no weight decay (and no LARS adaptation) on 1-d params
    schedule: str = "cosine"    # cosine | step | constant
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.0  # cosine floor as a fraction of the base lr
    milestones: list = field(default_factory=list)  # epochs, for schedule=step
    gamma: float = 0.1
    lars_eta: float = 0.001
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainConfig:
    steps: int | None = None    # total optimisation steps; or
    epochs: float | None = None  # epochs over the pretraining split (steps wins when both are set)
    batch_size: int = 256       # global batch (split across devices)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    accelerator: str = "auto"   # auto | cpu | cuda
    devices: int | str = 1
    num_nodes: int = 1
    precision: str = "auto"     # auto = bf16-mixed on GPU, 32-true on CPU
    compile: bool = False
    channels_last: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    method: dict = field(default_factory=lambda: {"name": "simclr"})  # name + the method's own Config
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _merge(target: Any, values: dict, where: str) -> Any:
    """Return a copy of dataclass ``target`` with ``values`` applied, recursing into nested ones."""
    if not is_dataclass(target):
        raise TypeError(f"{where} is not a section")
    known = {f.name: f for f in fields(target)}
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise KeyError(f"unknown config key {where}{key!r}; valid keys: {', '.join(known)}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"{where}{key} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        updates[key] = value
    return dataclasses.replace(target, **updates)


def parse_overrides(pairs: list[str]) -> dict:
    """``["optim.lr=0.5", "method.temperature=0.2"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not of the form key=value (e.g. optim.lr=0.5)")
        key, raw = pair.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


RECIPES = Path(__file__).resolve().parent / "configs"


def recipe_path(name: str | Path) -> Path:
    """A YAML path, or the name of a recipe shipped in selfsup/configs (``small/simclr_cifar10``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))
    raise FileNotFoundError(f"config {name} is neither a file nor a shipped recipe; recipes: {', '.join(known)}")


def read_yaml(path: str | Path) -> dict:
    path = recipe_path(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections (method, backbone, data, optim, train)")
    return data


def build(*layers: dict) -> RunConfig:
    """Apply nested-dict layers in order on top of the schema defaults."""
    cfg = RunConfig()
    for layer in layers:
        if layer:
            cfg = _merge(cfg, layer, "")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    return build(base or {}, read_yaml(path) if path else {}, parse_overrides(overrides or []))


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def config_hash(values: dict) -> str:
    """Short stable hash of a JSON-able mapping (used to key results and caches)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tmp.replace(path)
