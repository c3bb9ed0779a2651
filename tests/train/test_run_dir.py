"""The run directory: written only once a run is validated and built; a run that never reached a checkpoint
blocks nothing; an output that cannot hold the run is refused before training starts."""

import pytest
import yaml

from selfsup.cli import main
from selfsup.config import build
from selfsup.errors import UserError
from selfsup.train import checkpoint
from selfsup.train.loop import pretrain

TINY = ["--data", "sample", "--width", "0.125", "--cifar-stem", "--steps", "2", "--batch-size", "8", "--no-progress",
        "method.view=simclr_cifar", "method.size=16"]


def _cfg(**train):
    return build({"method": {"name": "rotation", "view": "simclr_cifar", "size": 16},
                  "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                  "train": {"steps": 2, "batch_size": 8, "progress": False, **train}})


def test_a_failed_first_run_leaves_nothing_and_the_corrected_command_starts(tmp_path, capsys):
    out = tmp_path / "r" / "x"
    assert main(["pretrain", "simclr", *TINY, "--backbone", "resnet99", "--out", str(out)]) == 2
    assert "unknown backbone 'resnet99'" in capsys.readouterr().err
    assert main(["pretrain", "simclr", *TINY, "--data", str(tmp_path / "nope.zip"), "--out", str(out)]) == 2
    assert "nope.zip does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["pretrain", "simclr", *TINY, "--backbone", "resnet18", "--out", str(out)]) == 0
    assert (out / "backbone.safetensors").exists()


def test_a_config_without_checkpoints_is_a_new_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"backbone": {"name": "resnet99"}}))  # e.g. an older selfsup's
    (out / "metrics.csv").write_text("step,loss\n5,1.0\n")
    pretrain(_cfg(), out)
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone"]["name"] == "resnet18"
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == ["2"]  # row 5 gone


def test_checkpoints_with_other_settings_are_refused_naming_the_differences(tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(), out)
    assert checkpoint.latest(out) is not None
    with pytest.raises(UserError, match=r"holds a run with other settings \(train.seed: 0 -> 3\)"):
        pretrain(_cfg(seed=3), out)
    pretrain(_cfg(log_every=1), out)     # progress and logging settings may change on resume


def test_an_output_under_a_file_is_refused_before_anything_is_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"run directory .*file/run cannot be created: .*file is a file"):
        pretrain(_cfg(), blocker / "run")
    assert blocker.read_text() == "x"


def test_a_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    from selfsup import durable

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(UserError, match=r"run directory .*: 0 MiB free on its disk, \d+ MiB needed"):
        pretrain(_cfg(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
