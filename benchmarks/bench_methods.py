"""Each method's training step against SimCLR's, on the same backbone, batch and images, in one run.

A step is what the loop does: the method's views, forward, backward, ``before_optimizer_step``, an SGD step
and ``after_step`` (momentum update, queue push, bank write). Prints, per method, ms per step, the ratio to
SimCLR's step (the baseline, measured in the same run), and the extra state a method carries beside its
trainable weights (momentum encoders, queues, memory banks: the state_dict's bytes that no optimizer
updates). Usage::

    python benchmarks/bench_methods.py [--methods simclr moco moco_v2 byol] [--width 0.25] [--batch-size 128]
                                       [--steps 5] [--device cuda]

A method may carry options after a colon, ``;``-separated, values in YAML, e.g. ``"swav:crops=[[2, 32, [0.14,
1.0]]]"`` (SwAV with its 2 global crops only). Methods are built for the sample's 4,800 training images (memory
banks and prototype counts see that dataset), and step on the first ``--batch-size`` of them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from selfsup import backbones, methods
from selfsup.data import load
from selfsup.methods.base import StepInfo, TrainSet


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extra_state_bytes(method: torch.nn.Module) -> int:
    """Bytes of the state_dict that the optimiser does not train: buffers and frozen parameters."""
    trained = {id(p) for p in method.parameters() if p.requires_grad}
    total = sum(t.numel() * t.element_size() for t in method.state_dict(keep_vars=True).values()
                if id(t) not in trained)
    return total


def parse(spec: str) -> dict:
    """``name[:key=value;key=value]`` -> the method's config mapping."""
    name, _, options = spec.partition(":")
    params = {"name": name}
    for item in filter(None, options.split(";")):
        key, _, value = item.partition("=")
        params[key.strip()] = yaml.safe_load(value)
    return params


def step_time(spec: str, images: torch.Tensor, labels: torch.Tensor, num_images: int, args) -> tuple[float, int]:
    torch.manual_seed(0)
    net = backbones.build("resnet18", width=args.width, cifar_stem=True)
    params = parse(spec)
    method = methods.build(params["name"], net, params, num_images=num_images).to(args.device)
    method.setup(TrainSet(num_images, labels.to(args.device), int(labels.max()) + 1, None,
                          torch.device(args.device), batch_size=len(images)))
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    index = torch.arange(len(images), device=args.device)
    total = args.warmup + args.steps

    def one(step: int) -> None:
        info = StepInfo.at(step, 1, total)
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            views = method.views(images, index, g, info)
        out = method(views, info)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.before_optimizer_step(info)
        opt.step()
        method.after_step(out.get("state", {}), info)

    for step in range(args.warmup):
        one(step)
    _sync(args.device)
    start = time.perf_counter()
    for step in range(args.warmup, total):
        one(step)
    _sync(args.device)
    return (time.perf_counter() - start) / args.steps * 1000, extra_state_bytes(method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco", "moco_v2", "byol"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    data = load("sample", "train")
    images = torch.from_numpy(data.images[: args.batch_size].copy()).permute(0, 3, 1, 2).to(args.device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.as_tensor(data.labels).long()          # every training image's, for TrainSet
    names = ["simclr"] + [m for m in args.methods if m != "simclr"]   # the baseline first
    rows = {name: step_time(name, images, labels, len(labels), args) for name in names}
    base = rows["simclr"][0]
    print(f"ResNet-18 x{args.width:g} (CIFAR stem), batch {args.batch_size}, 32 px, {args.device}, "
          f"{args.steps} timed steps after {args.warmup}")
    width = max(12, *map(len, rows))
    print(f"{'method':{width}s} {'ms/step':>9s} {'vs simclr':>10s} {'extra state':>12s}")
    for name, (ms, extra) in rows.items():
        print(f"{name:{width}s} {ms:9.1f} {ms / base:9.2f}x {extra / 2**20:10.1f} MiB")
    print(json.dumps({name: {"ms_per_step": round(ms, 2), "ratio_to_simclr": round(ms / base, 3),
                             "extra_state_mib": round(extra / 2**20, 2)} for name, (ms, extra) in rows.items()}))


if __name__ == "__main__":
    main()
