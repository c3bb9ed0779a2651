"""The pretraining loop: one page, read top to bottom, on Lightning Fabric (CPU, GPU, DDP, bf16).

Exact resume rests on three rules:

1. data order is a function of (seed, epoch) (``epoch_order``), sliced per step and per rank;
2. every random draw of step s (augmentation, dropout) comes from generators seeded by
   (seed, step, rank) (``step_seed``), not from a stream that runs across steps;
3. the lr is a function of the step, and everything stateful (weights, BN statistics, optimizer
   moments, memory banks, queues, EMA) is in the checkpoint.

So a run killed at any step and restarted with the same command ends with the same weights, bit
for bit on a CPU, as the run that was never interrupted.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from selfsup import backbones, methods
from selfsup.config import RunConfig, check_data, save_config, to_dict, validate
from selfsup.data import load
from selfsup.data.loader import DeviceImages
from selfsup.data.registry import per_class_subset
from selfsup.durable import check_free_space, check_writable
from selfsup.errors import Preempted, UserError
from selfsup.methods.base import StepInfo, TrainSet
from selfsup.nn.distributed import exclude_sharded_from_ddp, full_state_dict
from selfsup.train import checkpoint
from selfsup.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from selfsup.train.preempt import StopSignals, check_requeue, requeue
from selfsup.train.progress import MetricsLog, Progress

# Settings a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = {"train.progress", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.requeue"}


class NonFiniteLoss(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return torch.randperm(num_images, generator=g)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch_start``'s generator (k-means initialisation, ...): one per (seed, epoch)."""
    return (seed * 1_000_033 + epoch * 104_729 + 17) % (2**63 - 1)


def make_fabric(cfg: RunConfig):
    from lightning_fabric import Fabric

    t = cfg.train
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    strategy = "ddp" if (t.num_nodes > 1 or str(t.devices) not in ("1", "auto")) else "auto"
    return Fabric(accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes,
                  strategy=strategy, precision=precision)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "method":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_run(cfg: RunConfig, out: Path) -> None:
    """A run directory with checkpoints belongs to one configuration; resuming it with another would mix two
    runs. (A directory whose run never reached a checkpoint holds nothing to mix: it starts anew.)"""
    import yaml

    saved_path = out / "config.yaml"
    if not saved_path.exists() or checkpoint.latest(out) is None:
        return
    with open(saved_path) as f:
        saved = _flat(yaml.safe_load(f))
    now = _flat(to_dict(cfg))
    diff = [k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if diff:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(diff))
        raise UserError(f"{out} holds a run with other settings ({details}). Resume it with the same "
                        f"settings, or pass a new --out for a new run.")


def export_backbone(backbone: torch.nn.Module, cfg: RunConfig, path: Path) -> None:
    """The trained backbone alone, in safetensors with its architecture in the metadata, so that
    ``selfsup evaluate`` and other tools can rebuild it without this run's config."""
    import json

    mean, std, standardize = methods.input_normalization(cfg.method)
    arch = to_dict(cfg.backbone)   # an export may add layers (SimCLR v2's projector layer): its build options
    arch["options"] = {**arch["options"], **getattr(backbone, "build_options", {})}
    meta = {"backbone": json.dumps(arch), "method": cfg.method["name"], "format": "selfsup-1",
            "mean": json.dumps(mean), "std": json.dumps(std), "standardize": json.dumps(standardize)}
    tmp = path.with_suffix(".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
                  str(tmp), metadata=meta)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({err.strerror or err}); the run's checkpoints are intact: free "
                        f"space and re-run the same command to export it") from err
    tmp.replace(path)


OUT_FIX = "pass --out a folder you can write to"


