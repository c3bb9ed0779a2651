"""Run configuration: dataclass schemas, YAML recipes and dotted ``key=value`` overrides.

Layering, later wins: schema defaults < the method's recommended optimiser settings < YAML file <
command-line flags < ``key=value`` overrides. Every run writes the resolved result to
``<out>/config.yaml``, so a run directory always says exactly what produced it.

Example::

    cfg = load_config("configs/small/simclr_cifar10.yaml", ["optim.lr=0.5", "method.temperature=0.2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import UnknownName, UserError


class ConfigError(UserError):
    """A config value of the wrong type, out of range, or at odds with another field or the data."""


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
    scale_lr: bool = True       # lr × global batch / 256 (lr_scaling=linear) or lr × √batch (sqrt)
    lr_scaling: str = "linear"  # linear (Goyal et al. 2017) | sqrt (SimCLR v2's 0.075·√batch)
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
    requeue: bool = False       # on SIGTERM / SIGUSR1: checkpoint, then `scontrol requeue $SLURM_JOB_ID`


@dataclass
class RunConfig:
    method: dict = field(default_factory=lambda: {"name": "simclr"})  # name + the method's own Config
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- types: every value is checked against its field's annotation as it is merged in -----------------


def _type_name(hint: Any) -> str:
    if hint in _NAMES:
        return _NAMES[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) < len(typing.get_args(hint)):  # Optional[X]
        return f"{_type_name(args[0]) if len(args) == 1 else ' or '.join(map(_type_name, args))} or null"
    if args:
        return " or ".join(map(_type_name, args))
    origin = typing.get_origin(hint)
    return _NAMES.get(origin, getattr(hint, "__name__", str(hint)))


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          tuple: "a list", dict: "a mapping"}


def _number(raw: Any) -> float | None:
    """A finite number from an int, a float or a numeric string (YAML reads ``1e-3`` as a string)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else math.nan


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` of field ``where``, or a :class:`ConfigError` naming both.

    Numbers may arrive as strings (``1e-3``, which YAML 1.1 leaves a string), integral floats become
    ints (``1e3`` steps), and NaN or infinity is never a valid setting.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if hint is Any or hint is object:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        number = _number(value)
        if number is not None and math.isnan(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if hint is float and number is not None:
            return number
        if hint is int and number is not None and number == int(number) and abs(number) < 2**63:
            return int(number)
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)   # e.g. train.precision=16 -> "16"
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list (e.g. {where}=[1,2]), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        if args:
            value = [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(value) if (hint is tuple or origin is tuple) else list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    return value


def unknown_key(key: str, where: str, known: list[str], kind: str = "config key") -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    plural = "keys" if kind == "config key" else "settings"
    return UnknownName(f"unknown {kind} {where}{key}{hint}; valid {plural}: {', '.join(known)}")


def _merge(target: Any, values: dict, where: str) -> Any:
    """Return a copy of dataclass ``target`` with ``values`` applied, recursing into nested ones."""
    if not is_dataclass(target):
        raise ConfigError(f"{where.rstrip('.')} is not a section")
    known = {f.name: f for f in fields(target)}
    hints = typing.get_type_hints(type(target))
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key(key, where, list(known))
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} is a section: give it a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        else:
            value = coerce(value, hints[key], f"{where}{key}")
        updates[key] = value
    return dataclasses.replace(target, **updates)


# ---- ranges: what each value may be, checked once the layers are merged ----------------------------


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` values pass (they mean "unset" / "the default")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is None:
            return
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, str) or not isinstance(v, (int, float)):
                continue  # a string field (a mode name) has no range
            below = self.low is not None and (v <= self.low if self.low_open else v < self.low)
            above = self.high is not None and (v >= self.high if self.high_open else v > self.high)
            if below or above:
                raise ConfigError(f"{where} must be {self}, got {value!r}")

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def check(self, value: Any, where: str) -> None:
        if value is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, self.choices))}, got {value!r}{hint}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FRACTION_BELOW_ONE = Range(0, 1, high_open=True)


def one_of(*choices: Any) -> OneOf:
    return OneOf(tuple(choices))


def typed(cls: type, values: dict, where: str, limits: dict | None = None, kind: str = "config key") -> Any:
    """An instance of dataclass ``cls`` from ``values``: unknown keys named (with the closest valid one),
    every value coerced to its field's type, then checked against ``limits`` (field -> Range | OneOf)."""
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise unknown_key(key, where, known, kind)
    hints = typing.get_type_hints(cls)
    obj = cls(**{k: coerce(v, hints[k], f"{where}{k}") for k, v in values.items()})
    check_limits(obj, limits or {}, where)
    return obj


# Protocol settings (knn.k=..., sgd.epochs=...): counts at least 1, every other number >= 0.
COUNTS = ("k", "epochs", "batch_size", "ways", "queries", "episodes", "hidden", "max_iter", "steps", "bins",
          "folds", "eval_every", "eval_batch", "shots")


def protocol_config(cls: type, values: dict, protocol: str) -> Any:
    """A protocol's config from ``protocol.key=value`` settings, typed and range-checked."""
    limits = {f.name: Range(1) if f.name in COUNTS else NON_NEGATIVE for f in fields(cls)}
    limits.update({"momentum": FRACTION_BELOW_ONE, "dropout": FRACTION_BELOW_ONE})
    return typed(cls, values, f"{protocol}.", {k: v for k, v in limits.items() if k in values},
                 kind=f"{protocol} setting")


