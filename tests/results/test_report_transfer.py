"""The transfer sections of the report (Ericsson et al. 2021): models × datasets tables, correlation with the
source task, calibration and what the features keep, from rows in the contracts the evaluation side writes;
any subset of them renders, and a row missing a picture's data is left out of the picture.

``rows_of_every_kind`` is also the store that test_report_browser.py opens in Chromium."""

import base64
import io
import re

import numpy as np
import pytest
from scipy import stats

from selfsup.analysis.correlation import logit_percent
from selfsup.results.report import build_report
from selfsup.results.store import Result, Store

SOURCE = {"supervised": 62.0, "byol": 58.5, "simclr": 55.0, "moco": 49.0}  # tinyimagenet100 linear top-1
SECTIONS = ("selfsup report", "Results", "Transfer: models × datasets (pre-logits)", "many-shot linear", "kNN",
            "finetune", "few-shot · 5-way 5-shot", "few-shot · 5-way 20-shot",
            "Correlation with the source task (tinyimagenet100 linear)", "Pearson r and Spearman ρ", "Calibration",
            "ECE raw against temperature-scaled", "Reliability diagrams", "What the features keep",
            "Colour against spatial sensitivity", "Occlusion saliency", "Inversion: original against inverted",
            "Architecture study (sweep cells)", "Accuracy against probe epochs",
            "Invariance to the jigsaw transformation (PIRL Fig. 4)")


def _png_b64(seed: int, size: int = 32) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def rows_of_every_kind() -> list[Result]:
    """Four models measured by every protocol of the transfer study, plus the Revisiting/PIRL kinds."""
    rng = np.random.default_rng(0)
    rows = []

    def row(model, dataset, protocol, metric, value, tap="pre_logits", split="test", config=None, extra=None,
            ci=None):
        rows.append(Result(model, "h" + model, dataset, split, protocol, tap, "c" + str(len(rows)), metric,
                           float(value), ci=ci, config=config or {}, extra=extra or {}))

    for i, (model, top1) in enumerate(SOURCE.items()):
        row(model, "tinyimagenet100", "linear", "top1", top1)
        row(model, "cifar10", "linear", "top1", top1 + 25 + rng.normal())
        row(model, "flowers102", "linear", "mean_per_class", top1 + 20 + 3 * rng.normal())
        row(model, "cifar10", "knn", "top1", top1 + 18 + rng.normal())
        grid = [[lr, wd, 50.0 + 10 * rng.random(), 5000] for lr in (0.1, 0.01) for wd in (0.0, 1e-5)]
        row(model, "cifar10", "finetune", "top1", top1 + 30, extra={"best_lr": 0.01, "best_wd": 1e-5, "grid": grid})
        row(model, "flowers102", "finetune", "mean_per_class", top1 + 28,
            extra={"best_lr": 0.1, "best_wd": 0.0, "grid": grid})
        for dataset in ("eurosat", "flowers102"):
            for shots in (5, 20):
                row(model, dataset, "fewshot", "accuracy", 50 + shots + i + rng.normal(), split="all", ci=0.8,
                    config={"ways": 5, "shots": shots, "queries": 15, "episodes": 600})
        confidence = list(np.linspace(0.03, 0.97, 15))
        for metric, ece, shift in (("ece", 8.0 - i, 0.1), ("ece_scaled", 2.0 - 0.3 * i, 0.02)):
            row(model, "cifar10", "calibration", metric, ece,
                extra={"temperature": 1.5 + 0.1 * i,
                       "reliability": {"confidence": [None, None] + confidence[2:],  # two empty bins
                                       "accuracy": [None, None] + [c - shift for c in confidence[2:]],
                                       "count": [0, 0] + [100] * 13}})
        per = {"hue": 0.1 * i, "saturation": 0.05, "grayscale": 0.2, "crop": 0.5, "flip": 0.1, "rotation": 0.7}
        row(model, "cifar10", "sensitivity", "colour", 0.2 + 0.05 * i, extra={"per_perturbation": per})
        row(model, "cifar10", "sensitivity", "spatial", 0.6 - 0.05 * i, extra={"per_perturbation": per})
        maps = [rng.random((7, 7)).tolist() for _ in range(2)]
        row(model, "cifar10", "saliency", "attentive_diffusion", 40 + i,
            extra={"maps": maps, "images": [_png_b64(10 * i + k) for k in range(2)]})
        row(model, "cifar10", "inversion", "colour_error", 0.02 + 0.01 * i,
            extra={"per_channel": [0.02, 0.03, 0.01 + 0.01 * i], "original": _png_b64(100 + i),
                   "inverted": _png_b64(200 + i)})
    for width, base in ((0.25, 30.0), (0.5, 35.0)):  # a Kolesnikov et al. sweep
        cell = {"method": "rotation", "backbone": "resnet18", "width": width, "seed": 0}
        for tap, protocol, value in (("block2", "linear", base - 5), ("pre_logits", "linear", base),
                                     ("pre_logits", "mlp", base + 1)):
            row(f"rot-w{width}", "sample", protocol, "top1", value, tap=tap, extra={"cell": cell})
    row("rot-w0.5", "sample", "sgd", "top1", 33.0, extra={"curve": [[1, 20.0], [2, 28.0], [3, 33.0]]})
    counts = rng.integers(0, 50, 20).tolist()
    row("pirl", "sample", "invariance", "l2_unit", 0.4, tap="heads",
        extra={"counts": counts, "edges": np.linspace(0, 2, 21).tolist()})
    return rows


