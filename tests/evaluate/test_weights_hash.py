"""A model's identity is its weights: the same tensors and metadata hash alike however safetensors ordered the
file's header (its metadata map has no fixed order), and any changed value gives a new hash."""

import json
import struct

import torch
from safetensors.torch import save_file

from selfsup.evaluate.features import weights_hash


def _reorder_header(src, dst):
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    reordered = {"__metadata__": dict(reversed(list(meta.items()))), **dict(reversed(list(header.items())))}
    text = json.dumps(reordered).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_same_weights_hash_alike_whatever_the_header_order(tmp_path):
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
               "fc.weight": torch.randn(2, 4, dtype=torch.bfloat16)}
    meta = {"backbone": '{"name": "resnet18"}', "method": "rotation", "mean": "[0.5]", "std": "[0.25]"}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    _reorder_header(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()
    assert weights_hash(tmp_path / "a.safetensors") == weights_hash(tmp_path / "b.safetensors")
    changed = dict(tensors, **{"conv.weight": tensors["conv.weight"].clone().index_fill_(0, torch.tensor([0]), 0.0)})
    save_file(changed, str(tmp_path / "c.safetensors"), metadata=meta)
    assert weights_hash(tmp_path / "c.safetensors") != weights_hash(tmp_path / "a.safetensors")
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={**meta, "method": "jigsaw"})
    assert weights_hash(tmp_path / "d.safetensors") != weights_hash(tmp_path / "a.safetensors")
