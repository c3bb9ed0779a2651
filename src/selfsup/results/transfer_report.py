"""The transfer sections of the report (Ericsson, Gouk, Hospedales 2021), called by ``build_report``.

Each builder takes every row of the store and returns HTML, or ``""`` when the store holds none of its rows:

- ``transfer_tables``: a models × datasets table per protocol (linear, kNN, finetune; pre-logits), the best
  cell of each column marked; few-shot as mean ± 95 % CI, one table per shot count (their Tables 2–4);
- ``correlation_section``: logit(source linear accuracy) against each downstream figure, one scatter panel
  per (protocol, dataset) with Pearson r and Spearman ρ in its title, and a table of both (their Fig. 2–4);
- ``calibration_section``: ECE raw and temperature-scaled per model and dataset, and reliability diagrams;
- ``features_kept_section``: colour against spatial sensitivity, occlusion saliency maps with their
  attentive diffusion, deep-image-prior inversions (original against inverted) with their colour error.

Rows come in the contracts of the evaluation side (see each builder); a row missing a field it needs for a
picture (a map, an image) is left out of that picture, never an error.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import math
from collections import defaultdict

import numpy as np

from selfsup.analysis.correlation import LOWER_IS_BETTER, correlations
from selfsup.results.report import _label, _png
from selfsup.results.store import Result

TRANSFER = ("linear", "knn", "finetune", "fewshot")
NAMES = {"linear": "many-shot linear", "knn": "kNN", "finetune": "finetune", "fewshot": "few-shot",
         "calibration": "calibration"}
PERTURBATIONS = ("hue", "saturation", "grayscale", "crop", "flip", "rotation")
MAX_EXAMPLES = 4  # saliency maps drawn per model


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _newest(rows: list[Result], key) -> dict:
    found: dict = {}
    for r in rows:
        k = key(r)
        if k not in found or r.created >= found[k].created:
            found[k] = r
    return found


def _best(values: list[float], metric: str) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def _cell(text: str, best: bool, title: str = "") -> str:
    attrs = (' class="best"' if best else "") + (f' title="{html.escape(title)}"' if title else "")
    return f"<td{attrs}>{text}</td>"


def _matrix(group: list[Result], caption: str) -> str:
    """Models × (dataset, metric) table, the best cell of each column marked."""
    label = lambda r: _label(r, skip=("shots",))  # noqa: E731
    value = _newest(group, lambda r: (label(r), r.dataset, r.metric))
    columns = sorted({(r.dataset, r.metric) for r in group})
    models = sorted({label(r) for r in group})
    best = {c: _best([r.value for (m, *k), r in value.items() if tuple(k) == c], c[1]) for c in columns}
    head = "".join(f"<th>{html.escape(d)}<br><small>{html.escape(m)}</small></th>" for d, m in columns)
    body = []
    for model in models:
        cells = []
        for dataset, metric in columns:
            r = value.get((model, dataset, metric))
            if r is None:
                cells.append("<td></td>")
                continue
            text = _num(r.value) + (f" ± {_num(r.ci)}" if r.ci is not None else "")
            title = ""
            if "best_lr" in r.extra:
                title = f"lr {r.extra['best_lr']}, wd {r.extra.get('best_wd')}"
            cells.append(_cell(text, r.value == best[(dataset, metric)], title))
        body.append(f"<tr><th>{html.escape(model)}</th>{''.join(cells)}</tr>")
    return (f"<h3>{html.escape(caption)}</h3><table><tr><th>model</th>{head}</tr>{''.join(body)}</table>")


def transfer_tables(rows: list[Result]) -> str:
    """Drawn when the store holds finetune or few-shot rows, or linear/kNN rows on more than one dataset.
    Few-shot rows: protocol ``fewshot``, metric ``accuracy`` (%), value = mean over episodes, ``ci`` =
    1.96·σ/√episodes, config ``{"ways", "shots", "queries", "episodes"}``. Finetune rows carry the chosen
    ``best_lr``/``best_wd`` in ``extra``, shown when hovering the cell."""
    mine = [r for r in rows if r.protocol in TRANSFER and r.tap == "pre_logits"]
    if not mine or (len({r.dataset for r in mine}) < 2 and not any(r.protocol in ("finetune", "fewshot")
                                                                     for r in mine)):
        return ""
    out = ["<h2>Transfer: models × datasets (pre-logits)</h2>"]
    for protocol in TRANSFER:
        group = [r for r in mine if r.protocol == protocol]
        if protocol != "fewshot":
            if group:
                out.append(_matrix(group, NAMES[protocol]))
            continue
        by_shots: dict = defaultdict(list)
        for r in group:
            by_shots[r.config.get("shots")].append(r)
        for shots, found in sorted(by_shots.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            ways = found[0].config.get("ways", "?")
            episodes = found[0].config.get("episodes", "?")
            out.append(_matrix(found, f"few-shot · {ways}-way {shots}-shot (mean ± 95 % CI over {episodes} episodes)"))
    return "\n".join(out)


def _order(protocol: str, shots: int | None) -> tuple:
    """Reading order: the transfer protocols as the paper lists them, then the rest by name."""
    return (TRANSFER.index(protocol) if protocol in TRANSFER else len(TRANSFER), protocol, shots or 0)


def correlation_section(rows: list[Result], source: str) -> str:
    """Ericsson et al.'s Fig. 2–4: per downstream (protocol[, shots]) a figure, per dataset a panel."""
    found = correlations(rows, source)
    if not found:
        return ""
    plt = _plt()
    out = [f"<h2>Correlation with the source task ({html.escape(source)} linear)</h2>",
           "<p>One point per model: logit of the source linear accuracy against the logit of the downstream "
           "figure (errors such as ECE negated instead), Pearson r and Spearman ρ across models "
           "(Ericsson et al. 2021, §4).</p>"]
    groups: dict[tuple, list] = defaultdict(list)
    for c in found:
        groups[(c.protocol, c.shots)].append(c)
    for (protocol, shots), cs in sorted(groups.items(), key=lambda kv: _order(*kv[0])):
        ncol = min(4, len(cs))
        nrow = math.ceil(len(cs) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 2.9 * nrow), squeeze=False)
        for ax, c in zip(axes.flat, cs, strict=False):
            _, x, y = zip(*c.points, strict=True)
            ax.scatter(x, y, s=14)
            for model, xi, yi in c.points:
                ax.annotate(model, (xi, yi), fontsize=5, xytext=(2, 2), textcoords="offset points")
            if np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                xs = np.array([min(x), max(x)])
                ax.plot(xs, slope * xs + intercept, color="grey", lw=0.8)
            ax.set_title(f"{c.dataset} ({c.metric})\nr = {_num(c.pearson)}, ρ = {_num(c.spearman)}", fontsize=8)
            ax.set_xlabel(f"logit({source} linear)", fontsize=7)
            ax.set_ylabel(f"−{c.metric}" if c.metric in LOWER_IS_BETTER else f"logit({c.metric})", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in axes.flat[len(cs):]:
            ax.set_visible(False)
        fig.tight_layout()
        name = NAMES.get(protocol, protocol) + (f" · {shots}-shot" if shots is not None else "")
        out.append(f"<h3>{html.escape(name)}</h3>{_png(fig)}")
    found = sorted(found, key=lambda c: (*_order(c.protocol, c.shots), c.dataset, c.metric))
    body = "".join(
        f"<tr><th>{html.escape(c.protocol)}</th><td>{'' if c.shots is None else c.shots}</td>"
        f"<td>{html.escape(c.dataset)}</td><td>{html.escape(c.metric)}</td><td>{c.n}</td>"
        f"<td>{_num(c.pearson)}</td><td>{_num(c.spearman)}</td></tr>" for c in found)
    out.append("<h3>Pearson r and Spearman ρ</h3><table><tr><th>protocol</th><th>shots</th><th>dataset</th>"
               f"<th>metric</th><th>models</th><th>r</th><th>ρ</th></tr>{body}</table>")
    return "\n".join(out)


def _reliability(r: Result) -> tuple[np.ndarray, np.ndarray] | None:
    """(confidence, accuracy) of the non-empty bins, in [0, 1] (percentages are divided by 100)."""
    rel = r.extra.get("reliability")
    try:
        conf, acc = (np.asarray(rel[k], dtype=float) for k in ("confidence", "accuracy"))
        count = np.asarray(rel.get("count", [1] * len(conf)), dtype=float)
        keep = (count > 0) & np.isfinite(conf) & np.isfinite(acc)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    if conf.shape != acc.shape or conf.shape != count.shape or not keep.any():
        return None
    conf, acc = conf[keep], acc[keep]
    scale = 100.0 if max(conf.max(), acc.max()) > 1.0 + 1e-6 else 1.0
    return conf / scale, acc / scale


def calibration_section(rows: list[Result]) -> str:
    """Rows: protocol ``calibration``, metrics ``ece`` and ``ece_scaled`` (%), ``extra["temperature"]`` and
    ``extra["reliability"]`` (15 bins of confidence, accuracy, count; raw on ``ece``, scaled on
    ``ece_scaled``)."""
    cal = [r for r in rows if r.protocol == "calibration" and r.metric in ("ece", "ece_scaled")]
    if not cal:
        return ""
    plt = _plt()
    value = _newest(cal, lambda r: (r.dataset, _label(r), r.metric))
    datasets = sorted({d for d, _, _ in value})
    out = ["<h2>Calibration</h2><p>Expected calibration error (15 bins, %) of the linear probe before and after "
           "temperature scaling; lower is better.</p>"]
    body = []
    for dataset in datasets:
        models = sorted({m for d, m, _ in value if d == dataset})
        best = {k: _best([value[(dataset, m, k)].value for m in models if (dataset, m, k) in value], k)
                for k in ("ece", "ece_scaled")}
        for m in models:
            raw, scaled = value.get((dataset, m, "ece")), value.get((dataset, m, "ece_scaled"))
            cells = [_cell(_num(r.value), r.value == best[k]) if r else "<td></td>"
                     for k, r in (("ece", raw), ("ece_scaled", scaled))]
            temperature = (scaled or raw).extra.get("temperature")
            t = _num(temperature, 3) if isinstance(temperature, int | float) else "—"
            body.append(f"<tr><th>{html.escape(dataset)}</th><th>{html.escape(m)}</th>{''.join(cells)}<td>{t}</td></tr>")
    out.append("<table><tr><th>dataset</th><th>model</th><th>ECE</th><th>ECE (temperature-scaled)</th>"
               f"<th>T</th></tr>{''.join(body)}</table>")
    most = max(len({m for d, m, _ in value if d == dataset}) for dataset in datasets)
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(3.2, 0.45 * most + 1.5) * len(datasets), 3.0),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        models = sorted({m for d, m, _ in value if d == dataset})
        pos = np.arange(len(models))
        for shift, (k, name) in zip((-0.2, 0.2), (("ece", "raw"), ("ece_scaled", "temperature-scaled")), strict=True):
            heights = [value[(dataset, m, k)].value if (dataset, m, k) in value else 0.0 for m in models]
            ax.bar(pos + shift, heights, width=0.4, label=name)
        ax.set_xticks(pos, models, rotation=60, ha="right", fontsize=6)
        ax.set_title(dataset, fontsize=8)
        ax.set_ylabel("ECE (%)")
        ax.legend(fontsize=6)
    out.append(f"<h3>ECE raw against temperature-scaled</h3>{_png(fig)}")
    curves = {key: c for key, r in value.items() if (c := _reliability(r)) is not None}
    drawn = sorted({d for d, _, _ in curves})
    if not drawn:
        return "\n".join(out)
    fig, axes = plt.subplots(len(drawn), 2, figsize=(6.4, 3.0 * len(drawn)), squeeze=False)
    for (raw_ax, scaled_ax), dataset in zip(axes, drawn, strict=True):
        for ax, k, name in ((raw_ax, "ece", "raw"), (scaled_ax, "ece_scaled", "temperature-scaled")):
            ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
            for (d, m, metric), curve in sorted(curves.items()):
                if (d, metric) == (dataset, k):
                    ax.plot(*curve, marker=".", lw=1, label=f"{m} ({_num(value[(d, m, metric)].value, 1)})")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{dataset} · {name}", fontsize=8)
            ax.set_xlabel("confidence", fontsize=7)
            ax.set_ylabel("accuracy", fontsize=7)
            if ax.lines[1:]:
                ax.legend(fontsize=5)
    fig.tight_layout()
    out.append(f"<h3>Reliability diagrams</h3>{_png(fig)}")
    return "\n".join(out)


