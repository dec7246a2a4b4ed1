"""docs/format.md's worked example, rebuilt and compared byte for byte."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vblora_store.format import convert

SPEC = Path(__file__).resolve().parent.parent / "docs" / "format.md"


def _golden(name: str) -> str:
    """The code block that follows ``<!-- golden:NAME -->`` in docs/format.md."""
    match = re.search(rf"<!-- golden:{re.escape(name)} -->\s*```\w*\n(.*?)```", SPEC.read_text(), re.S)
    assert match, f"docs/format.md has no golden block {name}"
    return match.group(1).strip()


def _example_full_adapter(folder: Path) -> None:
    """The full-form adapter of the worked example, written as PEFT writes it."""
    folder.mkdir()
    config = {
        "peft_type": "VBLORA",
        "r": 1,
        "num_vectors": 3,
        "vector_length": 2,
        "topk": 2,
        "target_modules": ["fc"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        "base_model.vblora_vector_bank": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "base_model.model.fc.vblora_logits_A": torch.tensor([[[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]]),
        "base_model.model.fc.vblora_logits_B": torch.tensor([[[0.5, 1.0, 0.0]]]),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _golden_file(example: str) -> bytes:
    """The whole file a worked example spells out: length, padded header, data."""
    length = int(_golden(f"{example}:header-length"))
    header = _golden(f"{example}:header").encode()
    data = bytes.fromhex(_golden(f"{example}:data").replace("\n", " "))
    return struct.pack("<Q", length) + header.ljust(length, b" ") + data


@pytest.mark.parametrize("form", ["topk", "packed", "compressed"])
def test_worked_example_bytes_match_the_spec(tmp_path, form):
    """convert writes exactly the bytes docs/format.md spells out, for each form we write."""
    _example_full_adapter(tmp_path / "full")
    convert(tmp_path / "full", tmp_path / form, to=form)
    written = (tmp_path / form / "adapter_model.safetensors").read_bytes()
    assert written == _golden_file(f"{form}-example")


def test_packed_example_unpacks_to_the_topk_example(tmp_path):
    """The packed example converts back to the top-k example, byte for byte (lossless)."""
    _example_full_adapter(tmp_path / "full")
    convert(tmp_path / "full", tmp_path / "packed", to="packed")
    convert(tmp_path / "packed", tmp_path / "topk", to="topk")
    assert (tmp_path / "topk" / "adapter_model.safetensors").read_bytes() == _golden_file("topk-example")


def test_compressed_example_is_the_packed_example_in_byte_planes():
    """Each compressed tensor is its packed tensor's bytes regrouped: byte j of every value, j = 0..3."""
    packed = bytes.fromhex(_golden("packed-example:data").replace("\n", " "))
    compressed = bytes.fromhex(_golden("compressed-example:data").replace("\n", " "))
    for start, end in ((0, 24), (24, 36)):  # the bank, the weights: float32, 4 planes each
        values = packed[start:end]
        planes = b"".join(values[j::4] for j in range(4))
        assert compressed[start:end] == planes
    assert compressed[36:] == packed[36:]  # the indices stay bit-packed


def test_packed_example_indices_are_the_hand_packed_bits():
    """Indices 0 2 2 1 1 0 at 2 bits, LSB first: 00 01 01 10 | 10 00 -> 0x68 0x01."""
    data = bytes.fromhex(_golden("packed-example:data").replace("\n", " "))
    stream = "".join(format(byte, "08b")[::-1] for byte in data[36:])  # LSB-first bit string
    values = [int(stream[i : i + 2][::-1], 2) for i in range(0, 12, 2)]
    assert values == [0, 2, 2, 1, 1, 0]


def test_topk_example_values_are_the_hand_derived_ones():
    """The spec's numbers: softmax of the kept logits, first k-1 stored, uint8 indices."""
    data = bytes.fromhex(_golden("topk-example:data").replace("\n", " "))
    a_w0, a_w1, b_w0 = struct.unpack("<3f", data[:12])
    e = torch.tensor(1.0).exp().item()
    assert abs(a_w0 - e / (e + 1)) < 1e-7  # softmax([2, 1])[0]
    assert abs(a_w1 - e**2 / (e**2 + 1)) < 1e-7  # softmax([3, 1])[0]
    assert abs(b_w0 - 1 / (1 + torch.tensor(-0.5).exp().item())) < 1e-7  # softmax([1, 0.5])[0]
    assert list(data[36:]) == [0, 2, 2, 1, 1, 0]
