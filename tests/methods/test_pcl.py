"""PCL v1 / v2: the released recipes' defaults, the K scaling rule's numbers, ProtoNCE written out by hand, the
concentration φ against main_pcl.py's numpy on a planted clustering, epoch_start (nothing before the warm-up,
k-means of the momentum features after it, equal to nn.kmeans called directly), the views' negative prototypes,
2 gloo processes clustering their shards into the one-process buffers, exact resume mid-epoch and right after a
clustering, learning on the bundled CIFAR-10 sample, and 5 steps of the training loop with the shipped defaults."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from conftest import close_group, run_processes
from safetensors.torch import load_file

from selfsup import backbones, methods
from selfsup.config import OptimConfig, build
from selfsup.data import load
from selfsup.errors import UserError
from selfsup.losses import info_nce, proto_nce
from selfsup.methods.base import StepInfo, TrainSet
from selfsup.methods.moco import MoCo, MoCoV2
from selfsup.methods.pcl import PCL, PCLV2, concentration, scaled_clusters
from selfsup.nn.kmeans import spherical_kmeans
from selfsup.train.optim import build_optimizer
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _method(cls=PCL, num_images=32, seed=0, width=0.125, **params):
    torch.manual_seed(seed)
    return cls(backbones.build("resnet18", width=width, cifar_stem=True), cls.make_config(params), num_images)


class _Images:
    """DeviceImages' ``get`` over a uint8 N×3×H×W tensor."""

    def __init__(self, images):
        self.images = images

    def get(self, index):
        return self.images[index.cpu()]


def _train_set(images, batch=8):
    n = len(images)
    return TrainSet(n, torch.zeros(n, dtype=torch.long), 10, _Images(images), torch.device("cpu"), batch_size=batch)


def _uint8(n, seed=0, size=16):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _embed(encoder, x):
    return F.normalize(encoder["head"](encoder["backbone"](x)["pre_logits"]), dim=1)


def _sgd_step(method, opt, views, info):
    out = method(views, info)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    method.after_step(out["state"], info)
    return out


def test_defaults_are_the_released_recipes(monkeypatch):
    v1, v2 = PCL.Config(), PCLV2.Config()
    common = (128, 16384, 0.999, 0.2, (25000, 50000, 100000), 1_281_167, 20, 20)
    for cfg in (v1, v2):
        assert (cfg.embed_dim, cfg.queue_size, cfg.momentum, cfg.temperature, tuple(cfg.num_clusters),
                cfg.clusters_reference_images, cfg.warmup_epochs, cfg.kmeans_iterations) == common
    assert (v1.mlp, v1.view, v2.mlp, v2.view) == (False, "moco_v1", True, "moco_v2")
    assert PCL.optim_defaults == MoCo.optim_defaults == dict(name="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9,
                                                             schedule="step", milestones=[120, 160], gamma=0.1,
                                                             warmup_epochs=0)
    assert PCLV2.optim_defaults == MoCoV2.optim_defaults and PCLV2.optim_defaults["schedule"] == "cosine"
    assert (PCL.name, PCLV2.name) == ("pcl", "pcl_v2")
    monkeypatch.setitem(methods.METHODS, "pcl", PCL)
    monkeypatch.setitem(methods.METHODS, "pcl_v2", PCLV2)
    net = backbones.build("resnet18", width=0.125, cifar_stem=True)
    pcl = methods.build("pcl", net, {"name": "pcl"}, num_images=4800)
    assert [type(m) for m in pcl.head] == [torch.nn.Linear] and pcl.head[0].out_features == 128
    assert pcl.queue.queue.shape == (16384, 128) and pcl.clusters == (94, 187, 375)
    for m, k in enumerate((94, 187, 375)):              # buffers sized by the K rule at construction
        c, phi, a = pcl.clustering(m)
        assert c.shape == (k, 128) and phi.shape == (k,) and a.shape == (4800,) and a.dtype == torch.long
    assert int(pcl.clustered) == 0 and "clustered" in pcl.state_dict()
    v2m = methods.build("pcl_v2", backbones.build("resnet18", width=0.125, cifar_stem=True), {"name": "pcl_v2"}, 4800)
    d = v2m.backbone.out_dim
    assert [(type(m), getattr(m, "out_features", None)) for m in v2m.head] == [
        (torch.nn.Linear, d), (torch.nn.ReLU, None), (torch.nn.Linear, 128)]
    assert methods.input_normalization({"name": "pcl_v2"}) == (IMAGENET_MEAN, IMAGENET_STD, False)
    with pytest.raises(UserError, match="symmetric"):
        _method(symmetric=True)
    with pytest.raises(UserError, match="more clusters than the 32 training images"):
        _method(num_clusters=(40,), clusters_reference_images=None)
    with pytest.raises(ValueError, match="warmup_epochs"):
        PCL.make_config({"warmup_epochs": -1})


