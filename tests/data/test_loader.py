"""DeviceImages: the resident and host paths serve identical channels_last uint8 batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data import DeviceImages, from_arrays, load


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)


def test_resident_and_host_paths_agree(images):
    labels = np.arange(50) % 7
    resident = DeviceImages(images, labels=labels)
    host = DeviceImages(images, resident_bytes=0, labels=labels)
    assert resident.resident and not host.resident
    index = torch.tensor([7, 3, 49, 3, 0, 21])  # unsorted, with a repeat
    a, b = resident.get(index), host.get(index)
    assert a.shape == (6, 3, 6, 5) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    for x in (a, b):
        assert x.is_contiguous(memory_format=torch.channels_last)
    expected = torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(a, expected)
    assert torch.equal(resident.labels[index], torch.as_tensor(labels[index.numpy()]))
    assert torch.equal(host.get([1, 2]), resident.get(np.array([1, 2])))
    assert len(host) == 50 and host.shape == resident.shape == (50, 3, 6, 5)


def test_from_imageset_memmap(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_HOME", str(tmp_path))
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "1")
    ds = load("sample", "test")
    host = DeviceImages(ds, resident_bytes=1024)  # stays on the memmap
    resident = DeviceImages(ds)
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]
    assert torch.equal(host.get(index), resident.get(index))
    assert host.labels.dtype == torch.int64 and torch.equal(host.labels, resident.labels)


def test_rejects_bad_input(images):
    with pytest.raises(ValueError, match="labels"):
        DeviceImages(images)
    with pytest.raises(ValueError, match="uint8"):
        DeviceImages(images.astype(np.float32), labels=np.zeros(50))
    ds = from_arrays(images, np.zeros(50, dtype=np.int64))
    assert len(DeviceImages(ds)) == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_paths_agree(images):
    labels = np.arange(50)
    resident = DeviceImages(images, "cuda", labels=labels)
    host = DeviceImages(images, "cuda", 0, labels=labels)
    index = torch.tensor([5, 1, 1, 40], device="cuda")
    a, b = resident.get(index), host.get(index)
    assert a.device.type == b.device.type == "cuda" and torch.equal(a, b)
    assert b.is_contiguous(memory_format=torch.channels_last)
