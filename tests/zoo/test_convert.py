"""A published checkpoint (torchvision-layout ResNet inside a training wrapper) converts to a backbone file
whose encoder computes exactly what the original network computes; heads are dropped, bad inputs are named."""

import pytest
import torch

from selfsup import backbones
from selfsup.cli import main
from selfsup.evaluate.features import encode, load_encoder
from selfsup.zoo.convert import convert


def _published(tmp_path, prefix, wrapper="state_dict"):
    torch.manual_seed(0)
    net = backbones.build("resnet18", width=0.25)
    for m in net.modules():   # non-trivial BN statistics, so a lost buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state[prefix + "fc.weight"] = torch.randn(10, 128)            # a classifier head to drop
    state["module.encoder_k.conv1.weight"] = torch.randn(16, 3, 7, 7)   # MoCo's key encoder: not ours either
    path = tmp_path / "moco.pth.tar"
    torch.save({wrapper: state, "epoch": 800, "arch": "resnet18"}, path)
    return net.eval(), path


def test_moco_layout_converts_to_the_same_network(tmp_path):
    net, path = _published(tmp_path, "module.encoder_q.")
    info = convert(path, tmp_path / "moco.safetensors", backbone="resnet18", width=0.25)
    assert info["prefix"] == "module.encoder_q." and info["kept"] == len(net.state_dict()) and info["dropped"] == 2
    encoder = load_encoder(tmp_path / "moco.safetensors")
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8).numpy()
    ours = encode(encoder, images)["pre_logits"]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(encoder.mean).view(1, 3, 1, 1)) \
        / torch.tensor(encoder.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(x)["pre_logits"]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_simclr_without_normalization_and_cli(tmp_path, capsys):
    _, path = _published(tmp_path, "", wrapper="model")
    assert main(["convert", str(path), "--backbone", "resnet18", "--width", "0.25", "--no-normalization",
                 "--out", str(tmp_path / "simclr.safetensors")]) == 0
    assert "kept" in capsys.readouterr().out
    encoder = load_encoder(tmp_path / "simclr.safetensors")
    assert encoder.mean == (0.0, 0.0, 0.0) and encoder.std == (1.0, 1.0, 1.0)


def test_wrong_architecture_is_named(tmp_path):
    _, path = _published(tmp_path, "module.")
    with pytest.raises(ValueError, match="check --backbone and --width"):
        convert(path, tmp_path / "x.safetensors", backbone="resnet18", width=0.5)
    with pytest.raises(ValueError, match="not in the checkpoint"):
        convert(path, tmp_path / "x.safetensors", backbone="resnet50", width=0.25)