def _image(data) -> np.ndarray | None:
    """An RGB array from a base64 PNG (optionally a data: URL), or None when it is not one."""
    if not isinstance(data, str):
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError):
        return None


def _map(data) -> np.ndarray | None:
    try:
        m = np.asarray(data, dtype=float)
    except (TypeError, ValueError):
        return None
    return m if m.ndim == 2 and m.size and np.isfinite(m).all() else None


def _sensitivity(rows: list[Result], plt) -> str:
    """Rows: protocol ``sensitivity``, tap pre_logits, metrics ``colour`` and ``spatial`` (normalised distance,
    1 = as far as another image), ``extra["per_perturbation"]``."""
    sens = [r for r in rows if r.protocol == "sensitivity" and r.tap == "pre_logits" and r.metric in ("colour",
                                                                                                      "spatial")]
    if not sens:
        return ""
    value = _newest(sens, lambda r: (r.dataset, _label(r), r.metric))
    datasets = sorted({d for d, _, _ in value})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.0 * len(datasets), 3.0), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        models = sorted({m for d, m, _ in value if d == dataset})
        pos = np.arange(len(models))
        for shift, k in zip((-0.2, 0.2), ("colour", "spatial"), strict=True):
            ax.bar(pos + shift, [value[(dataset, m, k)].value if (dataset, m, k) in value else 0.0 for m in models],
                   width=0.4, label=k)
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
        ax.set_xticks(pos, models, rotation=60, ha="right", fontsize=6)
        ax.set_title(dataset, fontsize=8)
        ax.set_ylabel("feature distance (1 = another image)", fontsize=7)
        ax.legend(fontsize=6)
    head = "".join(f"<th>{p}</th>" for p in PERTURBATIONS)
    body = []
    for dataset, model in sorted({(d, m) for d, m, _ in value}):
        per = {}
        for k in ("colour", "spatial"):
            r = value.get((dataset, model, k))
            if r is not None and isinstance(r.extra.get("per_perturbation"), dict):
                per.update(r.extra["per_perturbation"])
        cells = "".join(f"<td>{_num(value[(dataset, model, k)].value) if (dataset, model, k) in value else ''}</td>"
                        for k in ("colour", "spatial"))
        cells += "".join(f"<td>{_num(per[p]) if isinstance(per.get(p), int | float) else ''}</td>"
                         for p in PERTURBATIONS)
        body.append(f"<tr><th>{html.escape(dataset)}</th><th>{html.escape(model)}</th>{cells}</tr>")
    return ("<h3>Colour against spatial sensitivity</h3><p>Distance of the pre-logits features of a perturbed image "
            "from those of the original, normalised so that 1 is the distance to another image.</p>"
            f"{_png(fig)}<table><tr><th>dataset</th><th>model</th><th>colour</th><th>spatial</th>{head}</tr>"
            f"{''.join(body)}</table>")