def test_the_k_rule_scales_imagenet_counts_with_the_dataset():
    imagenet = (25000, 50000, 100000)
    assert scaled_clusters(imagenet, 1_281_167) == imagenet
    assert scaled_clusters(imagenet, 4800) == (94, 187, 375)          # the bundled sample
    assert scaled_clusters(imagenet, 50000) == (976, 1951, 3903)      # CIFAR-10
    assert scaled_clusters(imagenet, 30000) == (585, 1171, 2342)      # Tiny ImageNet-100
    assert scaled_clusters(imagenet, 512) == (10, 20, 40)
    assert scaled_clusters(imagenet, 32) == (2, 2, 2)                 # at least 2 ...
    assert scaled_clusters(imagenet, 1) == (1, 1, 1)                  # ... and at most N
    assert scaled_clusters((5, 50), 20, None) == (5, 20)              # no reference: as given, at most N


def test_proto_nce_is_info_nce_plus_the_prototype_cross_entropy_written_out():
    def unit(*angles):
        return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)

    q, k, queue = unit(0.1, 1.2), unit(0.3, 1.0), unit(2.0, 3.0, 4.0)
    tau = 0.2
    cents = [unit(0.0, 1.5, 3.0, 4.5), unit(0.5, 2.5, 5.0)]
    phis = [torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([0.25, 0.15, 0.2],
                                                                                   dtype=torch.float64)]
    pos = [torch.tensor([0, 1]), torch.tensor([0, 0])]                  # both images in cluster 0 of clustering 2
    neg = [torch.tensor([3, 2]), torch.tensor([2])]

    def dot(a, b):
        return float(a[0] * b[0] + a[1] * b[1])

    def ce(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    nce = 0.0
    for i in range(2):        # [q·k₊, q·queue]/τ, label 0
        nce += ce([dot(q[i], k[i]) / tau] + [dot(q[i], n) / tau for n in queue], 0) / 2
    proto = 0.0
    for c, phi, p, n in zip(cents, phis, pos, neg, strict=True):
        ids = p.tolist() + n.tolist()          # columns: the batch's positive prototypes, then the r negatives
        for i in range(2):   # row i: q_i·c_j/φ_j over the columns, label i
            proto += ce([dot(q[i], c[j]) / float(phi[j]) for j in ids], i) / 2 / 2   # mean over B, then over M
    got = proto_nce(q, k, queue, tau, cents, phis, pos, neg)
    assert abs(float(got) - (nce + proto)) < 1e-6                          # info_nce computes in float32
    assert abs(float(got - proto_nce(q, k, queue, tau)) - proto) < 1e-12   # the prototype term in float64
    assert abs(float(proto_nce(q, k, queue, tau)) - nce) < 1e-6         # no clustering: InfoNCE


def _hand_density(dist_sq, im2cluster, k, temperature):
    """main_pcl.py run_kmeans, line for line (D: faiss's squared distances)."""
    Dcluster = [[] for _ in range(k)]
    for im, i in enumerate(im2cluster):
        Dcluster[i].append(dist_sq[im])
    density = np.zeros(k)
    for i, dist in enumerate(Dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
    dmax = density.max()
    for i, dist in enumerate(Dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


def test_concentration_follows_main_pcl_on_a_planted_clustering():
    rng = np.random.default_rng(0)
    sizes = [1, 2, 5, 12, 3, 1, 8, 4, 6, 7, 0, 20]                     # singletons and an empty cluster
    im2cluster = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    spread = rng.uniform(0.05, 0.8, len(sizes))                         # each cluster its own scale
    dist_sq = (spread[im2cluster] * rng.uniform(0.5, 1.5, len(im2cluster))) ** 2
    want = _hand_density(dist_sq, im2cluster, len(sizes), 0.2)
    got = concentration(torch.from_numpy(dist_sq), torch.from_numpy(im2cluster), len(sizes), 0.2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert abs(float(got.mean()) - 0.2) < 1e-12
    raw = [np.sqrt(dist_sq[im2cluster == c]).mean() / np.log(s + 10) for c, s in enumerate(sizes) if s > 1]
    assert got[0] == got[5] == got[10] == got.max()          # ≤ 1 member: dmax, then clipped to the 90th percentile
    assert len(set(np.round(got.numpy(), 12))) < len(sizes) - 2          # the clip ties the extremes
    assert max(raw) / min(raw) > float(got.max() / got.min())


def test_epoch_start_does_nothing_before_the_warmup_and_clusters_the_momentum_features_after_it():
    images = _uint8(32)
    method = _method(num_clusters=(4, 6), clusters_reference_images=None, warmup_epochs=2, queue_size=16)
    method.setup(_train_set(images))
    before = copy.deepcopy(method.state_dict())
    method.epoch_start(StepInfo.at(4, steps_per_epoch=4), torch.Generator().manual_seed(7))        # epoch 1
    assert all(torch.equal(v, method.state_dict()[n]) for n, v in before.items()) and int(method.clustered) == 0
    method.train()
    method.epoch_start(StepInfo.at(8, steps_per_epoch=4), torch.Generator().manual_seed(7))        # epoch 2
    assert method.key_encoder.target.training and int(method.clustered) == 1
    with torch.no_grad():   # the momentum encoder in eval mode on the un-augmented, normalised images
        target = copy.deepcopy(method.key_encoder.target).eval()
        x = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD).view(1, 3, 1, 1)
        z = _embed(target, x)
    g = torch.Generator().manual_seed(7)
    for m, k in enumerate((4, 6)):
        seed = int(torch.randint(0, 2**62, (), generator=g))           # one seed per clustering, from g
        ref = spherical_kmeans(z, k, 20, seed=seed)
        c, phi, a = method.clustering(m)
        torch.testing.assert_close(c, ref.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, ref.assignments)
        torch.testing.assert_close(phi, concentration(2 - 2 * ref.similarity, ref.assignments, k, 0.2).float())
    # the views of a step after the warm-up carry r negative ids per clustering: not the batch's clusters
    index = torch.arange(8)
    info = StepInfo.at(9, steps_per_epoch=4)
    views = method.views(images[index], index, torch.Generator().manual_seed(3), info)
    moco = MoCo.views(method, images[index], index, torch.Generator().manual_seed(3), info)
    assert torch.equal(views["query"], moco["query"]) and torch.equal(views["key"], moco["key"])
    for m in range(2):
        a = method.clustering(m)[2]
        neg = views[f"proto_negatives_{m}"]
        free = set(range(int(a.max()) + 1)) - set(a[index].tolist())
        assert sorted(neg.tolist()) == sorted(free)                     # fewer than r = 16 left: all of them
    out = method(views, info)
    c0, p0, a0 = method.clustering(0)
    c1, p1, a1 = method.clustering(1)
    with torch.no_grad():
        q = torch.cat([_embed(method._online(), chunk) for chunk in views["query"].chunk(2)])
    k = out["state"]["keys"]
    want = proto_nce(q, k, method.queue.keys(), 0.2, [c0, c1], [p0, p1], [a0[index], a1[index]],
                     [views["proto_negatives_0"], views["proto_negatives_1"]])
    torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-6)
    assert float(out["loss_proto"]) > 0


def test_before_the_warmup_the_loss_is_info_nce_and_after_it_a_clustering_is_required():
    images = _uint8(16)
    method = _method(num_images=16, num_clusters=(4,), clusters_reference_images=None, warmup_epochs=1,
                     queue_size=16)
    index = torch.arange(8)
    info = StepInfo.at(0, steps_per_epoch=2)
    views = method.views(images[index], index, torch.Generator().manual_seed(0), info)
    assert set(views) == {"query", "key", "index"}
    out = method(views, info)
    with torch.no_grad():
        q = torch.cat([_embed(method._online(), chunk) for chunk in views["query"].chunk(2)])
    torch.testing.assert_close(out["loss"].detach(), info_nce(q, out["state"]["keys"], method.queue.keys(), 0.2),
                               rtol=1e-5, atol=1e-6)
    assert float(out["loss_proto"]) == 0
    later = StepInfo.at(2, steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="epoch_start must run first"):
        method(method.views(images[index], index, torch.Generator().manual_seed(0), later), later)


def test_kill_and_resume_mid_epoch_and_right_after_a_clustering_equals_the_uninterrupted_run():
    images = _uint8(32)
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4)
    params = dict(num_clusters=(4, 6), clusters_reference_images=None, warmup_epochs=1, queue_size=16)
    spe, total = 4, 12

    def run(method, opt, steps):
        losses = []
        for s in steps:
            info = StepInfo.at(s, steps_per_epoch=spe, total=total, seed=1)
            if info.within == 0:
                method.epoch_start(info, torch.Generator().manual_seed(100 + info.epoch))
            g = torch.Generator().manual_seed(s)
            index = torch.randperm(32, generator=g)[:8]
            out = _sgd_step(method, opt, method.views(images[index], index, g, info), info)
            losses.append((float(out["loss"].detach()), float(out["loss_proto"])))
        return losses

    straight = _method(**params)
    straight.setup(_train_set(images))
    opt = build_optimizer(straight, cfg, cfg.lr)
    saved, losses = {}, []
    for s in range(total):
        saved[s] = ({k: v.clone() for k, v in straight.state_dict().items()}, copy.deepcopy(opt.state_dict()))
        losses += run(straight, opt, [s])
    assert all(p == 0 for _, p in losses[:4]) and all(p > 0 for _, p in losses[4:])   # ProtoNCE from epoch 1
    final = straight.state_dict()
    for kill in (5, 6, 8, 9):   # mid-epoch 1, right after the clustering of epoch 2 (at 8) and one step later
        resumed = _method(seed=1, **params)                        # other weights and buffers until loaded
        resumed.setup(_train_set(images))
        resumed.load_state_dict(saved[kill][0])
        opt2 = build_optimizer(resumed, cfg, cfg.lr)
        opt2.load_state_dict(saved[kill][1])
        assert run(resumed, opt2, range(kill, total)) == losses[kill:], kill
        for key, value in resumed.state_dict().items():    # weights, key encoder, queue, centroids, φ, im2cluster
            assert torch.equal(value, final[key]), (kill, key)


# ---------------------------------------------------------------------------------------- 2 processes
def _cluster_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        method = _method(num_clusters=(4, 6), clusters_reference_images=None, warmup_epochs=0, queue_size=16)
        images = _uint8(32)
        method.setup(TrainSet(32, torch.zeros(32, dtype=torch.long), 10, _Images(images), torch.device("cpu"),
                              rank, 2, batch_size=8))
        method.epoch_start(StepInfo.at(0), torch.Generator().manual_seed(7))
        results.put((rank, {n: v.numpy() for n, v in method.state_dict().items()
                            if n.startswith(("centroids_", "density_", "im2cluster_"))}))
    finally:
        close_group()


def test_two_processes_cluster_their_shards_into_the_same_buffers_as_one_process():
    # each rank encodes images rank::2; k-means all-reduces (initial centroids: rank 0's rows, i.e. images 0, 2, …)
    # and the assignments are gathered back into image order, so both ranks hold what one process computes
    method = _method(num_clusters=(4, 6), clusters_reference_images=None, warmup_epochs=0, queue_size=16)
    images = _uint8(32)
    z = method.features(_train_set(images))
    g = torch.Generator().manual_seed(7)
    got = run_processes(_cluster_worker, 2)
    for m, k in enumerate((4, 6)):
        seed = int(torch.randint(0, 2**62, (), generator=g))
        init = z[0::2][torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:k]]
        ref = spherical_kmeans(z, k, 20, seed=seed, init=init)
        phi = concentration(2 - 2 * ref.similarity, ref.assignments, k, 0.2).float()
        for _, state in got:
            assert np.array_equal(state[f"im2cluster_{m}"], ref.assignments.numpy())
            torch.testing.assert_close(torch.from_numpy(state[f"centroids_{m}"]), ref.centroids, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(state[f"density_{m}"]), phi, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- learning
def _sample(split, n):
    data = load("sample", split)
    pick = torch.linspace(0, len(data.labels) - 1, n).long().numpy()     # the sample is sorted by class
    return torch.from_numpy(data.images[pick].copy()).permute(0, 3, 1, 2)


@torch.no_grad()
def _held_out(method, images):
    """test_moco's measure: eval mode, fixed draws, InfoNCE of view-1 queries against the view-2 keys of all
    held-out images (chance log len)."""
    method.eval()
    v = method.views(images, torch.arange(len(images)), torch.Generator().manual_seed(123), StepInfo.at(0))
    q, k = _embed(method._online(), v["query"]), _embed(method.key_encoder.target, v["key"])
    method.train()
    logits = q @ k.T / method.cfg.temperature
    return float(F.cross_entropy(logits, torch.arange(len(images))))


def test_pcl_learns_to_tell_held_out_images_apart_by_their_views():
    # ResNet-18 of width 1/4 at 16 px (the sample's 32 px images resized by the views), 512 images in batches of
    # 32 (16 steps an epoch, ~9 epochs), K = 256 keys and r = 256, m = 0.99, warm-up 3 epochs, so 6 clusterings
    # (K = 10, 20, 40 by the rule). When written (init seeds 0, 1, 2): held-out InfoNCE 4.81 / 4.84 / 4.81 at init
    # (log 128 = 4.85 is chance) → 4.45 / 4.62 / 4.49 after 150 steps (this test: seed 0); the ProtoNCE term,
    # averaged over an epoch, 3.49 / 3.61 / 3.51 in the first clustered epoch → 3.18 / 3.33 / 3.23 in the last,
    # prototype top-1 5 % → 9 % / 6 % / 8 %.
    images, held_out = _sample("train", 512), _sample("test", 128)
    method = _method(num_images=512, width=0.25, queue_size=256, momentum=0.99, size=16, warmup_epochs=3)
    method.setup(_train_set(images, batch=32))
    loss0 = _held_out(method, held_out)
    opt = build_optimizer(method, OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-5), 2e-3)
    steps, proto = 150, []
    for step in range(steps):
        epoch, within = divmod(step, 16)
        info = StepInfo.at(step, 16, steps)
        if within == 0:
            method.epoch_start(info, torch.Generator().manual_seed(epoch))
        index = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))[within * 32:(within + 1) * 32]
        g = torch.Generator().manual_seed(step)
        out = _sgd_step(method, opt, method.views(images[index], index, g, info), info)
        proto.append(float(out["loss_proto"]))
    loss1 = _held_out(method, held_out)
    assert all(p == 0 for p in proto[:48]) and all(p > 0 for p in proto[48:])     # ProtoNCE from epoch 3 on
    assert np.mean(proto[134:]) < np.mean(proto[48:64]) - 0.1, (proto[48:64], proto[134:])
    assert loss1 < loss0 - 0.2, (loss0, loss1)


