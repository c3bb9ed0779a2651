"""`selfsup pretrain` and `selfsup evaluate` on the real datasets under the data root (about 75 s: decodes
all of CIFAR-10 and Tiny ImageNet-100 once)."""

import pytest
from conftest import requires_data

from selfsup.cli import main
from selfsup.results.store import Store


@requires_data
@pytest.mark.parametrize("dataset", ["cifar10", "tinyimagenet100"])
def test_pretrain_and_evaluate_through_the_data_root(tmp_path, dataset):
    run = tmp_path / dataset
    assert main(["pretrain", "rotation", "--data", dataset, "--backbone", "resnet18", "--width", "0.125",
                 "--cifar-stem", "--steps", "3", "--batch-size", "16", "--out", str(run), "--no-progress",
                 "method.size=16"]) == 0
    assert main(["evaluate", str(run), "--data", dataset, "--protocol", "knn", "--protocol", "linear",
                 "--store", str(tmp_path / "r.sqlite")]) == 0
    rows = Store(tmp_path / "r.sqlite").query(dataset=dataset)
    chance = 100 / {"cifar10": 10, "tinyimagenet100": 100}[dataset]
    assert sorted(r.protocol for r in rows) == ["knn", "linear"]
    assert all(r.value > chance for r in rows)  # even 3 steps of training leave features above chance
