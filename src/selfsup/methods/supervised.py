"""The supervised baseline of Ericsson, Gouk, Hospedales 2021, "How Well Do Self-Supervised Models
Transfer?" (CVPR 2021), §3: the "Supervised" model that every self-supervised model is compared with.

Theirs is torchvision's ImageNet-trained ResNet-50, trained with torchvision's reference recipe
(``references/classification``, the recipe of the ``IMAGENET1K_V1`` weights): a random resized crop
to 224 (area 8–100 %, aspect ratio 3/4–4/3) and a horizontal flip, ImageNet mean/std normalisation, a
linear classifier on the pre-logits trained with softmax cross-entropy, SGD momentum 0.9, lr 0.1 at
batch 256, weight decay 1e-4 (on every parameter), no warmup, lr ×0.1 every 30 epochs, 90 epochs.

Here the backbone and a linear classifier train on the labels of the pretraining split (e.g. Tiny
ImageNet-100 train), so that a transfer study has a supervised model trained on the same source data
as its self-supervised ones. The pre-logits are the representation; the classifier is a head like any
method's and is dropped at export.

What we scaled, documented:

- the crop is resized to the images' own size (``size=None``; 64 for Tiny ImageNet, 32 for CIFAR)
  instead of 224; the crop's area and aspect ranges are relative and kept;
- the lr is 0.1 × batch/256 (``optim.scale_lr``, Goyal et al. 2017), which is torchvision's 0.1 at its
  batch of 256;
- the ×0.1 steps are at epochs 30 and 60 (``optim.milestones``) and the run length is ``train.epochs``
  (90 in the recipe, not set here); for a shorter run put the milestones at 1/3 and 2/3 of it.

Labels reach the method through the contract's ``setup(train_set)``: the labels of the training
images in the index order that ``views`` receives (after any ``data.per_class`` subset). They are a
non-persistent buffer — they come from the data on every run, so checkpoints hold weights only.

Example::

    method = Supervised(backbone, SupervisedConfig(), num_images=len(data))
    method.set_labels(torch.as_tensor(data.labels), num_classes=len(data.classes))   # what setup() does
    info = StepInfo.at(0)
    out = method(method.views(images_uint8, index, g, info), info)   # {"loss", "train_acc"}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import FRACTION_BELOW_ONE, POSITIVE, PROBABILITY, Range
from selfsup.errors import UserError
from selfsup.methods.base import Method, StepInfo, TrainSet
from selfsup.views.augment import IMAGENET_MEAN, IMAGENET_STD, ViewConfig, make_view

# torchvision's reference ImageNet recipe (references/classification/train.py defaults, the recipe of the
# ResNet-50 IMAGENET1K_V1 weights Ericsson et al. 2021 use): SGD momentum 0.9, lr 0.1 × batch/256, weight decay
# 1e-4 on all parameters, no warmup, ×0.1 at epochs 30 and 60 of 90 (``--lr-step-size 30 --lr-gamma 0.1``).
SUPERVISED_OPTIM = dict(name="sgd", lr=0.1, scale_lr=True, momentum=0.9, nesterov=False, weight_decay=1e-4,
                        exclude_norm_and_bias=False, warmup_epochs=0, schedule="step", milestones=[30, 60],
                        gamma=0.1)


@dataclass
class SupervisedConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)          # RandomResizedCrop area range (torchvision default)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)      # RandomResizedCrop aspect range
    flip_p: float = 0.5                                   # RandomHorizontalFlip
    size: int | None = None                               # crop size; None = the images' own size (224 in the recipe)
    label_smoothing: float = 0.0                          # 0 in the V1 recipe (torchvision's later recipes use 0.1)


class Supervised(Method):
    name = "supervised"
    summary = ("Supervised baseline (Ericsson et al. 2021 §3; torchvision recipe): crop+flip, linear classifier, "
               "cross-entropy on the pretraining split's labels")
    Config = SupervisedConfig
    limits = {"crop_scale": Range(0, 1, low_open=True), "crop_ratio": POSITIVE, "flip_p": PROBABILITY,
              "label_smoothing": FRACTION_BELOW_ONE}
    optim_defaults = SUPERVISED_OPTIM

    def __init__(self, backbone, cfg: SupervisedConfig, num_images: int):
        super().__init__(backbone, cfg, num_images)
        self.head: nn.Linear | None = None   # built by set_labels (its width is the number of classes)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)
        # identical on every rank: keep DDP from broadcasting the table before each forward
        self._ddp_params_and_buffers_to_ignore = ["labels"]

    def setup(self, train_set: TrainSet) -> None:
        """The labels of the pretraining images (Method contract); refuses an unlabelled split by name."""
        if train_set.num_classes < 2:
            raise UserError(f"method 'supervised' trains on labels, but {train_set.name} has "
                            f"{train_set.num_classes} class(es): point data.name at a labelled dataset "
                            f"(<class>/<file> folders, two or more classes) or choose a self-supervised method")
        self.set_labels(train_set.labels, num_classes=train_set.num_classes)

    def set_labels(self, labels: torch.Tensor, num_classes: int | None = None) -> None:
        """The class of every training image, in the order ``views``'s ``index`` points into, and builds
        the classifier (``num_classes`` wide; default ``labels.max() + 1``) if there is none yet."""
        labels = torch.as_tensor(labels).long()
        if labels.ndim != 1 or len(labels) != self.num_images:
            raise UserError(f"expected {self.num_images} labels, one per training image; "
                            f"got shape {tuple(labels.shape)}")
        k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise UserError(f"labels span [{int(labels.min())}, {int(labels.max())}] but there are {k} classes")
        if k < 2:
            raise UserError(f"the supervised baseline needs two or more classes; the labels hold {k}")
        if self.head is None:
            device = next(self.backbone.parameters()).device
            self.head = nn.Linear(self.backbone.out_dim, k).to(device)
        elif self.head.out_features != k:
            raise UserError(f"the classifier has {self.head.out_features} classes but the labels {k}")
        self.labels = labels

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint rebuilds the classifier without labels (e.g. evaluate.invariance rebuilds methods from runs)
        w = state_dict.get(prefix + "head.weight")
        if self.head is None and w is not None:
            self.head = nn.Linear(w.shape[1], w.shape[0]).to(next(self.backbone.parameters()).device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def input_stats(cls, cfg) -> tuple[tuple, tuple, bool]:
        return IMAGENET_MEAN, IMAGENET_STD, False

    def views(self, images: torch.Tensor, index: torch.Tensor, g: torch.Generator, info: StepInfo) -> dict:
        if self.labels.numel() == 0:
            raise RuntimeError("method 'supervised' has no labels: call setup(train_set) first (the loop does)")
        c = self.cfg
        # views.augment.INCEPTION_CROP_FLIP (RandomResizedCrop + RandomHorizontalFlip, ImageNet mean/std) at our size
        view = ViewConfig(size=c.size or images.shape[-1], crop_scale=tuple(c.crop_scale),
                          crop_ratio=tuple(c.crop_ratio), flip_p=c.flip_p, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        x = make_view(images, view, g=g)
        return {"x": x, "y": self.labels[index.to(self.labels.device)]}

    def forward(self, views: dict, info: StepInfo) -> dict:
        if self.head is None:
            raise RuntimeError("method 'supervised' has no classifier: call setup(train_set) first (the loop does)")
        logits = self.head(self.backbone(views["x"])["pre_logits"])
        loss = F.cross_entropy(logits.float(), views["y"], label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(1) == views["y"]).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}
