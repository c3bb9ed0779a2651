"""Correlation with the source task (Ericsson et al. 2021, §4): Pearson and Spearman on logit-transformed
percentages, errors negated, computed here independently with scipy on constructed rows."""

import math

import numpy as np
import pytest
from scipy import stats

from selfsup.analysis.correlation import CLIP, correlations, logit_percent, transform
from selfsup.results.store import Result

SOURCE = {"a": 55.0, "b": 61.0, "c": 70.0, "d": 48.0, "e": 66.0}


def _row(model, dataset, protocol, metric, value, tap="pre_logits", config=None, ci=None, created=1.0):
    return Result(model, "h" + model, dataset, "test", protocol, tap, "c", metric, value, ci=ci,
                  config=config or {}, created=created)


def _logit(p):  # by hand, as the paper writes it
    q = p / 100
    return math.log(q / (1 - q))


def _source_rows():
    return [_row(m, "tiny", "linear", "top1", v) for m, v in SOURCE.items()]


def test_logit_by_hand_and_clipped():
    assert logit_percent(80.0) == pytest.approx(math.log(0.8 / 0.2))
    assert logit_percent(50.0) == 0.0
    assert logit_percent(0.0) == pytest.approx(_logit(CLIP)) and math.isfinite(logit_percent(0.0))
    assert logit_percent(100.0) == pytest.approx(-logit_percent(0.0))
    assert transform("top1", 25.0) == pytest.approx(math.log(1 / 3))
    assert transform("ece", 3.5) == -3.5 and transform("colour_error", 0.02) == -0.02


def test_pearson_and_spearman_match_scipy_on_logits():
    down = {"a": 81.0, "b": 79.0, "c": 90.5, "d": 70.0, "e": 85.0}
    rows = _source_rows() + [_row(m, "cifar10", "linear", "top1", v) for m, v in down.items()]
    (c,) = correlations(rows, source_dataset="tiny")
    models = sorted(SOURCE)
    x = [_logit(SOURCE[m]) for m in models]
    y = [_logit(down[m]) for m in models]
    assert (c.protocol, c.dataset, c.metric, c.n, c.shots) == ("linear", "cifar10", "top1", 5, None)
    assert c.pearson == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c.points == [(m, pytest.approx(xi), pytest.approx(yi)) for m, xi, yi in zip(models, x, y, strict=True)]
    # the logit changes Pearson (it is not linear), not Spearman (it is monotone)
    raw = stats.pearsonr([SOURCE[m] for m in models], [down[m] for m in models]).statistic
    assert abs(c.pearson - raw) > 1e-4


def test_error_metrics_are_negated_so_better_calibration_correlates_positively():
    ece = {"a": 6.0, "b": 5.0, "c": 2.0, "d": 9.0, "e": 3.0}       # better source model, lower ECE
    rows = _source_rows() + [_row(m, "flowers", "calibration", "ece", v) for m, v in ece.items()]
    (c,) = correlations(rows, "tiny")
    models = sorted(SOURCE)
    x = [_logit(SOURCE[m]) for m in models]
    y = [-ece[m] for m in models]
    assert c.metric == "ece" and c.spearman == pytest.approx(1.0)
    assert c.pearson == pytest.approx(stats.pearsonr(x, y).statistic) and c.pearson > 0
    assert [p[2] for p in c.points] == y


def test_one_correlation_per_shot_count_and_per_dataset():
    rows = _source_rows()
    rng = np.random.default_rng(0)
    for shots in (5, 20):
        for m in SOURCE:
            for dataset in ("eurosat", "flowers"):
                rows.append(_row(m, dataset, "fewshot", "accuracy", float(rng.uniform(40, 95)), ci=1.2,
                                 config={"ways": 5, "shots": shots, "queries": 15, "episodes": 600}))
    found = correlations(rows, "tiny")
    assert [(c.dataset, c.shots) for c in found] == [("eurosat", 5), ("eurosat", 20), ("flowers", 5), ("flowers", 20)]
    c = found[1]
    mine = {r.model: r.value for r in rows if r.dataset == "eurosat" and r.config.get("shots") == 20}
    models = sorted(SOURCE)
    x = [_logit(SOURCE[m]) for m in models]
    y = [_logit(mine[m]) for m in models]
    assert c.pearson == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c.spearman == pytest.approx(stats.spearmanr(x, y).statistic)


def test_fewer_than_three_models_other_taps_and_analyses_are_skipped():
    rows = _source_rows()
    rows += [_row(m, "dtd", "finetune", "top1", 50.0 + i) for i, m in enumerate("ab")]           # n = 2
    rows += [_row(m, "pets", "knn", "top1", 50.0 + i, tap="block3") for i, m in enumerate("abcde")]
    rows += [_row(m, "pets", "sensitivity", "colour", 0.1 * i) for i, m in enumerate("abcde")]
    rows += [_row("zz", "pets", "knn", "top1", 99.0)]                                           # no source figure
    rows += [_row(m, "pets", "knn", "top1", 40.0 + 3 * i) for i, m in enumerate("abc")]
    found = correlations(rows, "tiny")
    assert [(c.protocol, c.dataset, c.n) for c in found] == [("knn", "pets", 3)]
    assert "zz" not in {p[0] for p in found[0].points}
    assert correlations(rows, "tiny", protocols=("sensitivity",))[0].metric == "colour"


def test_one_row_per_model_prefers_default_probe_settings_then_newest():
    rows = _source_rows()
    rows.append(_row("a", "tiny", "linear", "top1", 99.0, config={"view": "tiles"}, created=5.0))  # not the source
    rows += [_row(m, "pets", "knn", "top1", 40.0 + 3 * i) for i, m in enumerate("abc")]
    rows.append(_row("c", "pets", "knn", "top1", 10.0, created=9.0))                              # re-run wins
    (c,) = correlations(rows, "tiny")
    points = {m: (x, y) for m, x, y in c.points}
    assert points["a"][0] == pytest.approx(_logit(55.0))
    assert points["c"][1] == pytest.approx(_logit(10.0))


def test_constant_side_gives_nan_not_a_warning():
    rows = _source_rows() + [_row(m, "pets", "knn", "top1", 50.0) for m in SOURCE]
    (c,) = correlations(rows, "tiny")
    assert math.isnan(c.pearson) and math.isnan(c.spearman)
