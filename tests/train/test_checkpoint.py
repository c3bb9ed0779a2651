import torch

from selfsup.train import checkpoint


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_and_optimizer(tmp_path):
    model, opt = _model_and_opt()
    checkpoint.save(tmp_path, 7, model, opt, meta={"note": "x"})
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    info = checkpoint.restore(checkpoint.latest(tmp_path), model2, opt2)
    assert info["step"] == 7 and info["meta"] == {"note": "x"}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for name, value in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][pid][name]))


def test_keeps_newest_and_ignores_partial_writes(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, keep=2)
    # A save killed half-way leaves only a temporary directory, which resume must not pick up.
    (tmp_path / "checkpoints" / ".tmp-step-00000004-1").mkdir()
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003"]
    assert checkpoint.latest(tmp_path).name == "step-00000003"
