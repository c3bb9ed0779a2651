import json
import subprocess
import sys

from selfsup.cli import main


def test_list_shows_registries(capsys):
    for what, expected in (("methods", "simclr"), ("backbones", "resnet50"), ("datasets", "tinyimagenet100"),
                           ("protocols", "linear")):
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out


def test_print_config_layers_recipe_flags_and_overrides(capsys):
    assert main(["pretrain", "simclr", "--config", "small/simclr_cifar10", "--steps", "7", "--out", "x",
                 "--print-config", "optim.lr=0.25", "method.temperature=0.2"]) == 0
    text = capsys.readouterr().out
    assert "temperature: 0.2" in text and "lr: 0.25" in text and "steps: 7" in text
    assert "epochs: null" in text  # --steps outranks the recipe's epochs
    assert "name: lars" in text    # from the recipe (and SimCLR's paper defaults)
    assert "proj_dim: 128" in text and "view: " in text   # every method option, defaults included


def test_errors_name_the_value_and_the_fix(capsys, tmp_path):
    assert main(["pretrain", "nosuchmethod", "--out", "x"]) == 2
    assert "unknown method 'nosuchmethod'; available: simclr" in capsys.readouterr().err
    assert main(["pretrain", "simclr", "--out", "x", "--print-config", "optim.wd=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    # protocol settings after the flags reach evaluate (which then names the missing model)
    store = str(tmp_path / "r.sqlite")
    assert main(["evaluate", "missing-run", "--protocol", "sgd", "sgd.epochs=3", "--store", store]) == 2
    assert "missing-run is neither a run directory" in capsys.readouterr().err


def test_help_documents_every_pretrain_flag():
    text = subprocess.run([sys.executable, "-m", "selfsup.cli", "pretrain", "--help"], capture_output=True,
                          text=True, check=True).stdout
    for flag in ("--data", "--backbone", "--steps", "--epochs", "--batch-size", "--out", "--checkpoint-every",
                 "--devices", "--num-nodes", "--precision", "--compile", "key=value"):
        assert flag in text


def test_results_json_roundtrip(tmp_path, capsys):
    from selfsup.results.store import Result, Store

    store = tmp_path / "r.sqlite"
    Store(store).put([Result("m", "h", "sample", "test", "knn", "pre_logits", "c", "top1", 42.0)])
    assert main(["results", "--json", "--store", str(store)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["value"] == 42.0 and row["protocol"] == "knn"


def test_list_protocols_shows_the_transfer_suite_and_analyses(capsys):
    assert main(["list", "protocols"]) == 0
    text = capsys.readouterr().out
    for name in ("knn", "linear", "fewshot", "calibration", "finetune", "sensitivity", "saliency", "inversion"):
        assert f"\n{name} " in f"\n{text}"


def test_evaluate_suite_excludes_data_and_protocol_and_names_unknown_suites(capsys, tmp_path):
    store = str(tmp_path / "r.sqlite")
    assert main(["evaluate", "missing-run", "--suite", "transfer", "--data", "cifar10", "--protocol", "knn",
                 "--store", store]) == 2
    assert "drop --data, --protocol" in capsys.readouterr().err
    assert main(["evaluate", "missing-run", "--suite", "nosuchsuite", "--store", store]) == 2
    err = capsys.readouterr().err
    assert "suite nosuchsuite is neither a YAML file nor a shipped suite" in err and "transfer_paper" in err
    text = subprocess.run([sys.executable, "-m", "selfsup.cli", "analyse", "--help"], capture_output=True,
                          text=True, check=True).stdout
    for flag in ("--data", "--images", "--invert", "--steps", "--only", "--resolution"):
        assert flag in text
