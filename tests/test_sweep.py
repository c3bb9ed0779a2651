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


def test_grids_in_a_list_run_in_order_and_cells_carry_their_settings():
    from selfsup.sweep import cell_config, cells

    spec = {"base": {"train": {"epochs": 1}},
            "grid": [{"method": ["rotation", "jigsaw"], "backbone": ["resnet50"], "width": [0.125]},
                     {"method": ["rotation"], "backbone": ["vgg19_bn"], "width": [0.125]},
                     {"method": ["rotation"], "backbone": ["resnet50"], "width": [0.125]},   # a repeat: once
                     {"method": ["rotation"], "backbone": ["resnet50"], "width": [0.0625],
                      "representation_dim": [512, 2048], "evaluate": {"protocols": ["linear"]}}],
            "overrides": {"jigsaw": {"train": {"batch_size": 128}},
                          "vgg19_bn": {"optim": {"weight_decay": 5e-4}}}}
    grid = cells(spec)
    assert [(c.method, c.backbone, c.width, c.representation_dim) for c in grid] == [
        ("rotation", "resnet50", 0.125, None), ("jigsaw", "resnet50", 0.125, None),
        ("rotation", "vgg19_bn", 0.125, None),
        ("rotation", "resnet50", 0.0625, 512), ("rotation", "resnet50", 0.0625, 2048)]
    rot, jig, vgg, r512, _ = (cell_config(spec, c) for c in grid)
    assert rot.optim.weight_decay == 1e-4 and vgg.optim.weight_decay == 5e-4      # keyed by backbone
    assert jig.train.batch_size == 128 and rot.train.batch_size != 128             # keyed by method
    assert r512.backbone.options == {"representation_dim": 512}
    grid[3].settings = "abc123"
    assert grid[3].name == "rotation-resnet50-w0.0625-r512-s0-abc123"
    assert grid[3].evaluate == {"protocols": ["linear"]} and grid[0].evaluate is None   # per-grid probes
    assert grid[3].coordinates()["representation_dim"] == 512 and "representation_dim" not in grid[0].coordinates()


def test_dotted_grid_keys_make_ablation_cells():
    import pytest

    from selfsup.sweep import cell_config, cells

    spec = {"base": {"method": {"name": "pirl", "num_negatives": 256}},
            "grid": {"method": ["pirl"], "backbone": ["resnet18"], "width": [0.25],
                     "method.lam": [0.0, 0.5], "method.num_negatives": [64, 128]}}
    grid = cells(spec)
    assert [c.options for c in grid] == [(("method.lam", 0.0), ("method.num_negatives", 64)),
                                         (("method.lam", 0.0), ("method.num_negatives", 128)),
                                         (("method.lam", 0.5), ("method.num_negatives", 64)),
                                         (("method.lam", 0.5), ("method.num_negatives", 128))]
    cfg = cell_config(spec, grid[2])
    assert cfg.method == {"name": "pirl", "lam": 0.5, "num_negatives": 64}   # the grid's value wins over base
    grid[2].settings = "abc123"
    assert grid[2].name == "pirl-resnet18-w0.25-lam0.5-num_negatives64-s0-abc123"
    assert grid[2].coordinates()["method.lam"] == 0.5
    with pytest.raises(KeyError, match="dotted"):
        cells({"grid": {"method": ["pirl"], "lam": [0.5]}})


def test_sweep_runs_a_transfer_suite_on_each_cell_and_a_random_init_floor(tmp_path):
    suite = {"name": "tiny", "datasets": [{"name": "sample", "protocols": ["knn", "linear"]}],
             "protocols": {"linear": {"strengths": [1.0, 10.0]}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    spec = {**SPEC, "out": str(tmp_path / "runs"), "grid": {**SPEC["grid"], "width": [0.125]},
            "evaluate": {"suite": str(tmp_path / "suite.yaml"), "random_init": True}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = Store(tmp_path / "r.sqlite")
    rows = run_sweep(path, store, log=lambda _: None)
    models = {r.model for r in rows}
    assert len(models) == 2 and "random-init resnet18-w0.125" in models
    assert {(r.protocol, r.dataset) for r in rows} == {("knn", "sample"), ("linear", "sample")}
    cell = next(r for r in rows if not r.model.startswith("random-init"))
    assert cell.extra["cell"]["width"] == 0.125
    log = []
    run_sweep(path, store, log=log.append)
    assert any("in the store, skipped" in line for line in log)
