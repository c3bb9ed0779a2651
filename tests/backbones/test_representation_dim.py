"""``build(..., representation_dim=d)``: Kolesnikov et al. 2019's representation-size study.

One extra linear layer (bias, no activation) after the pooled features sets the pre-logits size
independently of the width; the old pooled vector is the ``"pooled"`` tap just before it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.backbones import build

SMALL = {
    "resnet18": {"width": 0.125},
    "revnet26": {"width": 0.0625},
    "vgg11_bn": {"width": 0.0625},
}


def small(name: str, **kw) -> nn.Module:
    return build(name, cifar_stem=True, **SMALL[name], **kw)


@pytest.mark.parametrize("name", list(SMALL))
def test_taps_and_out_dim(name: str) -> None:
    plain = small(name)
    net = small(name, representation_dim=24)
    pooled = plain.taps["pre_logits"]
    assert pooled != 24
    assert list(net.taps)[-2:] == ["pooled", "pre_logits"]
    assert net.taps["pooled"] == pooled
    assert net.taps["pre_logits"] == 24 and net.out_dim == 24
    assert {k: v for k, v in net.taps.items() if k not in ("pooled", "pre_logits")} == {
        k: v for k, v in plain.taps.items() if k != "pre_logits"
    }
    layer = net.representation_layer
    assert isinstance(layer, nn.Linear) and layer.bias is not None
    assert (layer.in_features, layer.out_features) == (pooled, 24)
    assert plain.representation_layer is None


@pytest.mark.parametrize("name", list(SMALL))
def test_extra_layer_is_linear_on_pooled(name: str) -> None:
    torch.manual_seed(0)
    net = small(name, representation_dim=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x, taps=("pooled", "pre_logits"))
        manual = nn.Linear(net.taps["pooled"], 10)
        manual.load_state_dict(net.representation_layer.state_dict())
        assert out["pooled"].shape == (2, net.taps["pooled"])
        assert out["pre_logits"].shape == (2, 10)
        torch.testing.assert_close(out["pre_logits"], manual(out["pooled"]))
        # default request is pre_logits and it agrees with the multi-tap call
        torch.testing.assert_close(net(x)["pre_logits"], out["pre_logits"])


@pytest.mark.parametrize("name", list(SMALL))
def test_state_dict_keys(name: str) -> None:
    torch.manual_seed(0)
    plain_keys = list(small(name).state_dict())
    assert not any(k.startswith("representation.") for k in plain_keys)
    torch.manual_seed(0)
    rep_keys = list(small(name, representation_dim=8).state_dict())
    assert rep_keys == plain_keys + ["representation.weight", "representation.bias"]


def test_trunk_checkpoint_loads_into_representation_model() -> None:
    plain = small("resnet18")
    net = small("resnet18", representation_dim=8)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["representation.bias", "representation.weight"] and not unexpected


def test_block1_only_stops_early() -> None:
    net = small("resnet18", representation_dim=8)
    called: list[str] = []
    for name in ("layer2", "layer3", "layer4", "representation"):
        getattr(net, name).register_forward_hook(lambda m, i, o, n=name: called.append(n))
    out = net(torch.randn(1, 3, 32, 32), taps="block1")
    assert list(out) == ["block1"] and called == []
    net(torch.randn(1, 3, 32, 32), taps="pooled")
    assert "representation" not in called and "layer4" in called


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_invalid_dim(bad) -> None:
    with pytest.raises(ValueError, match="representation_dim"):
        small("resnet18", representation_dim=bad)


def test_meta_device_and_no_double_add() -> None:
    with torch.device("meta"):
        net = build("resnet50", representation_dim=4096)
    assert net.out_dim == 4096 and net.taps["pooled"] == 2048
    assert net.representation_layer.weight.device.type == "meta"
    with pytest.raises(ValueError, match="already"):
        net.add_representation(16)
