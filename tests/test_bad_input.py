"""Every command, a table of bad values: exit code 2, one line on stderr naming the value, and nothing left
behind (no run directory, no output file, no row in the results store)."""

import zipfile

import pytest
import torch

from selfsup.cli import main
from selfsup.config import build
from selfsup.results.store import Store
from selfsup.train.loop import pretrain

TINY = ["--width", "0.125", "--cifar-stem", "--steps", "2", "--batch-size", "8", "--no-progress",
        "method.view=simclr_cifar", "method.size=16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished tiny run, and files that look like checkpoints but are not what they claim."""
    root = tmp_path_factory.mktemp("bad_input")
    cfg = build({"method": {"name": "rotation", "view": "simclr_cifar", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 2, "batch_size": 8, "progress": False}})
    run = pretrain(cfg, root / "run")
    backbone = (run / "backbone.safetensors").read_bytes()
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "truncated.safetensors").write_bytes(backbone[: len(backbone) // 2])
    # the metadata of a width-0.125 ResNet-18 over the tensors of a width-0.25 one: another architecture
    from safetensors.torch import load_file, save_file

    from selfsup import backbones
    from selfsup.train.checkpoint import read_safetensors

    _, meta = read_safetensors(run / "backbone.safetensors")
    wider = backbones.build("resnet18", width=0.25, cifar_stem=True).state_dict()
    save_file({k: v.contiguous() for k, v in wider.items()}, str(root / "other_arch.safetensors"), metadata=meta)
    torch.save(load_file(str(run / "backbone.safetensors")), root / "resnet18.pth")
    (root / "garbage.pth").write_bytes(b"\x80\x04not a pickle")
    with zipfile.ZipFile(root / "evil.zip", "w") as z:   # a member that climbs out of its split
        z.writestr("train/../../x.png", b"")
        z.writestr("train/cat/ok.png", b"")
    (root / "bad_sweep.yaml").write_text("name: s\ngrid: {method: [rotation], colour: [1]}\n")
    (root / "not_a_db.sqlite").write_text("not sqlite")
    return root


def cases(f):
    """(argv, a fragment the one error line must hold, paths that must not exist afterwards)."""
    out = str(f / "out")
    pre = ["pretrain", "simclr", "--data", "sample", *TINY, "--out", out]
    ev = ["evaluate", str(f / "run"), "--store", str(f / "store.sqlite")]
    table = [
        # pretrain: values, types, unknown keys, cross-field rules against the data
        (["pretrain", "simclr", "--data", "sample", *TINY, "--backbone", "resnet99", "--out", out], "'resnet99'"),
        (["pretrain", "simclr", "--data", "sample", "--steps", "-3", "--out", out], "'-3'"),
        (["pretrain", "simclr", "--data", "sample", "--steps", "0", "--out", out], "'0'"),
        (["pretrain", "simclr", "--data", "sample", "--epochs", "nan", "--out", out], "'nan'"),
        (["pretrain", "simclr", "--data", "sample", "--lr", "-1", "--out", out], "'-1'"),
        (["pretrain", "simclr", "--data", "sample", "--batch-size", "abc", "--out", out], "'abc'"),
        ([*pre, "optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
        ([*pre, "optim.lr=nan"], "optim.lr must be a finite number"),
        ([*pre, "optim.lr=1e999"], "optim.lr must be a finite number"),
        ([*pre, "optim.lr="], "optim.lr must be a number, got None"),
        ([*pre, "optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
        ([*pre, "optim.name=adam"], "optim.name must be one of 'sgd', 'lars', 'adamw', got 'adam'"),
        ([*pre, "optim.milestones=[30,10]"], "optim.milestones must increase"),
        ([*pre, "optim.lrr=0.1"], "unknown config key optim.lrr (did you mean optim.lr?)"),
        ([*pre, "train.steps=1.5"], "train.steps must be an integer or null, got 1.5"),
        ([*pre, "train.checkpoint_every=0"], "train.checkpoint_every must be >= 1, got 0"),
        ([*pre, "train.devices=abc"], "train.devices must be a positive integer or 'auto', got 'abc'"),
        ([*pre, "train.batch_size=1000000000000"], "train.batch_size=1000000000000 exceeds the 4800 images"),
        ([*pre, "backbone.width=1e12"], "backbone.width must be in (0, 64], got 1000000000000.0"),
        ([*pre, "method.tempreature=0.2"], "unknown config key method.tempreature (did you mean method.temperature?)"),
        ([*pre, "method.temperature=0"], "method.temperature must be > 0, got 0"),
        ([*pre, "method.view=bogus"], "method.view must be one of"),
        ([*pre, "data.on_error=ignore"], "data.on_error must be one of 'raise', 'skip', got 'ignore'"),
        ([*pre, "data.size=0"], "data.size must be in [1, 8192], got 0"),
        ([*pre, ".lr=1"], "has an empty key"),
        ([*pre, "stray"], "unrecognized arguments: stray"),
        (["pretrain", "pirl", "--data", "sample", "method.lam=2", "--out", out], "method.lam must be in [0, 1]"),
        (["pretrain", "nosuch", "--out", out], "unknown method 'nosuch'"),
        (["pretrain", "simclr", "--data", "", *TINY, "--out", out], "data.name (--data) is an empty string"),
        (["pretrain", "simclr", "--data", "sample", *TINY, "--out", ""], "--out) is an empty string"),
        (["pretrain", "simclr", "--data", str(f / "nope.zip"), *TINY, "--out", out], "nope.zip does not exist"),
        (["pretrain", "simclr", "--data", str(f / "evil.zip"), *TINY, "--out", out], "'train/../../x.png'"),
        (["pretrain", "simclr", "--config", "nosuch", *TINY, "--out", out], "config nosuch is neither"),
        (["pretrain", "simclr", "--data", "sample", *TINY, "--out", str(f / "run" / "config.yaml" / "x")],
         "config.yaml is a file"),
        # evaluate: flags, corrupt and foreign files, protocol settings
        ([*ev, "--resolution", "-5"], "'-5'"),
        ([*ev, "--train-per-class", "0"], "'0'"),
        ([*ev, "--tap", "nosuch"], "unknown tap(s) ['nosuch']"),
        ([*ev, "--data", "nosuch"], "unknown dataset 'nosuch'"),
        ([*ev, "--protocol", "knn", "knn.k=-1"], "knn.k must be >= 1, got -1"),
        ([*ev, "--protocol", "knn", "knn.k=abc"], "knn.k must be an integer, got 'abc'"),
        ([*ev, "--protocol", "knn", "knn.kk=3"], "unknown knn setting knn.kk (did you mean knn.k?)"),
        ([*ev, "--suite", "nosuch"], "nosuch"),
        (["evaluate", str(f / "garbage.safetensors"), "--store", str(f / "store.sqlite")],
         "garbage.safetensors is not a readable safetensors file"),
        (["evaluate", str(f / "truncated.safetensors"), "--store", str(f / "store.sqlite")],
         "truncated.safetensors is not a readable safetensors file"),
        (["evaluate", str(f / "run"), str(f / "other_arch.safetensors"), "--store", str(f / "store.sqlite")],
         "other_arch.safetensors does not fit"),
        (["evaluate", str(f / "nope"), "--store", str(f / "store.sqlite")], "nope is neither a run directory"),
        ([*ev[:2], "--store", str(f / "not_a_db.sqlite")], "not_a_db.sqlite cannot be opened"),
        # the other commands
        (["analyse", str(f / "run"), "--images", "0", "--store", str(f / "store.sqlite")], "'0'"),
        (["analyse", str(f / "run"), "--invert", "-1", "--store", str(f / "store.sqlite")], "'-1'"),
        (["analyse", str(f / "garbage.safetensors"), "--store", str(f / "store.sqlite")], "garbage.safetensors"),
        (["invariance", str(f / "run"), "--resolution", "0", "--store", str(f / "store.sqlite")], "'0'"),
        (["bench", "--steps", "-1", "--out", out, "--store", str(f / "store.sqlite")], "'-1'"),
        (["bench", "--method", "nosuch", "--out", out, "--store", str(f / "store.sqlite")], "unknown method 'nosuch'"),
        (["bench", "--data", "nosuch", "--out", out, "--store", str(f / "store.sqlite"), "train.steps=2"],
         "unknown dataset 'nosuch'"),
        (["bench", "--out", out, "--store", str(f / "not_a_db.sqlite")], "not_a_db.sqlite cannot be opened"),
        (["sweep", "nosuch.yaml", "--store", str(f / "store.sqlite")], "nosuch.yaml"),
        (["sweep", str(f / "bad_sweep.yaml"), "--store", str(f / "store.sqlite")], "colour"),
        (["report", "--store", str(f / "not_a_db.sqlite"), "--out", str(f / "out.html")], "cannot be opened"),
        (["results", "--store", str(f / "not_a_db.sqlite")], "cannot be opened"),
        (["convert", str(f / "garbage.pth"), "--out", str(f / "out.safetensors")], "garbage.pth: not loadable"),
        (["convert", str(f / "nope.pth"), "--out", str(f / "out.safetensors")], "nope.pth"),
        (["convert", str(f / "resnet18.pth"), "--backbone", "resnet50", "--out", str(f / "out.safetensors")],
         "check --backbone and --width"),
        (["convert", str(f / "resnet18.pth"), "--width", "0", "--out", str(f / "out.safetensors")], "'0'"),
        (["list", "nosuch"], "invalid choice: 'nosuch'"),
    ]
    if not torch.cuda.is_available():
        table.append(([*ev, "--device", "cuda"], "--device cuda: no CUDA device"))
    return table


def test_every_bad_value_is_one_line_exit_2_and_leaves_nothing(files, capsys):
    left_behind = [files / "out", files / "out.safetensors", files / "out.html"]
    failures = []
    for argv, fragment in cases(files):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        problems = []
        if code != 2:
            problems.append(f"exit code {code}")
        if len(err) != 1 or fragment not in err[0]:
            problems.append(f"stderr {err}")
        problems += [f"left {p}" for p in left_behind if p.exists()]
        if (files / "store.sqlite").exists() and Store(files / "store.sqlite").query():
            problems.append("rows in the store")
        if problems:
            failures.append(f"{argv}: {'; '.join(problems)} (expected {fragment!r})")
    assert not failures, "\n".join(failures)


def test_a_bug_keeps_its_traceback_and_says_so(capsys, monkeypatch):
    import selfsup.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    assert main(["list", "methods"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert "internal error (ZeroDivisionError): this is a bug in selfsup, not in your input" in err.splitlines()[-1]
