"""Few-shot episodes from cached features vs re-encoding every episode's images (as ssl-transfer does).

    python benchmarks/bench_fewshot.py [--dataset eurosat] [--encoder RUN_DIR] [--episodes 600]

Ericsson et al.'s code (``few_shot.py``) pushes the ``ways · (shots + queries)`` images of each episode
through the backbone (175 images for 5-way 20-shot, 600 times). Ours encodes the pooled images once and
draws the 600 episodes as indices into those features (:mod:`selfsup.evaluate.fewshot`). Compared, in
one run and on the *same* episodes (same seed, same sampler):

- ours: one encoding pass over the pool (the cost paid once per checkpoint × dataset; later protocols
  read it from the cache) + ``episode_accuracies`` over the cached features;
- theirs: per episode, ``encode`` of its 175 images in one batch (eval mode, as their ``ProtoNet``),
  then the prototypical classifier on those features.

Both give the same per-episode accuracies (up to float noise across batch sizes); the output checks it.
The baseline runs the same number of episodes as ours unless ``--baseline-episodes`` is smaller, in
which case its time is extrapolated linearly and the output says so. A last line times ``fewshot``
alone on random 2048-d features (the paper's feature size) of the same pool size.

Images: ``--dataset NAME`` (via ``selfsup.data.load``, all splits pooled, at most ``--per-class``
images of each class; default ``eurosat`` when ``$SELFSUP_DATA`` is set), else random uint8 images of
``--classes × --per-class`` at ``--size`` px, and the output says so. The backbone is a randomly
initialised ``resnet18`` of ``--width`` (ImageNet stem) unless ``--encoder`` names a selfsup run/backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfsup import backbones  # noqa: E402
from selfsup.evaluate.features import Encoder, encode, load_encoder  # noqa: E402
from selfsup.evaluate.fewshot import (  # noqa: E402
    Episodes,
    FewShotConfig,
    episode_accuracies,
    fewshot,
    prototype_predict,
    sample_episodes,
    summarize,
)
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def pooled_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 N×H×W×3 images and labels of the pool, and a line saying where they come from."""
    dataset = args.dataset or ("eurosat" if os.environ.get("SELFSUP_DATA") else None)
    rng = np.random.default_rng(args.seed)
    if dataset is None:
        n = args.classes * args.per_class
        images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(args.classes), args.per_class)
        return images, labels, (f"random uint8 images (no --dataset, $SELFSUP_DATA unset): {args.classes} classes "
                                f"x {args.per_class}, {args.size} px")
    from selfsup.data import load, resolve

    images, labels = [], []
    for split in resolve(dataset).splits:
        part = load(dataset, split, size=args.size)
        images.append(np.asarray(part.images))
        labels.append(np.asarray(part.labels))
    images, labels = np.concatenate(images), np.concatenate(labels)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: args.per_class] for c in np.unique(labels)])
    keep.sort()
    return (images[keep], labels[keep],
            f"{dataset}, all splits pooled, at most {args.per_class} images a class: {len(keep)} images, "
            f"{len(np.unique(labels))} classes, {args.size} px")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", help="a named dataset or path (default: eurosat if $SELFSUP_DATA is set)")
    ap.add_argument("--encoder", help="a selfsup run directory or backbone .safetensors (default: random resnet18)")
    ap.add_argument("--width", type=float, default=0.25, help="resnet18 width multiplier (random backbone)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--classes", type=int, default=20, help="classes of the random-image pool")
    ap.add_argument("--per-class", type=int, default=60, help="images a class in the pool")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--baseline-episodes", type=int, default=None,
                    help="episodes for the re-encoding baseline (default: --episodes; fewer = extrapolated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    base_episodes = min(args.baseline_episodes or args.episodes, args.episodes)

    images, labels, source = pooled_images(args)
    if args.encoder:
        encoder = load_encoder(args.encoder)
    else:
        torch.manual_seed(args.seed)
        net = backbones.build("resnet18", width=args.width, cifar_stem=False)
        encoder = Encoder(net, f"random resnet18 x{args.width}", "random", IMAGENET_MEAN, IMAGENET_STD)
    print(source)
    print(f"{encoder.label}; {args.ways}-way {args.shots}-shot, {args.queries} queries, {args.episodes} episodes; "
          f"device {args.device}, torch threads {torch.get_num_threads()}")

    y = torch.from_numpy(labels).long()
    episodes = sample_episodes(y, args.ways, args.shots, args.queries, args.episodes, seed=args.seed)
    encode(encoder, images[:8], device=args.device)  # warm-up

    # ours: encode the pool once, then every episode from the cached features
    t0 = time.perf_counter()
    feats = encode(encoder, images, device=args.device)["pre_logits"]
    encode_s = time.perf_counter() - t0
    x = feats.to(args.device)
    episode_accuracies(x, Episodes(episodes.support[:2], episodes.query[:2], episodes.classes[:2], [], 0))  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = episode_accuracies(x, episodes)
    episodes_s = time.perf_counter() - t0
    ours_s = encode_s + episodes_s

    # theirs: per episode, encode its images (one batch) and classify the queries
    per_episode = args.ways * (args.shots + args.queries)
    target = torch.arange(args.ways).repeat_interleave(args.queries)
    theirs = []
    t0 = time.perf_counter()
    for e in range(base_episodes):
        rows = torch.cat([episodes.support[e].reshape(-1), episodes.query[e].reshape(-1)]).numpy()
        z = encode(encoder, images[rows], device=args.device, batch_size=per_episode)["pre_logits"]
        n_support = args.ways * args.shots
        pred = prototype_predict(z[:n_support], torch.arange(args.ways).repeat_interleave(args.shots),
                                 z[n_support:])
        # their query order is class-major too: (ways, queries) flattened
        theirs.append(100.0 * (pred == target).double().mean().item())
    base_measured_s = time.perf_counter() - t0
    base_s = base_measured_s * args.episodes / base_episodes
    theirs_t = torch.tensor(theirs, dtype=torch.float64)
    diff = (theirs_t - ours[:base_episodes]).abs().max().item()
    a, b = summarize(ours), summarize(theirs_t)

    print(f"ours   encode pool once ({len(images)} images): {encode_s:7.2f} s")
    print(f"ours   {args.episodes} episodes from cached features: {episodes_s:7.3f} s")
    print(f"ours   total:                                   {ours_s:7.2f} s   acc {a['value']:.2f} ± {a['ci']:.2f}")
    if base_episodes == args.episodes:
        print(f"theirs re-encode {per_episode} images per episode, {args.episodes} episodes: {base_s:7.2f} s   "
              f"acc {b['value']:.2f} ± {b['ci']:.2f}")
    else:
        print(f"theirs re-encode {per_episode} images per episode: measured {base_episodes} episodes in "
              f"{base_measured_s:.2f} s, EXTRAPOLATED linearly to {args.episodes}: {base_s:7.2f} s   "
              f"acc over the {base_episodes} {b['value']:.2f}")
    print(f"speed-up, totals: {base_s / ours_s:.1f}x; episode part alone: {base_s / episodes_s:.0f}x; "
          f"largest per-episode accuracy difference on the same episodes: {diff:.3g} points")

    g = torch.Generator().manual_seed(args.seed)
    wide = torch.rand(len(images), 2048, generator=g).to(args.device)
    cfg = FewShotConfig(ways=args.ways, shots=[args.shots], queries=args.queries, episodes=args.episodes,
                        seed=args.seed)
    fewshot(wide, y, cfg)  # warm-up
    t0 = time.perf_counter()
    fewshot(wide, y, cfg)  # returns floats: the device work is finished when it returns
    wide_s = time.perf_counter() - t0
    print(f"fewshot() alone, {args.episodes} episodes on random 2048-d features of the same pool: {wide_s:.3f} s")
    out = {
        "source": source, "encoder": encoder.label, "device": args.device, "ways": args.ways, "shots": args.shots,
        "queries": args.queries, "episodes": args.episodes, "baseline_episodes": base_episodes,
        "encode_pool_s": round(encode_s, 3), "episodes_s": round(episodes_s, 4), "ours_s": round(ours_s, 3),
        "theirs_s": round(base_s, 3), "extrapolated": base_episodes != args.episodes,
        "speedup": round(base_s / ours_s, 2), "max_episode_acc_diff": diff, "ours_acc": round(a["value"], 3),
        "fewshot_2048d_s": round(wide_s, 4),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
