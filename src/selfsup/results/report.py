"""`selfsup report`: one self-contained HTML page (inline PNG figures, no network) built from the results
store, never from printed output.

What it draws depends on what the store holds:

- always: a table per (dataset, protocol) of models × taps, the best value of each column marked;
- for sweep rows (``extra["cell"]``, Kolesnikov et al. 2019's study): top-1 against width per method, one
  panel per architecture (their Fig. 2/3); top-1 by layer per architecture (their layer-wise figure);
  linear against MLP probe, one point per model (their "linear and MLP probes rank alike"); top-1 against
  representation size at a fixed width (their representation-size study);
- for invariance rows (``selfsup invariance``, PIRL §4.1 Fig. 4): the histograms of the distances between
  f(v_I) and g(v_I^t), one line per model;
- for SGD-probe rows (``extra["curve"]``): test top-1 against probe epochs, one panel per model, with the
  converged L-BFGS figure of the same tap dashed (their schedule study: the SGD probe needs long training);
- for transfer rows (Ericsson et al. 2021; ``transfer_report.py``): models × datasets tables per protocol
  (few-shot as mean ± CI, one table per shot count), the correlation of each downstream figure with the
  ``source`` dataset's linear accuracy (scatters with r and ρ, and a table), calibration (ECE raw against
  temperature-scaled, reliability diagrams) and what the features keep (colour against spatial sensitivity,
  saliency maps, inversions).

Rows of one model and tap measured with other probe settings (``view``, ``train_per_class``, ``max_dims``,
few-shot ``shots``) get their own table row, labelled with those settings. The best cell of a column is the
highest, or the lowest for an error metric (ECE, colour error); descriptive figures (colour and spatial
sensitivity, attentive diffusion) have none.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

from selfsup.analysis.correlation import LOWER_IS_BETTER
from selfsup.results.store import Result, Store

TAP_ORDER = ("after_root", "block1", "block2", "block3", "block4", "fc6", "pooled", "pre_logits")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


UNRANKED = frozenset({"colour", "spatial", "attentive_diffusion"})  # descriptions, no better direction: no best cell
SETTINGS_SHOWN = ("view", "train_per_class", "max_dims", "shots")  # settings that make a row another measurement


def _label(r: Result, skip: tuple[str, ...] = ()) -> str:
    shown = [f"{k}={r.config[k]}" for k in SETTINGS_SHOWN if k in r.config and k not in skip]
    return r.model + (f" ({', '.join(shown)})" if shown else "")


def _tables(rows: list[Result]) -> str:
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.protocol, r.metric)].append(r)
    parts = []
    for (dataset, protocol, metric), group in sorted(groups.items()):
        taps = sorted({r.tap for r in group}, key=lambda t: (TAP_ORDER.index(t) if t in TAP_ORDER else 99, t))
        models = sorted({_label(r) for r in group})
        value = {(_label(r), r.tap): r for r in group}
        pick = min if metric in LOWER_IS_BETTER else max
        best = {} if metric in UNRANKED else {
            t: pick((value[(m, t)].value for m in models if (m, t) in value), default=None) for t in taps}
        head = "".join(f"<th>{html.escape(t)}</th>" for t in taps)
        body = []
        for m in models:
            cells = []
            for t in taps:
                r = value.get((m, t))
                if r is None:
                    cells.append("<td></td>")
                    continue
                text = f"{r.value:.2f}" + (f" ± {r.ci:.2f}" if r.ci else "")
                cells.append(f'<td class="best">{text}</td>' if r.value == best.get(t) else f"<td>{text}</td>")
            body.append(f"<tr><th>{html.escape(m)}</th>{''.join(cells)}</tr>")
        parts.append(f"<h3>{html.escape(dataset)} · {html.escape(protocol)} · {html.escape(metric)}</h3>"
                     f"<table><tr><th>model</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(parts)


def _sweep_figures(rows: list[Result]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [r for r in rows if "cell" in r.extra and "representation_dim" in r.extra["cell"]]
    cells = [r for r in rows if "cell" in r.extra and "representation_dim" not in r.extra["cell"]]
    if not cells and not sized:
        return ""
    out = ["<h2>Architecture study (sweep cells)</h2>"]
    archs = sorted({r.extra["cell"]["backbone"] for r in cells})
    for protocol in sorted({r.protocol for r in cells}):
        # ablation cells (dotted grid keys) share a width: they get their own figure, not a width point
        pre = [r for r in cells if r.protocol == protocol and r.tap == "pre_logits" and not _options(r)]
        if pre:
            fig, axes = plt.subplots(1, len(archs), figsize=(3.2 * len(archs), 2.8), squeeze=False, sharey=True)
            for ax, arch in zip(axes[0], archs, strict=True):
                for method in sorted({r.extra["cell"]["method"] for r in pre}):
                    pts = sorted((r.extra["cell"]["width"], r.value) for r in pre
                                 if r.extra["cell"]["backbone"] == arch and r.extra["cell"]["method"] == method)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
                ax.set_title(arch)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("width")
            axes[0][0].set_ylabel(f"{protocol} top-1 (pre-logits)")
            axes[0][-1].legend(fontsize=7)
            out.append(f"<h3>{html.escape(protocol)}: top-1 against width</h3>{_png(fig)}")
        layered = [r for r in cells if r.protocol == protocol and r.tap != "pre_logits"]
        if layered:
            fig, axes = plt.subplots(1, len(archs), figsize=(3.2 * len(archs), 2.8), squeeze=False, sharey=True)
            for ax, arch in zip(axes[0], archs, strict=True):
                mine = [r for r in cells if r.protocol == protocol and r.extra["cell"]["backbone"] == arch]
                taps = sorted({r.tap for r in mine}, key=lambda t: (TAP_ORDER.index(t) if t in TAP_ORDER else 99, t))
                for model in sorted({r.model for r in mine}):
                    pts = sorted((taps.index(r.tap), r.value) for r in mine if r.model == model)
                    if len(pts) > 1:  # a model probed on its pre-logits alone has no layer curve
                        ax.plot(*zip(*pts, strict=True), marker=".", label=model)
                ax.set_xticks(range(len(taps)), taps)
                ax.set_title(arch)
                ax.tick_params(axis="x", rotation=60, labelsize=7)
                ax.legend(fontsize=6)
            axes[0][0].set_ylabel(f"{protocol} top-1")
            out.append(f"<h3>{html.escape(protocol)}: top-1 by layer</h3>{_png(fig)}")
    pairs = defaultdict(dict)
    for r in cells + sized:
        if r.tap == "pre_logits" and r.protocol in ("linear", "mlp"):
            pairs[r.model][r.protocol] = r.value
    both = [(v["linear"], v["mlp"]) for v in pairs.values() if len(v) == 2]
    if both:
        fig, ax = plt.subplots(figsize=(3.2, 3.2))
        ax.scatter(*zip(*both, strict=True))
        lo, hi = min(min(p) for p in both), max(max(p) for p in both)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.5)
        ax.set_xlabel("linear top-1")
        ax.set_ylabel("MLP top-1")
        out.append(f"<h3>Linear against MLP probe (one point per model)</h3>{_png(fig)}")
    out.append(_representation_size(cells + sized, plt))
    out.append(_ablations(cells, plt))
    return "\n".join(out)


def _options(r: Result) -> dict:
    """A sweep cell's ablation settings: its dotted grid keys (``method.lam`` ...)."""
    return {k: v for k, v in r.extra["cell"].items() if "." in k}


