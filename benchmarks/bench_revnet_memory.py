"""Activation memory of RevNet vs ResNet v2: what autograd keeps for backward after one training forward.

Gomez et al. 2017 (*The Reversible Residual Network*) train RevNets without storing activations: each
unit's input is reconstructed from its output in the backward pass, so the memory kept for backward
does not grow with depth (Kolesnikov et al. 2019 use RevNet-50 with the same units). Measured in one
run, at one input (default: batch 32, 64 px, CIFAR stem, width 0.5), in training mode:

- ``revnet26`` / ``revnet38`` / ``revnet50`` / ``revnet101`` with ``memory_saving=True``;
- the same networks with ``memory_saving=False`` (plain autograd through every unit);
- ``resnet50_v2`` / ``resnet101_v2``, whose v2 bottleneck units are RevNet's F with a shortcut.

"Saved" is the sum of the bytes of every tensor autograd saves for backward during the forward pass,
collected with ``torch.autograd.graph.saved_tensors_hooks``; each storage is counted once (views such as
``chunk`` halves share one storage), and parameters and buffers are left out, so it is the activation
memory alone. It is exact and device-independent (it works on CPU). With ``--device cuda`` the script
also reports the peak of ``torch.cuda.max_memory_allocated`` over forward + backward, above the memory
held before the forward (model, input), which includes the recomputation and the gradients.

Prints a table (saved MiB per model, fwd+bwd seconds), the ratios memory_saving / plain, the growth
revnet101 / revnet26 (memory_saving) against resnet101_v2 / resnet50_v2, then one JSON line. Usage::

    python benchmarks/bench_revnet_memory.py [--device cuda] [--batch-size 32] [--image-size 64] [--width 0.5]
        [--imagenet-stem] [--threads 1]

The seconds column is one cold forward + backward per model, for orientation only (it shows the cost of
recomputation); the memory figures are the result and do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from selfsup import backbones

REVNETS = ("revnet26", "revnet38", "revnet50", "revnet101")
RESNETS = ("resnet50_v2", "resnet101_v2")
MIB = 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(net: nn.Module, images: torch.Tensor, device: str) -> dict[str, float]:
    """Bytes saved for backward by one training forward (params/buffers excluded), and fwd+bwd cost."""
    exclude = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    storages: dict[tuple[str, int], int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    net.train()
    net.zero_grad(set_to_none=True)
    cuda = device.startswith("cuda")
    _sync(device)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(images)["pre_logits"]
    out.square().mean().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    result = {"saved_mib": sum(storages.values()) / MIB, "saved_tensors": count, "fwd_bwd_s": seconds}
    if cuda:
        result["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
    net.zero_grad(set_to_none=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--imagenet-stem", action="store_true", help="7x7/2 root + max-pool instead of the CIFAR stem")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: avoids OpenMP oversubscription on a shared CPU; 0 = torch's "
        "default). Only the fwd+bwd seconds depend on it, not the memory figures",
    )
    args = parser.parse_args()
    dev = args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=dev)
    stem = dict(width=args.width, cifar_stem=not args.imagenet_stem)

    runs: list[tuple[str, str, dict]] = [(n, "memory_saving", {"memory_saving": True}) for n in REVNETS]
    runs += [(n, "plain", {"memory_saving": False}) for n in REVNETS]
    runs += [(n, "plain", {}) for n in RESNETS]
    rows: dict[str, dict[str, float]] = {}
    for name, mode, kw in runs:
        torch.manual_seed(0)
        net = backbones.build(name, **stem, **kw).to(dev)
        row = measure(net, images, dev)
        row["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        rows[f"{name}/{mode}"] = row
        del net
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    cuda = dev.startswith("cuda")
    stem_name = "imagenet" if args.imagenet_stem else "cifar"
    print(
        f"Activation memory kept for backward, batch {args.batch_size}, {args.image_size} px, width {args.width}, "
        f"{stem_name} stem, on {device_name} ({torch.get_num_threads()} threads):"
    )
    header = f"  {'model':<28}{'params M':>9}{'saved MiB':>11}{'tensors':>9}{'fwd+bwd s':>11}"
    print(header + (f"{'cuda peak MiB':>15}" if cuda else ""))
    for key, row in rows.items():
        line = f"  {key:<28}{row['params_m']:9.2f}{row['saved_mib']:11.1f}{row['saved_tensors']:9d}"
        line += f"{row['fwd_bwd_s']:11.2f}"
        print(line + (f"{row['cuda_peak_mib']:15.1f}" if cuda else ""))

    def ratio(a: str, b: str, field: str = "saved_mib") -> float:
        return rows[a][field] / rows[b][field]

    saving_vs_plain = {n: round(ratio(f"{n}/memory_saving", f"{n}/plain"), 3) for n in REVNETS}
    rev_growth = ratio("revnet101/memory_saving", "revnet26/memory_saving")
    rev50_growth = ratio("revnet101/memory_saving", "revnet50/memory_saving")
    plain_growth = ratio("revnet101/plain", "revnet26/plain")
    res_growth = ratio("resnet101_v2/plain", "resnet50_v2/plain")
    print(
        "  memory_saving / plain (saved MiB): "
        + ", ".join(f"{n} {r:.3f} ({1 / r:.1f}x less)" for n, r in saving_vs_plain.items())
    )
    print(
        f"  growth with depth (saved MiB): revnet101/revnet26 memory_saving {rev_growth:.3f}, "
        f"revnet101/revnet50 memory_saving {rev50_growth:.3f}; "
        f"revnet101/revnet26 plain {plain_growth:.3f}; resnet101_v2/resnet50_v2 {res_growth:.3f}"
    )
    print(
        f"  revnet50 memory_saving vs resnet50_v2: "
        f"{ratio('revnet50/memory_saving', 'resnet50_v2/plain'):.3f} of its activation memory"
    )
    result = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "width": args.width,
        "cifar_stem": not args.imagenet_stem,
        "saved_mib": {k: round(r["saved_mib"], 2) for k, r in rows.items()},
        "fwd_bwd_s": {k: round(r["fwd_bwd_s"], 3) for k, r in rows.items()},
        "memory_saving_over_plain": saving_vs_plain,
        "growth_revnet101_over_revnet26_memory_saving": round(rev_growth, 3),
        "growth_revnet101_over_revnet50_memory_saving": round(rev50_growth, 3),
        "growth_revnet101_over_revnet26_plain": round(plain_growth, 3),
        "growth_resnet101_v2_over_resnet50_v2": round(res_growth, 3),
        "revnet50_memory_saving_over_resnet50_v2": round(ratio("revnet50/memory_saving", "resnet50_v2/plain"), 3),
    }
    if cuda:
        result["cuda_peak_mib"] = {k: round(r["cuda_peak_mib"], 1) for k, r in rows.items()}
        result["cuda_peak_growth_revnet101_over_revnet26_memory_saving"] = round(
            ratio("revnet101/memory_saving", "revnet26/memory_saving", "cuda_peak_mib"), 3
        )
        result["cuda_peak_growth_resnet101_v2_over_resnet50_v2"] = round(
            ratio("resnet101_v2/plain", "resnet50_v2/plain", "cuda_peak_mib"), 3
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
