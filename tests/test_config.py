import pytest

from selfsup.config import build, load_config, parse_overrides


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["optim.lr=0.5", "train.compile=true", "optim.milestones=[15, 25]",
                            "method.temperature=0.2"]) == {
        "optim": {"lr": 0.5, "milestones": [15, 25]}, "train": {"compile": True},
        "method": {"temperature": 0.2}}


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: rotation}\noptim: {lr: 0.2}\nbackbone: {name: resnet50, width: 2.0}\n")
    cfg = load_config(path, ["optim.lr=0.3"], base={"optim": {"lr": 0.1, "name": "sgd"}})
    assert cfg.optim.lr == 0.3 and cfg.optim.name == "sgd"
    assert cfg.backbone.name == "resnet50" and cfg.backbone.width == 2.0
    assert cfg.method == {"name": "rotation"}


def test_unknown_key_names_valid_ones():
    with pytest.raises(KeyError, match="valid keys: .*weight_decay"):
        build({"optim": {"wd": 1e-4}})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["optim.lr"])
