"""``data.per_class`` pretrains on a seeded class-balanced subset: the memory bank has one entry per kept image."""

from safetensors.torch import load_file

from selfsup.config import build
from selfsup.train.loop import pretrain


def test_per_class_subset_sizes_the_memory_bank(tmp_path):
    cfg = build({"method": {"name": "npid", "size": 16},
                 "backbone": {"name": "resnet18", "width": 0.0625, "cifar_stem": True},
                 "data": {"name": "sample", "per_class": 5},
                 "train": {"steps": 2, "batch_size": 10, "checkpoint_every": 2, "progress": False}})
    run = pretrain(cfg, tmp_path / "run")
    step = sorted((run / "checkpoints").iterdir())[-1]
    assert load_file(step / "model.safetensors")["bank.memory"].shape == (50, 128)   # 10 classes × 5 images