def pretrain(cfg: RunConfig, out: str | Path) -> Path | None:
    """Train ``cfg.method`` on ``cfg.data`` into run directory ``out`` (resuming what is there).
    Returns the run directory on global rank 0 and None on the other ranks.

    Everything that can be refused is refused before ``out`` is written: the config (types, ranges), the
    output folder (writable, enough free space for the checkpoints), the data (found, decodable, enough
    images for the batch) and the method's views of it. Raises :class:`selfsup.errors.Preempted` after
    checkpointing when SIGTERM or SIGUSR1 arrives (:mod:`selfsup.train.preempt`).
    """
    if not str(out).strip():   # Path("") is the working directory: never a run directory by accident
        raise UserError("the run directory (--out) is an empty string; pass the folder the run should go to")
    out = Path(out)
    cfg = validate(cfg)
    t = cfg.train
    if t.requeue:
        check_requeue()
    check_writable(out, "run directory", OUT_FIX)
    fabric = make_fabric(cfg)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size

    data = load(cfg.data.name, cfg.data.split, size=cfg.data.size, on_error=cfg.data.on_error)
    if cfg.data.per_class:  # CPU-sized studies: the same seeded images on every rank and every restart
        keep = per_class_subset(np.asarray(data.labels), cfg.data.per_class)
        images = DeviceImages(np.ascontiguousarray(data.images[keep]), fabric.device,
                              resident_bytes=cfg.data.resident_bytes, labels=np.asarray(data.labels)[keep])
        n = len(keep)
    else:
        images = DeviceImages(data, fabric.device, resident_bytes=cfg.data.resident_bytes)
        n = len(data.labels)
    check_data(cfg, n, world)
    local_batch = t.batch_size // world
    steps_per_epoch = n // t.batch_size
    total = t.steps or math.ceil((t.epochs or 1) * steps_per_epoch)

    torch.manual_seed(t.seed)  # identical initial weights on every rank and every restart
    backbone = backbones.build(cfg.backbone.name, width=cfg.backbone.width, cifar_stem=cfg.backbone.cifar_stem,
                               **cfg.backbone.options)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    method = methods.build(cfg.method["name"], backbone, cfg.method, num_images=n)
    method = method.to(fabric.device, memory_format=memory_format)
    method.setup(TrainSet(n, torch.as_tensor(images.labels).long().to(fabric.device), len(data.classes), images,
                          fabric.device, rank, world, f"{cfg.data.name!r} ({cfg.data.split} split)", t.batch_size))
    with torch.no_grad():  # crop and patch sizes against these images: fail here, not at step 1 of a queued job
        probe = torch.arange(min(2, n), device=fabric.device)
        method.views(images.get(probe), probe, torch.Generator().manual_seed(0),
                     StepInfo.at(0, steps_per_epoch, total, t.seed))
    base_lr = scaled_lr(cfg.optim, t.batch_size)
    optimizer = build_optimizer(method, cfg.optim, base_lr)
    slots = 2 if cfg.optim.name == "adamw" else 1
    need = (t.keep_checkpoints + 1) * checkpoint.size_estimate(method, slots)
    check_free_space(out, need, "run directory", f"free space there or {OUT_FIX} on a larger disk")

    if fabric.is_global_zero:  # validated and built: only now does the run directory hold anything
        out.mkdir(parents=True, exist_ok=True)
        check_same_run(cfg, out)
        save_config(cfg, out / "config.yaml")
    fabric.barrier()
    start = 0
    last = checkpoint.latest(out)
    if last is not None:
        start = checkpoint.restore(last, method, optimizer)["step"]
        fabric.print(f"resuming {out} from step {start}")
    if t.compile:
        method.backbone.compile()
    exclude_sharded_from_ddp(method)
    model, optimizer = fabric.setup(method, optimizer)
    raw = model.module  # views() and after_step() are not forward passes: call them on the raw module

    def save(done: int) -> Path | None:
        # a collective: each rank holds a shard of a memory bank, the checkpoint holds it whole, so a run
        # resumes on any number of processes
        state = full_state_dict(raw)
        path = None
        if fabric.is_global_zero:
            path = checkpoint.save(out, done, raw, optimizer, keep=t.keep_checkpoints, state=state,
                                   meta={"epoch": done / steps_per_epoch, "total": total})
        fabric.barrier()
        return path

    log = MetricsLog(out / "metrics.csv", start) if fabric.is_global_zero else None
    progress = Progress(total, start, enabled=t.progress and fabric.is_global_zero)
    order, order_epoch, last_log = None, -1, time.perf_counter()
    images_since_log = 0
    model.train()
    with StopSignals() as stop:
        for step in range(start, total):
            info = StepInfo.at(step, steps_per_epoch, total, t.seed)
            if info.epoch != order_epoch:
                order, order_epoch = epoch_order(n, t.seed, info.epoch), info.epoch
            if info.within == 0:   # an epoch begins (a run resumed mid-epoch has its results in the checkpoint)
                raw.epoch_start(info, torch.Generator().manual_seed(epoch_seed(t.seed, info.epoch)))
            index = order[info.within * t.batch_size:(info.within + 1) * t.batch_size][rank * local_batch:
                                                                                       (rank + 1) * local_batch]
            seed = step_seed(t.seed, step, rank)
            torch.manual_seed(seed)                      # dropout and any other in-model randomness
            g = torch.Generator().manual_seed(seed)      # augmentation parameters
            lr = lr_at(step, total, base_lr, cfg.optim, steps_per_epoch)
            set_lr(optimizer, lr)

            with torch.no_grad():
                views = raw.views(images.get(index.to(fabric.device)), index.to(fabric.device), g, info)
                views = {k: v.contiguous(memory_format=memory_format) if v.ndim == 4 else v for k, v in views.items()}
            out_step = model(views, info)
            state = out_step.pop("state", {})
            loss = out_step["loss"]
            bad = (~torch.isfinite(loss.detach())).float()
            if world > 1:  # every rank must stop at the same step, or the others would hang in the next collective
                bad = fabric.all_reduce(bad, reduce_op="sum")
            if bad > 0:
                kept = checkpoint.latest(out)
                raise NonFiniteLoss(
                    f"loss became {loss.item()} (on this rank) at step {step} (lr {lr:.4g}); the run stopped before "
                    f"updating the weights. Last good checkpoint: {kept or 'none yet'}. Lower optim.lr or check the "
                    f"data.")
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            raw.before_optimizer_step(info)
            optimizer.step()
            raw.after_step(state, info)
            images_since_log += t.batch_size

            done = step + 1
            if done % t.log_every == 0 or done == total:
                scalars = {k: float(v.detach()) for k, v in out_step.items()}
                rate = progress.update(done, images_since_log, scalars)
                images_since_log = 0
                if log is not None:
                    now = time.perf_counter()
                    log.log({"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr, **scalars,
                             "images_per_s": rate, "seconds": round(now - last_log, 3)})
                    last_log = now
            stopping = torch.tensor(float(stop.requested is not None))
            if world > 1:  # the signal may reach one rank first: all stop after the same step
                stopping = fabric.all_reduce(stopping.to(fabric.device), reduce_op="sum")
            if done % t.checkpoint_every == 0 or done == total or stopping > 0:
                path = save(done)
            if stopping > 0 and done < total:
                progress.close()
                if log is not None:
                    log.close()
                how = f"; requeued with `{requeue()}`" if t.requeue and fabric.is_global_zero else ""
                fabric.print(f"{stop.requested or 'a stop signal'} received: stopped after step {done} of {total}, "
                             f"checkpoint {path or checkpoint.latest(out)}{how}")
                raise Preempted(stop.requested or "a stop signal", done, str(checkpoint.latest(out)), str(out))
    progress.close()
    if log is not None:
        log.close()
    if fabric.is_global_zero:
        if start == total:
            fabric.print(f"{out} is already complete ({total} steps)")
        export_backbone(raw.export(), cfg, out / "backbone.safetensors")
    fabric.barrier()
    return out if fabric.is_global_zero else None