def check_limits(obj: Any, limits: dict, where: str) -> None:
    """Check the fields of dataclass ``obj`` named in ``limits`` (field -> Range | OneOf)."""
    for name, rule in limits.items():
        if hasattr(obj, name):
            rule.check(getattr(obj, name), f"{where}{name}")


# The run config's own limits (the method's are declared beside its Config, as ``Method.limits``). Upper
# bounds catch typos of magnitude: a width of 1e6 or a 2**40 batch would only fail after minutes of setup.
LIMITS = {
    "backbone": {"width": Range(0, 64, low_open=True)},
    "data": {"size": Range(1, 8192), "per_class": Range(1), "on_error": one_of("raise", "skip"),
             "resident_bytes": NON_NEGATIVE},
    "optim": {"name": one_of("sgd", "lars", "adamw"), "lr": POSITIVE, "lr_scaling": one_of("linear", "sqrt"),
              "momentum": FRACTION_BELOW_ONE,
              "weight_decay": NON_NEGATIVE, "schedule": one_of("cosine", "step", "constant"),
              "warmup_epochs": NON_NEGATIVE, "final_lr_ratio": PROBABILITY, "milestones": NON_NEGATIVE,
              "gamma": POSITIVE, "lars_eta": POSITIVE, "betas": FRACTION_BELOW_ONE},
    "train": {"steps": Range(1), "epochs": POSITIVE, "batch_size": Range(1), "checkpoint_every": Range(1),
              "keep_checkpoints": Range(1), "log_every": Range(1), "accelerator": one_of("auto", "cpu", "cuda"),
              "num_nodes": Range(1)},
}


def validate(cfg: RunConfig) -> RunConfig:
    """Types, ranges and the rules between fields that need no data; returns ``cfg`` with the method's
    options typed (``method.temperature=0.2`` arrives as a float). Raises :class:`ConfigError`."""
    from selfsup import backbones, methods

    for section, limits in LIMITS.items():
        check_limits(getattr(cfg, section), limits, f"{section}.")
    if not cfg.data.name.strip():
        raise ConfigError("data.name (--data) is an empty string; pass a registered dataset name "
                          "(see `selfsup list datasets`) or a path to a zip, an ImageFolder folder or CIFAR pickles")
    t = cfg.train
    if isinstance(t.devices, str) and t.devices != "auto" and not t.devices.isdigit():
        raise ConfigError(f"train.devices must be a positive integer or 'auto', got {t.devices!r}")
    if isinstance(t.devices, int) and t.devices < 1:
        raise ConfigError(f"train.devices must be a positive integer or 'auto', got {t.devices!r}")
    if list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"optim.milestones must increase, got {cfg.optim.milestones!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.backbone.name not in backbones.available():
        raise UnknownName(_unknown("backbone", cfg.backbone.name, list(backbones.available())))
    if "name" not in cfg.method:
        raise ConfigError("method.name is missing; name a method (see `selfsup list methods`)")
    method = methods.get(cfg.method["name"])
    typed = dataclasses.asdict(method.make_config(cfg.method))   # types and the method's own limits
    # keep only the options given (a run directory records what was asked), typed, tuples as YAML lists
    given = {k: list(typed[k]) if isinstance(typed[k], tuple) else typed[k] for k in cfg.method if k != "name"}
    return dataclasses.replace(cfg, method={"name": cfg.method["name"], **given})


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; available: {', '.join(known)}"


def check_data(cfg: RunConfig, num_images: int, world: int = 1) -> None:
    """The rules between the config and the data it trains on, checked before the run directory is written."""
    t = cfg.train
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {world} processes")
    if t.batch_size > num_images:
        subset = f", data.per_class={cfg.data.per_class}" if cfg.data.per_class else ""
        raise ConfigError(f"train.batch_size={t.batch_size} exceeds the {num_images} images of {cfg.data.name} "
                          f"({cfg.data.split} split{subset}); pass --batch-size {min(num_images, 256)} or less")


def parse_overrides(pairs: list[str]) -> dict:
    """``["optim.lr=0.5", "method.temperature=0.2"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. optim.lr=0.5)")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r} has an empty key; write section.field=value (e.g. optim.lr=0.5)")
        node = nested
        *parents, leaf = parts
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} sets a field inside {part!r}, which is already a value")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {pair!r}: {raw!r} is not a YAML value ({err.problem})") from err
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
    raise UserError(f"config {name} is neither a file nor a shipped recipe; recipes: {', '.join(known)}")


def read_yaml(path: str | Path) -> dict:
    path = recipe_path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (method, backbone, data, optim, train)")
    return data


def build(*layers: dict) -> RunConfig:
    """Apply nested-dict layers in order on top of the schema defaults, then :func:`validate` the result."""
    cfg = RunConfig()
    for layer in layers:
        if layer:
            if not isinstance(layer, dict):
                raise ConfigError(f"a config layer must be a mapping of sections, got {layer!r}")
            cfg = _merge(cfg, layer, "")
    return validate(cfg)


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