def _page(tmp_path, rows, **kw) -> str:
    store = Store(tmp_path / "r.sqlite")
    store.put(rows)
    return build_report(store, tmp_path / "report.html", **kw).read_text(encoding="utf-8")


def _headings(page: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h[1-4]>(.*?)</h[1-4]>", page)]


def _table_after(page: str, heading: str) -> str:
    start = page.index(f"<h3>{heading}")
    return page[start:page.index("</table>", start)]


@pytest.fixture(scope="module")
def full_page(tmp_path_factory) -> str:
    """The page of a store holding every kind of row, built with the CLI's arguments (store, directory)."""
    tmp = tmp_path_factory.mktemp("full")
    store = Store(tmp / "r.sqlite")
    store.put(rows_of_every_kind())
    return build_report(store, tmp).read_text(encoding="utf-8")


def test_every_section_is_there_and_best_cells_are_marked(full_page):
    page = full_page
    headings = _headings(page)
    for section in SECTIONS:
        assert any(h.startswith(section) for h in headings), section
    five = _table_after(page, "few-shot · 5-way 5-shot")
    assert "20-shot" not in five and len(re.findall(r"<td[^>]*>\d+\.\d\d ± 0\.80</td>", five)) == 8
    assert len(re.findall(r'<td class="best">\d+\.\d\d ± 0\.80</td>', five)) == 2   # one per dataset
    assert '<td class="best" title="lr 0.01, wd 1e-05">92.00</td>' in page             # finetune: 62 + 30
    ece = _table_after(page, "cifar10 · calibration · ece")
    assert '<td class="best">5.00</td>' in ece                                      # an error: lowest is best
    assert 'class="best"' not in _table_after(page, "cifar10 · sensitivity · colour")  # a description: none
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == page.count("<img ") >= 10 and all(len(i) > 1000 for i in images)


def test_correlation_table_matches_scipy_on_logits(full_page, tmp_path):
    rows = rows_of_every_kind()
    table = _table_after(full_page, "Pearson r and Spearman ρ")
    assert "tinyimagenet100 linear" in full_page                       # the default source
    models = sorted(SOURCE)
    down = {r.model: r.value for r in rows if (r.protocol, r.dataset) == ("linear", "flowers102")}
    x = [logit_percent(SOURCE[m]) for m in models]
    y = [logit_percent(down[m]) for m in models]
    r, rho = stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic
    assert (f"<td>flowers102</td><td>mean_per_class</td><td>4</td><td>{r:.2f}</td><td>{rho:.2f}</td>" in table)
    assert table.count("<tr>") == 1 + 11   # linear ×2, knn, finetune ×2, few-shot 2 datasets × 2 shots, ece ×2
    assert "tinyimagenet100</td><td>top1" not in table                 # the source is not its own downstream
    elsewhere = _page(tmp_path, [r for r in rows if r.protocol == "linear"], source="cifar10")
    assert "Correlation with the source task (cifar10 linear)" in elsewhere


TABLES = "Transfer: models × datasets (pre-logits)"
KINDS = {  # the sections each kind of row draws alone (no source rows: no correlation)
    "linear": [TABLES],            # two datasets
    "knn": [],                     # one dataset: the Results table says it all
    "finetune": [TABLES],
    "fewshot": [TABLES],
    "calibration": ["Calibration", "Reliability diagrams"],
    "sensitivity": ["What the features keep", "Colour against spatial sensitivity"],
    "saliency": ["What the features keep", "Occlusion saliency"],
    "inversion": ["What the features keep", "Inversion: original against inverted"],
}
SHOWN = {s for found in KINDS.values() for s in found} | {"Correlation with the source task"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_any_one_kind_renders_its_sections_alone(tmp_path, kind):
    every = rows_of_every_kind()
    source = [r for r in every if r.dataset == "tinyimagenet100"]
    rows = [r for r in every if r.protocol == kind and r.dataset != "tinyimagenet100"]
    headings = _headings(_page(tmp_path, rows))
    assert {s for s in SHOWN if any(h.startswith(s) for h in headings)} == set(KINDS[kind])
    headings = _headings(_page(tmp_path / "with_source", rows + source))
    correlated = kind in ("linear", "knn", "finetune", "fewshot", "calibration")
    assert any(h.startswith("Correlation with the source task") for h in headings) == correlated


def test_missing_or_broken_picture_data_is_left_out(tmp_path):
    rows = [
        Result("a", "ha", "cifar10", "test", "calibration", "pre_logits", "c", "ece", 7.5),  # no scaled row, no bins
        Result("b", "hb", "cifar10", "test", "calibration", "pre_logits", "c", "ece", 6.0,
               extra={"reliability": {"confidence": [None, 50.0, 90.0], "accuracy": [None, 40.0, 70.0],
                                      "count": [0, 3, 4]}}),  # in %, an empty bin None (calibration.py)
        Result("a", "ha", "cifar10", "test", "saliency", "pre_logits", "c", "attentive_diffusion", 40.0,
               extra={"maps": [[[0.1, 0.2], [0.3, 0.4]], "not a map"], "images": ["not base64!"]}),
        Result("b", "hb", "cifar10", "test", "saliency", "pre_logits", "c", "attentive_diffusion", 41.0),
        Result("a", "ha", "cifar10", "test", "inversion", "pre_logits", "c", "colour_error", 0.03,
               extra={"original": "data:image/png;base64," + _png_b64(1), "inverted": "aGVsbG8="}),
        Result("b", "hb", "cifar10", "test", "inversion", "pre_logits", "c", "colour_error", 0.05),
        Result("a", "ha", "cifar10", "test", "sensitivity", "pre_logits", "c", "colour", 0.3),   # no spatial
    ]
    page = _page(tmp_path, rows)
    headings = _headings(page)
    for section in ("Calibration", "Reliability diagrams", "Occlusion saliency", "Inversion: original against inverted",
                    "Colour against spatial sensitivity"):
        assert any(h.startswith(section) for h in headings), section
    assert "<th>cifar10</th><th>a</th><td>7.50</td><td></td><td>—</td>" in page   # raw only, no temperature
    assert page.count("<img ") == 5   # ECE bars, reliability, sensitivity, one saliency row, one inversion pair
    no_bins = _headings(_page(tmp_path / "no_bins", rows[:1]))
    assert "Calibration" in no_bins and "Reliability diagrams" not in no_bins

