import errno

import pytest
import torch

from selfsup.errors import UserError
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


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    checkpoint.save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in checkpoint.load_model_state(checkpoint.latest(tmp_path)).items()}
    real = checkpoint._write_tensors

    def disk_full_after_first_file(path, tensors):
        real(path, tensors)      # model.safetensors lands in the temporary folder, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_tensors", disk_full_after_first_file)
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-00000002 \(No space left on device\); "
                                        r"the previous checkpoint .*step-00000001 is intact"):
        checkpoint.save(tmp_path, 2, model, opt)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]  # no half-written copy
    after = checkpoint.load_model_state(checkpoint.latest(tmp_path))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_corrupt_or_foreign_files_are_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match=r"model.safetensors is not a readable safetensors file .*re-export it"):
        checkpoint.read_safetensors(bad)
    other = torch.nn.Linear(4, 2)
    with pytest.raises(UserError, match=r"x.safetensors does not fit a Linear\(4, 3\): .*size mismatch"):
        checkpoint.load_into(torch.nn.Linear(4, 3), other.state_dict(), tmp_path / "x.safetensors", "a Linear(4, 3)")
