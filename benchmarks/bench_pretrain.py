"""Pretraining throughput: SimCLR, ResNet-18 (CIFAR stem), 32 px images, one optimisation step at a time.

Three ways of running the same step, measured in one run on the same device:

- ``selfsup``: the method's batched on-device views (``SimCLR.views``) + forward/backward + LARS step;
- ``per-image views`` (baseline): the same augmentations applied one image at a time in a Python loop,
  as a torchvision-style per-sample pipeline would, then the same step;
- ``model only`` (ceiling): forward/backward/step on views computed beforehand, i.e. no augmentation cost.

Prints images/s of each (an image = one source image, i.e. two views), the ratio selfsup / baseline and
the slowdown against the model-only step, and the time of the views alone. Usage::

    python benchmarks/bench_pretrain.py [--device cuda] [--batch-size 256] [--width 1.0] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfsup import backbones, methods
from selfsup.config import OptimConfig
from selfsup.data import load
from selfsup.methods.base import StepInfo
from selfsup.train.optim import build_optimizer

INFO = StepInfo.at(0)   # the step these calls stand for (no schedule depends on it here)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    data = load("sample", "train")
    images = torch.from_numpy(data.images[: args.batch_size].copy()).permute(0, 3, 1, 2).to(dev)
    images = images.contiguous(memory_format=torch.channels_last)
    index = torch.arange(args.batch_size, device=dev)
    net = backbones.build("resnet18", width=args.width, cifar_stem=True)
    method = methods.build("simclr", net, {"name": "simclr", "view": "simclr_cifar", "temperature": 0.5},
                           num_images=len(data.labels)).to(dev, memory_format=torch.channels_last)
    if args.compile:
        method.backbone.compile()
    opt = build_optimizer(method, OptimConfig(name="lars", weight_decay=1e-6, exclude_norm_and_bias=True), 0.3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)

    def step(views):
        with autocast:
            loss = method(views, INFO)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batched(i):
        with torch.no_grad():
            return method.views(images, index, torch.Generator().manual_seed(i), INFO)

    def per_image(i):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            parts = [method.views(images[j:j + 1], index[j:j + 1], g, INFO) for j in range(len(images))]
        return {k: torch.cat([p[k] for p in parts]).contiguous(memory_format=torch.channels_last) for k in parts[0]}

    fixed = batched(0)

    def timed(make_views):
        for i in range(args.warmup):
            step(make_views(i))
        _sync(dev)
        start = time.perf_counter()
        for i in range(args.steps):
            step(make_views(i))
        _sync(dev)
        return args.steps * args.batch_size / (time.perf_counter() - start)

    for i in range(args.warmup):
        batched(i)
    _sync(dev)
    start = time.perf_counter()
    for i in range(args.steps):
        batched(i)
    _sync(dev)
    views_ms = 1000 * (time.perf_counter() - start) / args.steps
    ours = timed(batched)
    baseline = timed(per_image)
    ceiling = timed(lambda i: fixed)
    result = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "width": args.width,
              "selfsup_img_s": round(ours, 1), "per_image_views_img_s": round(baseline, 1),
              "model_only_img_s": round(ceiling, 1),
              "views_ms_per_step": round(views_ms, 1), "speedup_vs_per_image": round(ours / baseline, 2),
              "slowdown_vs_model_only": round(1 - ours / ceiling, 3)}
    print(f"SimCLR ResNet-18 (width {args.width}) 32 px, batch {args.batch_size} on {result['device']}:")
    print(f"  selfsup (batched views)   {ours:8.1f} img/s")
    print(f"  per-image views baseline  {baseline:8.1f} img/s   -> selfsup is {ours / baseline:.2f}x")
    share = 100 * (1 - ours / ceiling)
    print(f"  model only (no views)     {ceiling:8.1f} img/s   -> steps with views are {share:.1f}% slower")
    print(f"  views alone               {views_ms:8.1f} ms per step (two views of {args.batch_size} images)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
