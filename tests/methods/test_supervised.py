"""The supervised baseline (Ericsson et al. 2021 §3): its loss is the cross-entropy of the classifier's logits
against the labels of exactly the images it was given, it learns the bundled CIFAR-10 sample's classes, and the
training loop hands it the labels of its (subset of the) pretraining split."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from test_learns import fit  # the learns tests' seeded training loop

from selfsup import backbones, methods
from selfsup.config import OptimConfig, build
from selfsup.data import load
from selfsup.methods.base import StepInfo
from selfsup.train.loop import pretrain
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float

INFO = StepInfo.at(0)   # the step these calls stand for (no schedule depends on it here)


def _method(num_images, width=0.125, **params):
    torch.manual_seed(0)
    return methods.build("supervised", backbones.build("resnet18", width=width, cifar_stem=True),
                         {"name": "supervised", **params}, num_images=num_images)


def _sample(split, n=None):
    data = load("sample", split)
    n = n or len(data.labels)
    return torch.from_numpy(data.images[:n].copy()).permute(0, 3, 1, 2), torch.from_numpy(data.labels[:n].copy())


def test_registered_with_the_torchvision_recipe_and_imagenet_normalisation():
    assert "supervised" in methods.available()
    optim = methods.get("supervised").optim_defaults
    assert (optim["name"], optim["lr"], optim["momentum"], optim["weight_decay"]) == ("sgd", 0.1, 0.9, 1e-4)
    schedule = (optim["schedule"], optim["milestones"], optim["gamma"], optim["warmup_epochs"])
    assert schedule == ("step", [30, 60], 0.1, 0)
    assert methods.input_normalization({"name": "supervised"}) == (IMAGENET_MEAN, IMAGENET_STD, False)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_the_cross_entropy_of_the_classifier(smoothing):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 5, 12))
    method = _method(12, width=0.0625, label_smoothing=smoothing, size=12)
    method.set_labels(labels, num_classes=5)
    method.eval()   # BN with running statistics: the same features in both computations
    index = torch.tensor([3, 7, 0, 11, 5, 5])
    views = method.views(images[index], index, torch.Generator().manual_seed(1), INFO)
    assert views["x"].shape == (6, 3, 12, 12)
    assert torch.equal(views["y"], labels[index])        # the labels of the images the index points at
    out = method(views, INFO)

    with torch.no_grad():
        logits = method.head(method.backbone(views["x"])["pre_logits"])
        logp = torch.log_softmax(logits.double(), 1)
        y = labels[index]
        nll = -logp[torch.arange(6), y]
        expected = ((1 - smoothing) * nll - smoothing * logp.mean(1)).mean()   # smoothing ε spread over all K
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=smoothing).item(), rel=1e-6)
    assert out["train_acc"].item() == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_views_are_a_normalised_crop_and_flip_drawn_from_g():
    images, labels = _sample("train", 8)
    method = _method(8, crop_scale=(1.0, 1.0))   # area 100 %: the whole image, flipped or not
    method.set_labels(labels, num_classes=10)
    index = torch.arange(8)
    x = method.views(images, index, torch.Generator().manual_seed(3), INFO)["x"]
    whole = normalize(to_float(images), IMAGENET_MEAN, IMAGENET_STD)
    same = (x - whole).abs().amax((1, 2, 3)) < 1e-5
    flipped = (x - whole.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert bool((same | flipped).all()) and same.any() and flipped.any()
    again = method.views(images, index, torch.Generator().manual_seed(3), INFO)["x"]
    assert torch.equal(x, again)


def test_labels_are_checked():
    method = _method(4, width=0.0625)
    with pytest.raises(RuntimeError, match="setup"):
        method.views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(2), torch.Generator(), INFO)
    with pytest.raises(ValueError, match="expected 4 labels"):
        method.set_labels(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="3 classes"):
        method.set_labels(torch.tensor([0, 1, 3, 2]), num_classes=3)
    with pytest.raises(ValueError, match="two or more classes"):
        method.set_labels(torch.zeros(4, dtype=torch.long))


def test_a_checkpoint_rebuilds_the_classifier_without_labels():
    method = _method(4, width=0.0625)
    method.set_labels(torch.tensor([0, 1, 2, 1]))
    state = method.state_dict()
    # labels come from the data on every run, not from the checkpoint
    assert "labels" not in state and state["head.weight"].shape[0] == 3
    again = _method(4, width=0.0625)
    again.load_state_dict(state)
    assert torch.equal(again.head.weight, method.head.weight)


def test_supervised_learns_the_sample_classes():
    train_x, train_y = _sample("train")
    test_x, test_y = _sample("test")
    method = _method(len(train_x), crop_scale=(0.35, 1.0))
    method.set_labels(train_y, num_classes=10)

    @torch.no_grad()
    def held_out():   # eval-mode BN, whole test images (no crop), ImageNet-normalised as in training
        method.eval()
        logits = method.head(method.backbone(normalize(to_float(test_x), IMAGENET_MEAN, IMAGENET_STD))["pre_logits"])
        method.train()
        return F.cross_entropy(logits, test_y).item(), (logits.argmax(1) == test_y).float().mean().item()

    loss0, acc0 = held_out()
    fit(method, train_x, steps=150, batch=64, optim=OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4))
    loss1, acc1 = held_out()
    # 10 classes, 960 held-out images: chance is 0.10; ~0.32 after 150 steps
    assert acc0 < 0.15
    assert acc1 > 0.22
    assert loss1 < loss0 - 0.3


def _loop_cfg(data, **method):
    return build({"method": {"name": "supervised", "size": 16, **method},
                  "backbone": {"name": "resnet18", "width": 0.0625, "cifar_stem": True},
                  "data": data,
                  "train": {"steps": 2, "batch_size": 10, "checkpoint_every": 2, "progress": False}})


def test_the_loop_trains_on_the_labels_of_the_subset_and_exports_a_backbone(tmp_path, monkeypatch):
    seen = {}
    original = methods.get("supervised").set_labels

    def spy(self, labels, num_classes=None):
        seen["labels"], seen["num_classes"] = labels.clone(), num_classes
        original(self, labels, num_classes)

    monkeypatch.setattr(methods.get("supervised"), "set_labels", spy)
    run = pretrain(_loop_cfg({"name": "sample", "per_class": 5}), tmp_path / "run")
    assert seen["num_classes"] == 10
    assert torch.equal(torch.bincount(seen["labels"]), torch.full((10,), 5))   # 10 classes × 5 kept images
    weights = load_file(run / "backbone.safetensors")
    assert weights and not any(k.startswith("head") for k in weights)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    model = load_file(ckpt / "model.safetensors")
    assert model["head.weight"].shape[0] == 10 and "labels" not in model
    assert "train_acc" in (run / "metrics.csv").read_text().splitlines()[0]


def test_the_loop_refuses_an_unlabeled_dataset(tmp_path):
    folder = tmp_path / "photos"
    (folder / "unlabeled").mkdir(parents=True)   # one folder of images: a single class, nothing to classify
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "unlabeled" / f"{i}.png")
    with pytest.raises(ValueError, match="photos.*1 class"):
        pretrain(_loop_cfg({"name": str(folder), "split": "all"}), tmp_path / "run")


def test_the_loop_resumes_exactly(tmp_path):
    import shutil

    cfg = build({"method": {"name": "supervised", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.0625, "cifar_stem": True},
                 "data": {"name": "sample", "per_class": 5},
                 "train": {"steps": 4, "batch_size": 10, "checkpoint_every": 2, "progress": False}})
    straight = pretrain(cfg, tmp_path / "straight")
    resumed = pretrain(cfg, tmp_path / "resumed")
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")   # as if killed after step 2
    (resumed / "backbone.safetensors").unlink()
    pretrain(cfg, resumed)
    a = load_file(straight / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and "head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