def _saliency(rows: list[Result], plt) -> str:
    """Rows: protocol ``saliency``, metric ``attentive_diffusion`` (%), ``extra["maps"]`` (H'×W' lists) and
    ``extra["images"]`` (base64 PNG thumbnails of the same inputs)."""
    found = [r for r in rows if r.protocol == "saliency" and r.metric == "attentive_diffusion"]
    if not found:
        return ""
    value = _newest(found, lambda r: (r.dataset, _label(r)))
    out = ["<h3>Occlusion saliency</h3><p>Attentive diffusion: the share of the saliency map above its mean "
           "(higher = attention spread wider).</p>"]
    for dataset in sorted({d for d, _ in value}):
        mine = [(m, r) for (d, m), r in sorted(value.items()) if d == dataset]
        examples = []
        for model, r in mine:
            maps = [_map(m) for m in (r.extra.get("maps") or [])[:MAX_EXAMPLES]]
            images = list(r.extra.get("images") or [])
            pairs = [(m, _image(images[i]) if i < len(images) else None) for i, m in enumerate(maps) if m is not None]
            examples.append((model, r, pairs))
        ncol = max((len(p) for _, _, p in examples), default=0)
        body = "".join(f"<tr><th>{html.escape(m)}</th><td>{_num(r.value)}</td></tr>" for m, r, _ in examples)
        out.append(f"<h4>{html.escape(dataset)}</h4><table><tr><th>model</th><th>attentive diffusion (%)</th></tr>"
                   f"{body}</table>")
        drawn = [(m, r, p) for m, r, p in examples if p]
        if not ncol or not drawn:
            continue
        fig, axes = plt.subplots(len(drawn), ncol, figsize=(1.6 * ncol, 1.7 * len(drawn)), squeeze=False)
        for row_axes, (model, r, pairs) in zip(axes, drawn, strict=True):
            for ax in row_axes:
                ax.axis("off")
            for ax, (smap, image) in zip(row_axes, pairs, strict=False):
                h, w = image.shape[:2] if image is not None else smap.shape
                if image is not None:
                    ax.imshow(image)
                ax.imshow(smap, cmap="jet", alpha=0.5 if image is not None else 1.0, extent=(0, w, h, 0),
                          interpolation="bilinear")
            row_axes[0].set_title(f"{model}: {_num(r.value, 1)} %", fontsize=6, loc="left")
        fig.tight_layout()
        out.append(_png(fig))
    return "\n".join(out)


