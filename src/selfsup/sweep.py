"""`selfsup sweep`: a grid of pretraining runs (method × backbone × width × seed) and their evaluation,
from one YAML file, that can be stopped and restarted at any point.

Example (``src/selfsup/configs/revisiting/small_sweep.yaml``)::

    out: runs/revisiting-small           # one run directory per cell below it
    base:                                # a config layer applied to every cell (sections as `pretrain`)
      data: {name: tinyimagenet100}
      backbone: {cifar_stem: true}
      train: {epochs: 5, batch_size: 64}
    grid:                                # the cells: the product of these lists
      method: [rotation, exemplar, relative_patch, jigsaw]
      backbone: [resnet50, resnet50_v2, revnet50, vgg19_bn]
      width: [0.25, 0.5, 1.0]
      seed: [0]
      # representation_dim: [512, 2048]  # optional: the representation-size study (backbone bottleneck)
      # method.lam: [0.0, 0.5, 1.0]      # optional: any dotted config field (ablations, e.g. PIRL's λ)
    evaluate:
      data: tinyimagenet100
      protocols:                         # protocol -> taps ("all" = every tap of the backbone, layer-wise)
        linear: all
        mlp: [pre_logits]
      train_per_class: 100               # optional: probe on a seeded subset of train (CPU-sized studies)
      max_dims: 2048                     # optional: bound on each pooled tap (default ~9,000, the paper's)
      resolution: 32                     # optional: evaluation resolution (default: the images' own)
      overrides: {linear: {max_iter: 50}}  # optional: protocol settings (as `selfsup evaluate`)
      # suite: transfer                  # or: every cell through a transfer suite (`evaluate --suite`) instead
      # random_init: true                # also evaluate a random-init copy of each architecture (same probes)

Cells are named ``method-backbone-wWIDTH[-rDIM][-FIELDvalue...]-sSEED-HASH`` (``FIELD`` the last part of a
dotted grid key: ``pirl-resnet18-w0.25-lam0.5-s0-…``), the hash of the cell's resolved config, so
changing any setting makes new cells rather than reusing old figures. A cell whose figures are all in
the results store is skipped without loading anything; a cell whose
pretraining was interrupted resumes from its last checkpoint (exact resume); an evaluation already in
the store is not recomputed. So re-running the same command after a kill finishes the grid and redoes
nothing. Every stored row carries the cell's coordinates in ``extra["cell"]`` and its pre-logits size in
``extra["pre_logits_dim"]`` for the report.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from selfsup import backbones, methods
from selfsup.config import build, config_hash, parse_overrides, read_yaml, to_dict
from selfsup.data.registry import resolve
from selfsup.errors import UnknownName
from selfsup.evaluate.features import MAX_DIMS, load_encoder, random_copy
from selfsup.evaluate.suite import evaluate_model
from selfsup.evaluate.transfer_suite import load_suite, run_suite
from selfsup.results.store import Store
from selfsup.train.loop import pretrain

GRID_KEYS = ("method", "backbone", "width", "seed", "representation_dim")


@dataclass
class Cell:
    method: str
    backbone: str
    width: float
    seed: int
    representation_dim: int | None = None  # Kolesnikov et al.'s representation-size study; None = the network's own
    options: tuple = ()  # (dotted config key, value) pairs from the grid's dotted keys, e.g. ("method.lam", 0.5)
    settings: str = ""   # hash of the cell's resolved config: other settings make another cell
    evaluate: dict | None = None  # its grid's own ``evaluate`` entries, over the sweep's

    @property
    def name(self) -> str:
        rep = f"-r{self.representation_dim}" if self.representation_dim else ""
        rep += "".join(f"-{key.rsplit('.', 1)[-1]}{value:g}" if isinstance(value, float) else
                       f"-{key.rsplit('.', 1)[-1]}{value}" for key, value in self.options)
        return f"{self.method}-{self.backbone}-w{self.width:g}{rep}-s{self.seed}-{self.settings}"

    def coordinates(self) -> dict:
        coords = {"method": self.method, "backbone": self.backbone, "width": self.width, "seed": self.seed}
        if self.representation_dim:
            coords["representation_dim"] = self.representation_dim
        coords.update(self.options)
        return coords


def cells(spec: dict) -> list[Cell]:
    """The product of the grid's lists; ``grid`` may also be a list of such mappings (a study that is not
    one product, e.g. every width for one architecture and one width for another), run in order; each may
    carry its own ``evaluate`` entries (e.g. layer-wise probes for some cells only)."""
    grids = spec.get("grid") or {}
    if isinstance(grids, list):
        found = [cell for grid in grids for cell in cells({**spec, "grid": grid})]
        return [cell for i, cell in enumerate(found) if cell not in found[:i]]
    dotted = [k for k in grids if "." in k]
    unknown = set(grids) - set(GRID_KEYS) - {"evaluate"} - set(dotted)
    if unknown:
        raise UnknownName(f"unknown grid key(s) {sorted(unknown)}; a grid has {', '.join(GRID_KEYS)} and dotted "
                          "config fields (e.g. method.lam)")
    grid, base = grids, spec.get("base", {})
    values = [grid.get("method") or [base.get("method", {}).get("name", "simclr")],
              grid.get("backbone") or [base.get("backbone", {}).get("name", "resnet18")],
              grid.get("width") or [base.get("backbone", {}).get("width", 1.0)],
              grid.get("seed") or [base.get("train", {}).get("seed", 0)],
              grid.get("representation_dim") or [None],
              *(grid[k] for k in dotted)]
    return [Cell(m, b, float(w), int(s), None if r is None else int(r), options=tuple(zip(dotted, rest, strict=True)),
                 evaluate=grids.get("evaluate"))
            for m, b, w, s, r, *rest in itertools.product(*values)]


def cell_config(spec: dict, cell: Cell):
    layer = {"method": {"name": cell.method}, "backbone": {"name": cell.backbone, "width": cell.width},
             "train": {"seed": cell.seed}}
    if cell.representation_dim:
        layer["backbone"]["options"] = {"representation_dim": cell.representation_dim}
    base = dict(spec.get("base", {}))
    # the grid's method replaces the base's; the base's method options apply only to that same method
    if base.get("method", {}).get("name") not in (None, cell.method):
        base = {k: v for k, v in base.items() if k != "method"}
    overrides = spec.get("overrides", {})  # keyed by method or by backbone name (the backbone's win)
    options = parse_overrides([f"{key}={json.dumps(value)}" for key, value in cell.options])  # the grid's own win
    return build({"optim": methods.get(cell.method).optim_defaults}, base, layer,
                 overrides.get(cell.method, {}), overrides.get(cell.backbone, {}), options)


def run_sweep(path: str | Path, store: Store, device: str = "cpu", log=print) -> list:
    spec = read_yaml(path)
    out = Path(spec.get("out", "runs/sweep"))
    defaults = {"data": None, "protocols": ["linear"], "taps": ["pre_logits"], "train_per_class": None,
                "overrides": {}, "max_dims": MAX_DIMS, "resolution": None, **spec.get("evaluate", {})}
    grid = cells(spec)
    configs = [cell_config(spec, cell) for cell in grid]   # a bad cell is refused before the first one trains
    rows = []
    for i, (cell, cfg) in enumerate(zip(grid, configs, strict=True), 1):
        ev = {**defaults, **(cell.evaluate or {})}
        # protocols: a list (each on ``taps``) or a mapping protocol -> taps
        plan = ev["protocols"] if isinstance(ev["protocols"], dict) else {p: ev["taps"] for p in ev["protocols"]}
        cell.settings = config_hash(to_dict(cfg))[:6]
        data = ev["data"] or cfg.data.name
        net = backbones.build(cfg.backbone.name, width=cfg.backbone.width, cifar_stem=cfg.backbone.cifar_stem,
                              **cfg.backbone.options)
        every = tuple(net.taps)
        taps = {p: every if t == "all" else tuple(t) for p, t in plan.items()}
        if ev.get("suite"):
            suite = load_suite(ev["suite"])
            needed = [(resolve(e.name).name, p, t) for e in suite.datasets for p in e.protocols for t in suite.taps]
        else:
            needed = [(resolve(data).name, p, t) for p in taps for t in taps[p]]
        if all(store.has(model=cell.name, dataset=d, protocol=p, tap=t) for d, p, t in needed):
            # (has() ignores the probe settings: change them and the cells are evaluated by `selfsup evaluate`)
            log(f"[{i}/{len(grid)}] {cell.name}: in the store, skipped")
            rows += store.query(model=cell.name)
            continue
        log(f"[{i}/{len(grid)}] {cell.name}: pretraining")
        start = time.perf_counter()
        run = pretrain(cfg, out / cell.name)
        encoder = load_encoder(run, label=cell.name)
        tags = {"cell": cell.coordinates(), "pre_logits_dim": net.out_dim, "sweep": str(path)}
        if ev.get("random_init"):   # the floor: one random copy per architecture, probed as the cells are
            floor = random_copy(encoder)
            floor.label = f"random-init {cfg.backbone.name}-w{cfg.backbone.width:g}"
        if ev.get("suite"):
            log(f"[{i}/{len(grid)}] {cell.name}: suite {suite.name}")
            for model, model_tags in [(encoder, tags)] + ([(floor, {"sweep": str(path)})] if ev.get("random_init")
                                                            else []):
                rows += run_suite([model], suite, store, device=device, log=log, overrides=ev["overrides"],
                                  tags=model_tags).rows
            log(f"[{i}/{len(grid)}] {cell.name}: done in {time.perf_counter() - start:.0f} s")
            continue
        for protocol, protocol_taps in taps.items():
            log(f"[{i}/{len(grid)}] {cell.name}: {protocol} on {data}, taps {', '.join(protocol_taps)}")
            rows += evaluate_model(encoder, data, [protocol], store, taps=protocol_taps, device=device,
                                   overrides=ev["overrides"], train_per_class=ev["train_per_class"],
                                   max_dims=ev["max_dims"], resolution=ev["resolution"], tags=tags)
            if ev.get("random_init"):
                rows += evaluate_model(floor, data, [protocol], store, taps=protocol_taps, device=device,
                                       overrides=ev["overrides"], train_per_class=ev["train_per_class"],
                                       max_dims=ev["max_dims"], resolution=ev["resolution"],
                                       tags={"sweep": str(path)})
        log(f"[{i}/{len(grid)}] {cell.name}: done in {time.perf_counter() - start:.0f} s")
    return rows