def _ablations(cells: list[Result], plt) -> str:
    """Top-1 (pre-logits) against each ablated setting (a dotted grid key such as PIRL's ``method.lam``), one
    line per (protocol, method, backbone, width, the other settings), drawn where the setting takes 2+ values."""
    lines: dict[tuple, list] = defaultdict(list)
    for r in cells:
        opts = _options(r)
        if r.tap != "pre_logits" or not opts:
            continue
        c = r.extra["cell"]
        for key, value in opts.items():
            rest = tuple(sorted((k, v) for k, v in opts.items() if k != key))
            lines[(key, r.protocol, c["method"], c["backbone"], c["width"], rest)].append((value, r.value))
    keys = sorted({k[0] for k, pts in lines.items() if len({v for v, _ in pts}) > 1})
    if not keys:
        return ""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for (k, protocol, method, backbone, width, rest), pts in sorted(lines.items(), key=str):
            if k == key and len({v for v, _ in pts}) > 1:
                label = f"{method} {backbone} w{width:g} {protocol}" + "".join(f" {a}={b}" for a, b in rest)
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label)
        ax.set_xlabel(key)
        if key.endswith("negatives") or key.endswith("permutations"):
            ax.set_xscale("log")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("top-1 (pre-logits)")
    return f"<h3>Ablations: top-1 against each ablated setting</h3>{_png(fig)}"


