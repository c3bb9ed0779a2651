"""The report is one self-contained page built from the store: tables with the best cell marked and the
sweep figures as inline PNGs."""

import re

from selfsup.results.report import build_report
from selfsup.results.store import Result, Store


def _row(model, tap, protocol, value, width, method="rotation"):
    cell = {"method": method, "backbone": "resnet18", "width": width, "seed": 0}
    return Result(model, "h" + model, "sample", "test", protocol, tap, "c", "top1", value, extra={"cell": cell})


def test_report_marks_best_and_draws_sweep_figures(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    rows = []
    for width, base in ((0.25, 30.0), (0.5, 35.0)):
        model = f"rot-w{width}"
        rows += [_row(model, "block2", "linear", base - 5, width), _row(model, "pre_logits", "linear", base, width),
                 _row(model, "pre_logits", "mlp", base + 1, width)]
    store.put(rows)
    page = build_report(store, tmp_path / "out").read_text()
    assert "http" not in page.replace("http-equiv", "")          # nothing fetched from the network
    assert '<td class="best">35.00</td>' in page and "<td>30.00</td>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4   # linear: width + layers; mlp: width; linear vs MLP
    assert all(len(i) > 1000 for i in images)


def test_empty_store_says_what_to_run(tmp_path):
    page = build_report(Store(tmp_path / "r.sqlite"), tmp_path / "report.html").read_text()
    assert "results store is empty" in page


def test_report_draws_representation_size_and_probe_epochs_and_separates_settings(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    rows = []
    for dim, value in ((128, 20.0), (512, 24.0), (2048, 27.0)):     # one width, three representation sizes
        cell = {"method": "rotation", "backbone": "resnet50", "width": 0.0625, "seed": 0}
        if dim != 128:
            cell["representation_dim"] = dim
        rows.append(Result(f"rot-{dim}", f"h{dim}", "tiny", "val", "linear", "pre_logits", "c", "top1", value,
                           extra={"cell": cell, "pre_logits_dim": dim}))
    curve = [[1, 10.0], [2, 15.0], [3, 18.0]]
    rows.append(Result("rot-128", "h128", "tiny", "val", "sgd", "pre_logits", "s", "top1", 18.0,
                       extra={"curve": curve}))
    rows.append(Result("rot-128", "h128", "tiny", "val", "linear", "pre_logits", "t", "top1", 19.0,
                       config={"view": "tiles"}))
    store.put(rows)
    page = build_report(store, tmp_path / "report.html").read_text()
    assert "Representation size at fixed width" in page and "Accuracy against probe epochs" in page
    assert "rot-128 (view=tiles)" in page                   # another measurement of the same model and tap
    assert "<td>19.00</td>" in page and "<td>20.00</td>" in page


def test_ablation_cells_get_their_own_figure_not_width_points(tmp_path, monkeypatch):
    from selfsup.results import report

    drawn = []
    real = report._ablations
    monkeypatch.setattr(report, "_ablations", lambda cells, plt: drawn.append(cells) or real(cells, plt))
    store = Store(tmp_path / "r.sqlite")
    rows = []
    for lam, value in ((0.0, 10.0), (0.5, 14.0), (1.0, 12.0)):
        cell = {"method": "pirl", "backbone": "resnet50", "width": 0.5, "seed": 0, "method.lam": lam}
        rows.append(Result(f"pirl-lam{lam}", f"h{lam}", "tiny", "val", "linear", "pre_logits", "c", "top1", value,
                           extra={"cell": cell}))
    store.put(rows)
    page = build_report(store, tmp_path / "report.html").read_text()
    assert "Ablations: top-1 against each ablated setting" in page
    assert "top-1 against width" not in page                  # three λ at one width are not a width curve
    points = {r.extra["cell"]["method.lam"]: r.value for r in drawn[0]}
    assert points == {0.0: 10.0, 0.5: 14.0, 1.0: 12.0}