# ---------------------------------------------------------------------------------------- the training loop
@pytest.mark.parametrize(("cls", "extra"), [(PCL, {}), (PCLV2, {}), (PCL, {"warmup_epochs": 0})])
def test_pretrain_runs_with_the_shipped_defaults(cls, extra, tmp_path, monkeypatch):
    from selfsup.train.loop import pretrain

    monkeypatch.setitem(methods.METHODS, cls.name, cls)
    cfg = build({"optim": cls.optim_defaults},
                {"method": {"name": cls.name, **extra}, "data": {"name": "sample"},
                 "backbone": {"name": "resnet18", "width": 0.125, "cifar_stem": True},
                 "train": {"steps": 5, "batch_size": 32, "progress": False}})
    with pytest.warns(UserWarning) as record:                    # r = 16,384 > the sample's 4,800 images
        run = pretrain(cfg, tmp_path / "run")
    assert sum("stale keys" in str(w.message) for w in record) == 1
    state = load_file(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert state["queue.queue"].shape == (16384, 128) and state["queue.queue_ptr"].item() == 5 * 32
    assert [state[f"centroids_{m}"].shape[0] for m in range(3)] == [94, 187, 375]     # the K rule on 4,800 images
    assert state["clustered"].item() == (1 if extra else 0)       # warm-up 0: clustered at the first step
    if extra:
        assert state["im2cluster_2"].max().item() < 375 and state["density_0"].mean().item() == pytest.approx(0.2)
    assert (run / "backbone.safetensors").exists()
