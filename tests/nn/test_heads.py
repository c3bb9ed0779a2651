"""Every head of selfsup and of the papers it follows, built from a HeadSpec, equals the same head written by hand:
module types in order, parameter and buffer names and shapes, bias flags, BN settings, and the forward output
(train and eval) once the reference's weights are loaded. Plus the spec's validation errors."""

import dataclasses

import pytest
import torch
from torch import nn

from selfsup.errors import UserError
from selfsup.nn.heads import BYOL_PREDICTOR, BYOL_PROJECTOR, MOCO_V2, SIMCLR_V1, SIMCLR_V2, SWAV, HeadSpec, build_head

D = 24   # a small stand-in for the feature dims of the papers (2048 for R-50); the structure does not depend on it


def _lin(i, o, bias=True):
    return nn.Linear(i, o, bias=bias)


def _ref_simclr_v2(d):
    """google-research/simclr tf2/model.py ProjectionHead, num_proj_layers=3: BN without β (center=False) last."""
    out_bn = nn.BatchNorm1d(128)
    out_bn.bias.requires_grad_(False)
    return nn.Sequential(_lin(d, d, False), nn.BatchNorm1d(d), nn.ReLU(), _lin(d, d, False), nn.BatchNorm1d(d),
                         nn.ReLU(), _lin(d, 128, False), out_bn)


# name -> (in_dim, the spec, the reference written from its source)
CASES = {
    "rotation_linear": (D, HeadSpec(out_dim=4, layers=1), lambda: nn.Sequential(_lin(D, 4))),
    "embedding_linear": (D, HeadSpec(out_dim=16, layers=1), lambda: nn.Sequential(_lin(D, 16))),
    "simclr_v1": (D, SIMCLR_V1, lambda: nn.Sequential(_lin(D, D, False), nn.BatchNorm1d(D), nn.ReLU(),
                                                      _lin(D, 128))),
    "simclr_v1_hidden": (D, dataclasses.replace(SIMCLR_V1, hidden_dim=40),
                         lambda: nn.Sequential(_lin(D, 40, False), nn.BatchNorm1d(40), nn.ReLU(), _lin(40, 128))),
    "patch_task": (3 * D, HeadSpec(out_dim=9, hidden_dim=4096, bn="hidden", bn_momentum=0.003, dropout=0.5),
                   lambda: nn.Sequential(_lin(3 * D, 4096), nn.BatchNorm1d(4096, eps=1e-5, momentum=0.003),
                                         nn.ReLU(), nn.Dropout(0.5), _lin(4096, 9))),
    "simclr_v2": (D, SIMCLR_V2, lambda: _ref_simclr_v2(D)),
    "moco_v2": (D, MOCO_V2, lambda: nn.Sequential(_lin(D, D), nn.ReLU(), _lin(D, 128))),
    "byol_projector": (D, BYOL_PROJECTOR, lambda: nn.Sequential(_lin(D, 4096), nn.BatchNorm1d(4096), nn.ReLU(),
                                                                _lin(4096, 256, False))),
    "byol_predictor": (256, BYOL_PREDICTOR, lambda: nn.Sequential(_lin(256, 4096), nn.BatchNorm1d(4096), nn.ReLU(),
                                                                  _lin(4096, 256, False))),
    "swav": (2048, SWAV, lambda: nn.Sequential(_lin(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), _lin(2048, 128))),
}


def _settings(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, m.bias is not None
    if isinstance(m, nn.BatchNorm1d):
        return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                m.bias.requires_grad if m.affine else None)
    if isinstance(m, nn.Dropout):
        return (m.p,)
    return ()


@pytest.mark.parametrize("name", list(CASES))
def test_head_matches_its_hand_written_reference(name):
    in_dim, spec, make_ref = CASES[name]
    torch.manual_seed(0)
    ref, head = make_ref(), build_head(in_dim, spec)
    assert [type(m) for m in head] == [type(m) for m in ref]
    assert [_settings(m) for m in head] == [_settings(m) for m in ref]
    assert {k: v.shape for k, v in head.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert [n for n, _ in head.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in head.named_buffers()] == [n for n, _ in ref.named_buffers()]
    # non-trivial BN state, so a wrong eps / momentum / missing β would show in the outputs
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                if m.bias.requires_grad:
                    m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    head.load_state_dict(ref.state_dict())
    x = torch.randn(8, in_dim, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        ref.train(train), head.train(train)
        torch.manual_seed(2)
        want = ref(x)
        torch.manual_seed(2)          # the same dropout mask
        got = head(x)
        assert got.shape == (8, spec.out_dim)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (n, a), b in zip(ref.state_dict().items(), head.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)   # running stats moved the same way


def test_simclr_v2_output_bn_shift_stays_zero_while_its_scale_trains():
    head = build_head(D, SIMCLR_V2)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    gamma = head[-1].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (head(x) * torch.arange(128.0)).sum().backward()
        opt.step()
    assert head[-1].bias.grad is None and torch.equal(head[-1].bias, torch.zeros(128))
    assert not torch.equal(head[-1].weight, gamma)


def test_caller_can_reinitialise_the_layers_as_patch_task_does():
    head = build_head(2 * D, HeadSpec(out_dim=5, hidden_dim=64, bn="hidden", bn_momentum=0.003, dropout=0.0))
    assert isinstance(head[3], nn.Dropout) and head[3].p == 0.0      # p = 0 keeps the layer: head[4] is the last Linear
    for layer, bias in ((head[0], 0.1), (head[4], 0.0)):
        nn.init.trunc_normal_(layer.weight, std=0.005, a=-0.01, b=0.01)
        nn.init.constant_(layer.bias, bias)
    assert torch.equal(head[0].bias, torch.full((64,), 0.1)) and head[4].weight.abs().max() <= 0.01
    head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    simclr_v2 = build_head(D, SIMCLR_V2)
    simclr_v2[-1].reset_parameters()
    assert not simclr_v2[-1].bias.requires_grad and torch.equal(simclr_v2[-1].bias, torch.zeros(128))


@pytest.mark.parametrize("kwargs, names", [
    (dict(out_dim=0), "out_dim"),
    (dict(out_dim=128, layers=0), "layers"),
    (dict(out_dim=128, layers=2.0), "layers"),
    (dict(out_dim=128, hidden_dim=-1), "hidden_dim"),
    (dict(out_dim=128, hidden_dim=True), "hidden_dim"),
    (dict(out_dim=128, bn="output"), "bn"),
    (dict(out_dim=128, bn_eps=0.0), "bn_eps"),
    (dict(out_dim=128, bn_momentum=0.0), "bn_momentum"),
    (dict(out_dim=128, bn_momentum=1.5), "bn_momentum"),
    (dict(out_dim=128, dropout=1.0), "dropout"),
    (dict(out_dim=128, dropout=-0.1), "dropout"),
    (dict(out_dim=128, bn="hidden", out_bn_bias=False), "out_bn_bias"),
])
def test_bad_spec_raises_user_error_naming_the_field(kwargs, names):
    with pytest.raises(UserError, match=rf"HeadSpec\.{names}\b"):
        HeadSpec(**kwargs)


@pytest.mark.parametrize("in_dim", [0, -3, 2.5])
def test_bad_input_dim_raises_user_error(in_dim):
    with pytest.raises(UserError, match="input dim must be a positive integer"):
        build_head(in_dim, MOCO_V2)


def test_user_error_is_a_value_error_and_spec_is_frozen():
    with pytest.raises(ValueError):
        HeadSpec(out_dim=128, layers=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MOCO_V2.out_dim = 64   # type: ignore[misc]