def _inversion(rows: list[Result], plt) -> str:
    """Rows: protocol ``inversion``, metric ``colour_error`` (mean per-channel MSE, [0, 1] units),
    ``extra["per_channel"]`` ([r, g, b]), ``extra["original"]`` and ``extra["inverted"]`` (base64 PNGs)."""
    found = [r for r in rows if r.protocol == "inversion" and r.metric == "colour_error"]
    if not found:
        return ""
    value = _newest(found, lambda r: (r.dataset, _label(r)))
    out = ["<h3>Inversion: original against inverted</h3><p>Deep-image-prior inversion of the last block; colour "
           "error = mean per-channel MSE between original and inversion (lower keeps more colour).</p>"]
    for dataset in sorted({d for d, _ in value}):
        mine = [(m, r) for (d, m), r in sorted(value.items()) if d == dataset]
        best = _best([r.value for _, r in mine], "colour_error")
        body = []
        for model, r in mine:
            channels = r.extra.get("per_channel") or []
            per = [_num(c, 4) if isinstance(c, int | float) else "" for c in list(channels)[:3]]
            per += [""] * (3 - len(per))
            body.append(f"<tr><th>{html.escape(model)}</th>{_cell(_num(r.value, 4), r.value == best)}"
                        + "".join(f"<td>{c}</td>" for c in per) + "</tr>")
        out.append(f"<h4>{html.escape(dataset)}</h4><table><tr><th>model</th><th>colour error</th><th>R</th>"
                   f"<th>G</th><th>B</th></tr>{''.join(body)}</table>")
        pictures = [(m, r, _image(r.extra.get("original")), _image(r.extra.get("inverted"))) for m, r in mine]
        pictures = [p for p in pictures if p[2] is not None or p[3] is not None]
        if not pictures:
            continue
        fig, axes = plt.subplots(len(pictures), 2, figsize=(3.6, 1.9 * len(pictures)), squeeze=False)
        for (left, right), (model, r, original, inverted) in zip(axes, pictures, strict=True):
            for ax, image, name in ((left, original, f"{model}: original"),
                                    (right, inverted, f"inverted, colour error {_num(r.value, 4)}")):
                ax.axis("off")
                if image is not None:
                    ax.imshow(image)
                ax.set_title(name, fontsize=6)
        fig.tight_layout()
        out.append(_png(fig))
    return "\n".join(out)


def features_kept_section(rows: list[Result]) -> str:
    """Ericsson et al. §5: what information the features keep (colour, spatial, attention, invertibility)."""
    if not any(r.protocol in ("sensitivity", "saliency", "inversion") for r in rows):
        return ""
    plt = _plt()
    parts = [_sensitivity(rows, plt), _saliency(rows, plt), _inversion(rows, plt)]
    return "\n".join(["<h2>What the features keep</h2>"] + [p for p in parts if p])


def transfer_sections(rows: list[Result], source: str) -> str:
    """Every transfer section the rows allow, in reading order."""
    parts = [transfer_tables(rows), correlation_section(rows, source), calibration_section(rows),
             features_kept_section(rows)]
    return "\n".join(p for p in parts if p)
