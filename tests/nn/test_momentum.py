"""The momentum encoder: BYOL's τ schedule, the EMA update against plain arithmetic, the three buffer modes,
no gradient to the target, and exact resume from a state_dict."""

import math

import pytest
import torch
from torch import nn

from selfsup.errors import UserError
from selfsup.nn.momentum import MomentumEncoder, byol_tau


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()


def _values(module: nn.Module) -> dict[str, list[float]]:
    return {name: p.detach().reshape(-1).tolist() for name, p in module.named_parameters()}


def test_byol_tau_follows_the_cosine_schedule():
    assert byol_tau(0, 1000) == pytest.approx(0.996, abs=1e-15)
    assert byol_tau(500, 1000) == pytest.approx(0.998, abs=1e-15)          # 1 − 0.004 · 1/2
    assert byol_tau(1000, 1000) == pytest.approx(1.0, abs=1e-15)
    # (cos x + 1) / 2 = cos²(x / 2): τ_k = 1 − (1 − τ_base) cos²(π k / 2K)
    for step, total, base in ((1, 4, 0.996), (3, 4, 0.996), (7, 10, 0.99), (250, 1000, 0.9)):
        cos_half = math.cos(math.pi * step / (2 * total))
        assert byol_tau(step, total, base) == pytest.approx(1 - (1 - base) * cos_half**2)
    assert byol_tau(1, 4) == pytest.approx(1 - 0.002 * (1 + math.sqrt(2) / 2))
    taus = [byol_tau(k, 20) for k in range(21)]
    assert taus == sorted(taus)                                             # rises monotonically to 1
    assert byol_tau(1200, 1000) == 1.0                                      # clamped at K, as BYOL's code
    for bad in (dict(step=-1, total=10), dict(step=0, total=0), dict(step=0, total=10, base=1.5)):
        with pytest.raises(UserError):
            byol_tau(**bad)


def test_update_over_three_steps_equals_the_formula():
    online = _net(0)
    ema = MomentumEncoder(online)
    target = _values(online)                                                # starts as a copy
    assert _values(ema.target) == target
    for step, m in enumerate((0.9, 0.5, 0.99)):
        with torch.no_grad():                                               # the "optimiser step"
            for i, p in enumerate(online.parameters()):
                p.add_(torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p) * (step + 1) + i)
        ema.update(online, m)
        now = _values(online)
        target = {name: [m * t + (1 - m) * o for t, o in zip(target[name], now[name], strict=True)]
                  for name in target}
        got = _values(ema.target)
        for name in target:
            torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(target[name]), rtol=1e-15, atol=1e-15)
    # float32: the foreach kernels give the plain torch formula
    online32 = nn.Linear(4, 3)
    ema32 = MomentumEncoder(online32)
    before = ema32.target.weight.clone()
    with torch.no_grad():
        online32.weight.mul_(3.0)
    ema32.update(online32, 0.999)
    torch.testing.assert_close(ema32.target.weight, 0.999 * before + (1 - 0.999) * online32.weight)
    ema32.update(online32, 1.0)                                             # τ_K = 1: frozen
    ema32.update(online32, 0.0)                                             # m = 0: a copy
    assert torch.equal(ema32.target.weight, online32.weight)


def test_bad_values_are_refused():
    ema = MomentumEncoder(_net())
    with pytest.raises(UserError, match="1.5"):
        ema.update(_net(), 1.5)
    with pytest.raises(UserError, match="'mean'"):
        MomentumEncoder(_net(), buffers="mean")
    with pytest.raises(ValueError, match="DDP"):
        ema.update(nn.Sequential(nn.Linear(3, 2)).double(), 0.9)


def _trained_stats(online: nn.Module) -> None:
    online.train()
    with torch.no_grad():
        online(torch.randn(8, 3, dtype=torch.double, generator=torch.Generator().manual_seed(1)) * 3 + 1)


@pytest.mark.parametrize("mode", ["own", "copy", "ema"])
def test_buffer_modes(mode):
    online = _net()
    ema = MomentumEncoder(online, buffers=mode)
    bn_t, bn_o = ema.target[1], online[1]
    _trained_stats(online)
    ema.train()
    for _ in range(2):                                                      # the target's own statistics
        ema(torch.full((4, 3), 5.0, dtype=torch.double) + torch.arange(3.0, dtype=torch.double))
    own = {k: v.clone() for k, v in ema.target.state_dict().items() if "running" in k or "num_batches" in k}
    assert not torch.equal(own["1.running_mean"], bn_o.running_mean)
    m = 0.7
    ema.update(online, m)
    if mode == "own":
        assert torch.equal(bn_t.running_mean, own["1.running_mean"])
        assert torch.equal(bn_t.running_var, own["1.running_var"])
    elif mode == "copy":
        assert torch.equal(bn_t.running_mean, bn_o.running_mean)
        assert torch.equal(bn_t.running_var, bn_o.running_var)
    else:
        for name in ("running_mean", "running_var"):
            expected = [m * t + (1 - m) * o for t, o in zip(own[f"1.{name}"].tolist(),
                                                             getattr(bn_o, name).tolist(), strict=True)]
            torch.testing.assert_close(getattr(bn_t, name), torch.tensor(expected, dtype=torch.double))
    # integers (the target counted 2 batches, the online 1) are copied, never averaged
    assert bn_t.num_batches_tracked.dtype == torch.long
    assert bn_t.num_batches_tracked.item() == (2 if mode == "own" else 1)


def test_no_gradient_reaches_the_target():
    online = _net()
    ema = MomentumEncoder(online)
    assert all(not p.requires_grad for p in ema.target.parameters())
    x = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    k = ema(x)
    assert not k.requires_grad                                              # stop-gradient: sg(target(x))
    loss = (online(x) * k).sum()
    loss.backward()
    assert all(p.grad is None for p in ema.target.parameters())
    assert all(p.grad is not None for p in online.parameters())

    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _net()
            self.key_encoder = MomentumEncoder(self.encoder)

    method = Method()
    trained = {id(p) for p in method.parameters() if p.requires_grad}
    assert trained == {id(p) for p in method.encoder.parameters()}
    assert not trained & {id(p) for p in method.key_encoder.parameters()}


def test_state_dict_round_trip_resumes_the_target():
    online = _net(0)
    ema = MomentumEncoder(online, buffers="ema")
    _trained_stats(online)
    for m in (0.9, 0.8):
        with torch.no_grad():
            online[0].weight.add_(1.0)
        ema.update(online, m)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert {"target.0.weight", "target.1.running_mean", "target.1.num_batches_tracked"} <= state.keys()
    resumed = MomentumEncoder(_net(5), buffers="ema")                       # another init, overwritten
    resumed.load_state_dict(state)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not p.requires_grad for p in resumed.parameters())
    with torch.no_grad():
        online[0].bias.sub_(2.0)
    ema.update(online, 0.95)
    resumed.update(online, 0.95)
    for (k, a), b in zip(ema.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
