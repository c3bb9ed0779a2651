"""A sweep runs its grid, lands every figure with its cell's coordinates, and a re-run redoes nothing."""

import yaml

from selfsup.results.store import Store
from selfsup.sweep import run_sweep

SPEC = {
    "base": {"data": {"name": "sample"}, "backbone": {"cifar_stem": True},
             "method": {"name": "rotation", "size": 16},
             "train": {"steps": 2, "batch_size": 16, "progress": False}},
    "grid": {"method": ["rotation"], "backbone": ["resnet18"], "width": [0.125, 0.25], "seed": [0]},
    "evaluate": {"data": "sample", "protocols": ["knn"], "taps": ["block2", "pre_logits"]},
}


def test_sweep_runs_grid_and_resumes_without_redoing(tmp_path):
    spec = {**SPEC, "out": str(tmp_path / "runs")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = Store(tmp_path / "r.sqlite")
    log = []
    rows = run_sweep(path, store, log=log.append)
    assert len(rows) == 2 * 2                                    # 2 cells × 2 taps × 1 protocol
    assert {r.extra["cell"]["width"] for r in rows} == {0.125, 0.25}
    assert all(r.value > 10 for r in rows)                       # above chance on CIFAR-10

    # A sweep killed during the second cell: its figures are gone and its backbone was not exported yet.
    second = rows[-1].model
    store.db.execute("DELETE FROM results WHERE model = ?", (second,))
    store.db.commit()
    (tmp_path / "runs" / second / "backbone.safetensors").unlink()
    created = {r.model: r.created for r in store.query()}
    log.clear()
    again = run_sweep(path, store, log=log.append)
    assert any("in the store, skipped" in line for line in log)  # the first cell is not touched
    assert {r.model: r.created for r in store.query() if r.model != second} == created
    assert len(again) == 4 and len(store.query()) == 4