def _representation_size(rows: list[Result], plt) -> str:
    """Top-1 (pre-logits) against the representation's size, one line per (method, backbone, width) that
    was trained at more than one size: the native size (tag ``pre_logits_dim``) and the bottleneck ones."""
    lines: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.tap == "pre_logits" and "pre_logits_dim" in r.extra:
            c = r.extra["cell"]
            lines[(c["method"], c["backbone"], c["width"])][r.protocol].append((r.extra["pre_logits_dim"], r.value))
    lines = {k: v for k, v in lines.items() if any(len({d for d, _ in pts}) > 1 for pts in v.values())}
    if not lines:
        return ""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for (method, backbone, width), by_protocol in sorted(lines.items()):
        for protocol, pts in sorted(by_protocol.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=f"{method} {backbone} w{width:g} ({protocol})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("representation size (pre-logits dims)")
    ax.set_ylabel("top-1 (pre-logits)")
    ax.legend(fontsize=6)
    return f"<h3>Representation size at fixed width</h3>{_png(fig)}"


def _invariance(rows: list[Result]) -> str:
    """PIRL's Fig. 4: per dataset and BN mode (``selfsup invariance --bn``), the distance histogram of every model
    (as densities, so splits of any size compare), the legend giving each model's mean distance."""
    found = [r for r in rows if r.protocol == "invariance" and "counts" in r.extra]
    if not found:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ["<h2>Invariance to the jigsaw transformation (PIRL Fig. 4)</h2>"]
    def bn(r):
        return r.config.get("bn", "running")

    for dataset, mode in sorted({(r.dataset, bn(r)) for r in found}):
        fig, ax = plt.subplots(figsize=(4.5, 3.0))
        for r in sorted((r for r in found if r.dataset == dataset and bn(r) == mode), key=lambda r: (r.model, r.tap)):
            counts, edges = r.extra["counts"], r.extra["edges"]
            total = sum(counts) or 1
            ax.stairs([c / total for c in counts], edges, label=f"{r.model} ({r.tap}): mean {r.value:.2f}")
        ax.set_xlabel("l2 distance of unit f(v_I) and g(v_I^t)")
        ax.set_ylabel("fraction of images")
        ax.legend(fontsize=6)
        out.append(f"<h3>{html.escape(dataset)} · BN {mode} statistics</h3>{_png(fig)}")
    return "\n".join(out)


def _probe_epochs(rows: list[Result]) -> str:
    """Test top-1 of the SGD probe after every epoch, one panel per model and dataset, a line per tap; the
    L-BFGS probe's figure for the same model, dataset and tap is drawn dashed in the same colour."""
    curves = [r for r in rows if r.protocol == "sgd" and r.extra.get("curve")]
    if not curves:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lbfgs = {(r.model, r.dataset, r.tap): r.value for r in rows if r.protocol == "linear"}
    panels = sorted({(r.model, r.dataset) for r in curves})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.0), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], panels, strict=True):
        mine = sorted((r for r in curves if (r.model, r.dataset) == (model, dataset)),
                      key=lambda r: TAP_ORDER.index(r.tap) if r.tap in TAP_ORDER else 99)
        for r in mine:
            (line,) = ax.plot(*zip(*r.extra["curve"], strict=True), label=r.tap)
            if (model, dataset, r.tap) in lbfgs:
                ax.axhline(lbfgs[(model, dataset, r.tap)], color=line.get_color(), ls="--", lw=0.8)
        ax.set_title(f"{model} · {dataset}", fontsize=8)
        ax.set_xlabel("probe epoch")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("SGD probe test top-1 (dashed: L-BFGS)")
    return f"<h2>Accuracy against probe epochs</h2>{_png(fig)}"


STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f4f4f4} td.best{font-weight:bold;
background:#e6f4e6} img{max-width:100%}"""


def build_report(store: Store, out: str | Path, source: str = "tinyimagenet100") -> Path:
    """Write ``out`` (an .html file, or a directory that gets report.html) from every row of the store;
    ``source`` is the pretraining dataset whose linear accuracy the transfer figures are correlated with."""
    from selfsup.results.transfer_report import transfer_sections  # it draws with this module's helpers
    out = Path(out)
    if out.suffix != ".html":
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = store.query()
    body = _tables(rows) if rows else "<p>The results store is empty: run selfsup bench, evaluate or sweep.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>selfsup report</title><style>{STYLE}"
            f"</style></head><body><h1>selfsup report</h1><p>{len(rows)} results from {html.escape(str(store.path))}"
            f"</p><h2>Results</h2>{body}{transfer_sections(rows, source)}{_sweep_figures(rows)}{_probe_epochs(rows)}"
            f"{_invariance(rows)}</body></html>")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
