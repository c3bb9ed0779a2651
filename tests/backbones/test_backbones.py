"""Backbones: published parameter counts, tap shapes, early stopping, RevNet's memory-saving backward.

Parameter counts exclude any classifier. Large models are built on the ``meta`` device, which
allocates nothing, so pinning ResNet-152 or VGG-19 costs no memory or time.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.backbones import Backbone, available, build
from selfsup.backbones.revnet import RevNet

ALL_TAPS = ("after_root", "block1", "block2", "block3", "block4", "pre_logits")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def on_meta(name: str, **kw) -> Backbone:
    with torch.device("meta"):
        return build(name, **kw)


# ------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize(
    "name, expected",
    [
        # torchvision resnetXX() parameter counts minus the 1000-way fc (weight + bias)
        ("resnet18", 11_689_512 - (512 * 1000 + 1000)),  # = 11,176,512
        ("resnet34", 21_797_672 - (512 * 1000 + 1000)),  # = 21,284,672
        ("resnet50", 25_557_032 - (2048 * 1000 + 1000)),  # = 23,508,032
        ("resnet101", 44_549_160 - (2048 * 1000 + 1000)),  # = 42,500,160
        ("resnet152", 60_192_808 - (2048 * 1000 + 1000)),  # = 58,143,808
    ],
)
def test_resnet_v1_parameter_counts_match_published(name: str, expected: int) -> None:
    assert n_params(on_meta(name)) == expected


def test_pinned_literals() -> None:
    assert n_params(on_meta("resnet50")) == 23_508_032
    assert n_params(on_meta("resnet18")) == 11_176_512
    assert n_params(on_meta("resnet34")) == 21_284_672
    assert n_params(on_meta("resnet101")) == 42_500_160
    assert n_params(on_meta("resnet50_v2")) == 23_500_352
    assert n_params(on_meta("revnet50")) == 5_408_640
    assert n_params(on_meta("vgg19_bn")) == 139_589_440


def _bn(c: int) -> int:
    return 2 * c


def test_resnet50_v2_count_from_formula() -> None:
    # Pre-activation bottleneck (He et al. 2016b): BN(cin) 1x1(cin->m) BN(m) 3x3(m->m) BN(m) 1x1(m->4m),
    # projection 1x1(cin->4m) without BN on the first unit of each stage; bare 7x7 root; final BN.
    total = 7 * 7 * 3 * 64
    cin = 64
    for i, n in enumerate((3, 4, 6, 3)):
        m = 64 * 2**i
        for j in range(n):
            total += _bn(cin) + cin * m + _bn(m) + 9 * m * m + _bn(m) + m * 4 * m
            if j == 0:
                total += cin * 4 * m
            cin = 4 * m
    total += _bn(2048)
    assert total == 23_500_352
    assert n_params(on_meta("resnet50_v2")) == total


def test_revnet50_count_from_formula() -> None:
    # Root: bare 7x7 projection 3 -> 256 (64·k, k=4). Stage i has C = 256·2^i channels and (3,4,6,3)
    # units; each unit's F is a shortcut-free v2 bottleneck on C/2 channels with inner width C/8.
    # Transitions (avg-pool + zero-pad) have no parameters; final BN on 2048 channels.
    total = 7 * 7 * 3 * 256
    for i, n in enumerate((3, 4, 6, 3)):
        h = 128 * 2**i
        m = h // 4
        total += n * (_bn(h) + h * m + _bn(m) + 9 * m * m + _bn(m) + m * h)
    total += _bn(2048)
    assert total == 5_408_640
    assert n_params(on_meta("revnet50")) == total


def test_vgg19_bn_count_from_formula() -> None:
    net = on_meta("vgg19_bn")
    convs, cin = 0, 3
    for n, c in zip((2, 2, 4, 4, 4), (64, 128, 256, 512, 512), strict=True):
        for _ in range(n):
            convs += 9 * cin * c + c + _bn(c)  # 3x3 conv with bias (torchvision layout) + BN
            cin = c
    # torchvision vgg19_bn: 143,678,248 parameters in all, minus its classifier
    # (25088·4096+4096) + (4096·4096+4096) + (4096·1000+1000) = 123,642,856.
    assert convs == 143_678_248 - 123_642_856 == 20_035_392
    fc6 = 512 * 7 * 7 * 4096 + _bn(4096)  # 102,768,640 (Linear without bias, then BN)
    fc7 = 4096 * 4096 + _bn(4096)  # 16,785,408
    assert (fc6, fc7) == (102_768_640, 16_785_408)
    assert n_params(net.features) == convs
    assert n_params(net.fc6) == fc6 and n_params(net.fc7) == fc7
    assert n_params(net) == convs + fc6 + fc7 == 139_589_440
    # cifar_stem pools to 1x1 before fc6: 512 inputs instead of 25088
    assert n_params(on_meta("vgg19_bn", cifar_stem=True).fc6) == 512 * 4096 + _bn(4096)


# --------------------------------------------------------------------------------- tap channels
def test_tap_channels() -> None:
    assert on_meta("resnet50").taps == dict(zip(ALL_TAPS, (64, 256, 512, 1024, 2048, 2048), strict=True))
    assert on_meta("resnet18").taps == dict(zip(ALL_TAPS, (64, 64, 128, 256, 512, 512), strict=True))
    assert on_meta("resnet50_v2").taps == on_meta("resnet50").taps
    assert on_meta("revnet50").taps == dict(zip(ALL_TAPS, (256, 256, 512, 1024, 2048, 2048), strict=True))
    wide = on_meta("resnet50", width=4.0)  # the paper's k = 16
    assert wide.out_dim == wide.taps["pre_logits"] == 8192
    assert on_meta("revnet50", width=4.0).out_dim == 8192
    vgg = on_meta("vgg19_bn")
    assert list(vgg.taps) == ["after_root", "block1", "block2", "block3", "block4", "fc6", "pre_logits"]
    assert list(vgg.taps.values()) == [64, 128, 256, 512, 512, 4096, 4096]
    assert on_meta("vgg19_bn", width=0.5).out_dim == 2048  # width = k/8: k = 4 -> fc7 of 512·4
    for name in available():
        assert list(on_meta(name).taps)[-1] == "pre_logits"


@pytest.mark.parametrize("width", [0.25, 0.3, 0.5])
def test_fractional_widths(width: float) -> None:
    net = build("resnet18", width=width, cifar_stem=True).eval()
    out = net(torch.randn(2, 3, 16, 16), taps=ALL_TAPS)
    assert {k: v.shape[1] for k, v in out.items()} == net.taps
    assert net.taps["after_root"] == round(64 * width)


# ---------------------------------------------------------------------------------- tap shapes
@pytest.mark.parametrize("name", ["resnet50", "resnet18_v2", "revnet26"])
def test_spatial_sizes_224(name: str) -> None:
    net = build(name, width=0.0625).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224), taps=ALL_TAPS)
    sizes = [out[t].shape[-1] for t in ALL_TAPS[:-1]]
    assert sizes == [56, 56, 28, 14, 7]
    assert out["pre_logits"].shape == (1, net.out_dim)
    assert {k: v.shape[1] for k, v in out.items()} == net.taps


@pytest.mark.parametrize("name", ["resnet18", "resnet50_v2", "revnet26"])
def test_cifar_stem_sizes_32(name: str) -> None:
    net = build(name, width=0.0625, cifar_stem=True).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32), taps=ALL_TAPS)
    assert [out[t].shape[-1] for t in ALL_TAPS[:-1]] == [32, 32, 16, 8, 4]
    assert out["pre_logits"].shape == (2, net.out_dim)


@pytest.mark.parametrize("name", ["resnet18", "revnet26"])
def test_patch_model_strides(name: str) -> None:
    # Kolesnikov et al.'s patch models: root_conv_stride=1, strides=(2, 2, 1); 64 px patches.
    net = build(name, width=0.0625, first_conv_stride1=True, last_stage_stride1=True).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64), taps=ALL_TAPS)
    assert [out[t].shape[-1] for t in ALL_TAPS[:-1]] == [32, 32, 16, 8, 8]


def test_vgg_taps_and_sizes() -> None:
    net = build("vgg19_bn", width=0.125, cifar_stem=True).train()
    out = net(torch.randn(2, 3, 32, 32), taps=tuple(net.taps))
    assert {k: v.shape[1] for k, v in out.items()} == net.taps
    blocks = ("after_root", "block1", "block2", "block3", "block4")
    assert [out[t].shape[-1] for t in blocks] == [32, 16, 8, 4, 2]
    assert out["fc6"].shape == out["pre_logits"].shape == (2, 512)
    assert (out["pre_logits"] >= 0).all()  # fc7 ends in ReLU
    # without cifar_stem the last map is pooled to 7x7 (replicated at 64 px), as at 224 px
    net = build("vgg11_bn", width=0.0625).eval()
    assert net.fc6[0].in_features == 32 * 49
    assert net(torch.randn(1, 3, 64, 64))["pre_logits"].shape == (1, 256)


def test_vgg_pools_round_up_for_patch_tiles() -> None:
    # a 64 px image's patch tasks feed 14 px tiles: floor pooling would reach 0x0 at the fifth pool
    net = build("vgg19_bn", width=0.0625).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 14, 14), taps=("after_root", "block1", "block2", "block3", "block4", "pre_logits"))
    assert [out[t].shape[-1] for t in ("after_root", "block1", "block2", "block3", "block4")] == [14, 7, 4, 2, 1]
    assert out["pre_logits"].shape == (2, 256)


# ------------------------------------------------------------------------- early stop and errors
@pytest.mark.parametrize(
    "name, later",
    [("resnet18", "layer2"), ("resnet50_v2", "layer2"), ("revnet26", "layer2"), ("vgg11_bn", "fc6")],
)
def test_stops_after_last_requested_tap(name: str, later: str) -> None:
    net = build(name, width=0.0625, cifar_stem=True).eval()
    calls: list[str] = []
    getattr(net, later).register_forward_hook(lambda *_: calls.append(later))
    out = net(torch.randn(2, 3, 32, 32), taps=("block1",))
    assert list(out) == ["block1"] and calls == []
    net(torch.randn(2, 3, 32, 32), taps=("after_root", "pre_logits"))
    assert calls == [later]


def test_unknown_tap_and_name_raise() -> None:
    net = build("resnet18", width=0.0625, cifar_stem=True)
    with pytest.raises(ValueError, match="valid taps.*block4"):
        net(torch.randn(2, 3, 32, 32), taps=("block5",))
    with pytest.raises(ValueError, match="available.*resnet50"):
        build("resnet51")
    with pytest.raises(ValueError, match="final_relu"):
        build("resnet18", final_relu=False)
    assert build("RESNET18", width=0.0625).taps["block4"] == 32


def test_available_lists_every_family() -> None:
    names = available()
    expected = ("resnet18", "resnet152", "resnet50_v2", "resnet152_v2", "revnet50", "revnet26", "vgg19_bn")
    assert set(expected) <= set(names)
    assert all(isinstance(d, str) and "width" in d for d in names.values())


def test_final_relu_variant_and_zero_init() -> None:
    x = torch.randn(4, 3, 32, 32)
    minus = build("resnet18_v2", width=0.0625, cifar_stem=True, final_relu=False).train()
    assert (minus(x)["pre_logits"] < 0).any()  # BN kept, ReLU dropped
    plus = build("revnet26", width=0.0625, cifar_stem=True).train()
    assert (plus(x)["pre_logits"] >= 0).all()
    # zero-initialised residual branches: every v2 unit of stage 1 is the identity
    net = build("resnet18_v2", width=0.0625, cifar_stem=True, zero_init_residual=True).eval()
    out = net(x, taps=("after_root", "block1"))
    torch.testing.assert_close(out["block1"], out["after_root"])


# ------------------------------------------------------------------------------------ RevNet
def _tiny_revnet(memory_saving: bool) -> RevNet:
    torch.manual_seed(0)
    net = build("revnet26", width=0.0625, cifar_stem=True, memory_saving=memory_saving)
    return net.double().train()  # train mode: BN uses batch statistics, the hard case


def test_revnet_memory_saving_gradients_match_plain_autograd() -> None:
    saving = _tiny_revnet(memory_saving=True)
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    assert saving.layer3.memory_saving and not plain.layer3.memory_saving
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(saving.out_dim, dtype=torch.float64)
    grads = []
    for net in (saving, plain):
        xi = x.clone().requires_grad_(True)
        out = net(xi, taps=("block2", "pre_logits"))
        loss = (out["pre_logits"] * w).sum() + out["block2"].pow(2).mean()
        loss.backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # BN running statistics were updated exactly once in both paths (the recompute left no trace)
    for (name, a), (_, b) in zip(saving.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert int(saving.layer1.units[0].fn.bn1.num_batches_tracked) == 1


def test_revnet_stage_is_invertible() -> None:
    net = _tiny_revnet(memory_saving=True)
    stage = net.layer2
    x = torch.randn(2, net.taps["block2"], 8, 8, dtype=torch.float64)
    for mode in (True, False):
        stage.train(mode)
        with torch.no_grad():
            y = stage(x)
            stats = [b.clone() for b in stage.buffers()]
            torch.testing.assert_close(stage.inverse(y), x, rtol=1e-10, atol=1e-10)
        assert all(torch.equal(a, b) for a, b in zip(stats, stage.buffers(), strict=True))
    assert not torch.allclose(y, torch.cat(x.chunk(2, 1)[::-1], 1))  # F is not trivially zero


def test_revnet_memory_saving_stores_less() -> None:
    def saved_bytes(name: str, memory_saving: bool) -> int:
        torch.manual_seed(0)
        net = build(name, width=0.125, cifar_stem=True, memory_saving=memory_saving).train()
        storages: dict[int, int] = {}  # unique storages kept for backward (views share one)

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = net(torch.randn(2, 3, 32, 32))["pre_logits"].sum()
        loss.backward()  # outside the hooks: only what the forward keeps for backward is counted
        return sum(storages.values())

    saving = saved_bytes("revnet50", True)
    # Gomez et al. 2017: stored activations no longer grow with depth (26 -> 50 layers, same widths) ...
    assert saving == saved_bytes("revnet26", True)
    # ... and are a fraction of what plain autograd keeps.
    assert saving < 0.2 * saved_bytes("revnet50", False)


# ------------------------------------------------------------------ channels_last and autocast
@pytest.mark.parametrize("name, px", [("resnet18", 16), ("resnet50_v2", 16), ("revnet26", 16), ("vgg11_bn", 32)])
def test_channels_last_and_bf16_autocast(name: str, px: int) -> None:
    torch.manual_seed(0)
    net = build(name, width=0.0625, cifar_stem=True).train()
    x = torch.randn(2, 3, px, px)
    ref = net(x, taps=("block3", "pre_logits"))
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    out = net_cl(x.to(memory_format=torch.channels_last), taps=("block3", "pre_logits"))
    for k in ref:   # the two layouts sum in different orders: a wrong layout is off by O(1), rounding by < 1e-3
        torch.testing.assert_close(out[k], ref[k], rtol=1e-3, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net_cl(x.to(memory_format=torch.channels_last).requires_grad_(True))
    assert out["pre_logits"].dtype == torch.bfloat16
    out["pre_logits"].float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net_cl.parameters())
