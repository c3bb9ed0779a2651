"""Batches of uint8 images on the training device, gathered by index.

:class:`DeviceImages` keeps a decoded split where the training step can reach it fastest:

- **resident** — the whole uint8 array fits under ``resident_bytes`` (default 2 GiB): it is copied
  once into one device tensor (on a GPU, CIFAR-10's 150 MB costs nothing), and a batch is one
  index op on the device, no host work, no copies per step.
- **host** — larger sets stay in the host memmap; a batch is a *sorted* fancy-index read (near
  sequential I/O through the page cache), written straight into pinned memory and copied with
  ``non_blocking=True``, so the copy overlaps the previous step's compute.

Either way :meth:`DeviceImages.get` returns ``B×3×H×W`` uint8 in channels_last layout — a
``permute(0, 3, 1, 2)`` view of the NHWC rows, no copy — and random views (crops, jitter) then run on
the device, batched. Both paths return identical batches.

Example::

    data = DeviceImages(load("cifar10", "train"), device="cuda")
    idx = torch.randperm(len(data), generator=g)[:256]
    x, y = data.get(idx), data.labels[idx.to(data.device)]
"""

from __future__ import annotations

import numpy as np
import torch

from selfsup.errors import UserError

from .cache import ImageSet

#: Arrays at most this big are kept whole on the device.
DEFAULT_RESIDENT_BYTES = 2 * 1024**3


class DeviceImages:
    """A split's uint8 images and labels, serving ``B×3×H×W`` uint8 batches on ``device``.

    ``images`` is an :class:`ImageSet` (its labels come with it) or a uint8 ``N×H×W×3`` array with
    ``labels=``. ``resident_bytes`` is the largest array kept whole on the device;
    ``pin_memory`` (default: on when ``device`` is CUDA) pins the host path's staging buffers.
    """

    def __init__(
        self,
        images: ImageSet | np.ndarray,
        device: str | torch.device = "cpu",
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
        *,
        labels: np.ndarray | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if isinstance(images, ImageSet):
            labels = images.labels if labels is None else labels
            images = images.images
        if labels is None:
            raise UserError("labels are required with a plain array; pass labels= (N ints) or an ImageSet")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UserError(f"images must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise UserError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.resident = images.nbytes <= resident_bytes
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64)).to(self.device)  # a writable copy
        if self.resident:
            # np.array copies the (read-only) memmap into RAM; one transfer puts it on the device
            self._data = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.device)
            self._host = None
        else:
            self._data = None
            self._host = images

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, 3, H, W)``: what :meth:`get` returns rows of."""
        n, h, w, c = (self._data if self._data is not None else self._host).shape
        return (n, c, h, w)

    def get(self, index: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Images ``index`` as uint8 ``B×3×H×W`` on the device, channels_last (a view of NHWC rows)."""
        if self._data is not None:
            idx = torch.as_tensor(index, dtype=torch.long).to(self.device)
            return self._data[idx].permute(0, 3, 1, 2)
        return self._gather(index).permute(0, 3, 1, 2)

    def _gather(self, index: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        idx = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        order = np.argsort(idx, kind="stable")
        assert self._host is not None
        h, w = self._host.shape[1:3]
        staging = torch.empty((len(idx), h, w, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        # read rows in ascending order (page cache / disk friendly), put each back where it was asked
        staging.numpy()[order] = self._host[idx[order]]
        if self.device.type == "cpu":
            return staging
        # the caching host allocator keeps the pinned block alive until this copy has finished
        return staging.to(self.device, non_blocking=self.pin_memory)
