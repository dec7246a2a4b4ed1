"""Write a Llama2-7B-shaped PEFT VB-LoRA adapter in full form (~322 MB), for benchmarks.

The adapter is what PEFT's ``save_pretrained`` writes for a VB-LoRA model with
r=4, num_vectors=2048, vector_length=256, topk=2 on the q/k/v/o, gate, up and
down projections of Llama2-7B's 32 layers (hidden 4096, intermediate 11008):

    base_model.vblora_vector_bank                                     (2048, 256)
    base_model.model.model.layers.{i}.<m>.vblora_logits_A             (4, in/256, 2048)
    base_model.model.model.layers.{i}.<m>.vblora_logits_B             (out/256, 4, 2048)

all float32; the logits are normal with std 0.1 (PEFT's ``init_logits_std``), the
bank uniform in [-0.02, 0.02] (``init_vector_bank_bound``).  The weights file is
written in the safetensors format, tensor by tensor (header first, then each
tensor's bytes as soon as it is generated), so the generator holds one tensor
(at most 1.4 MB) at a time, not the whole 322 MB state dict that
``safetensors.torch.save_file`` would need.  The layout is the one ``save_file``
produces (tensors sorted by name, ``{"format": "pt"}`` metadata, header padded
with spaces to a multiple of 8 bytes); ``--check`` verifies the result
against ``save_file`` on a small adapter.

Usage:
    python benchmarks/make_llama7b_adapter.py /tmp/llama7b-vblora-full [--seed 0] [--layers 32]

    from benchmarks.make_llama7b_adapter import make_llama7b_adapter
    make_llama7b_adapter("/tmp/llama7b-vblora-full")

Depends on torch only (not on vblora_store), so later benchmarks can use it
against any version of the package.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Iterator, Union

import torch

__all__ = ["LLAMA7B", "make_llama7b_adapter", "adapter_config", "tensor_layout", "expected_bytes"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BANK_KEY = "base_model.vblora_vector_bank"

# Llama2-7B's dimensions and the benchmark's VB-LoRA hyper-parameters.
LLAMA7B = {
    "num_layers": 32,
    "hidden": 4096,
    "intermediate": 11008,
    "r": 4,
    "num_vectors": 2048,
    "vector_length": 256,
    "topk": 2,
}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = list(_ATTENTION + _MLP)


def adapter_config(*, r: int, num_vectors: int, vector_length: int, topk: int) -> dict:
    """``adapter_config.json`` as PEFT 0.21.2 writes it for this adapter (full form)."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_logits_std": 0.1,
        "init_vector_bank_bound": 0.02,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "num_vectors": num_vectors,
        "peft_type": "VBLORA",
        "peft_version": "0.21.2",
        "r": r,
        "revision": None,
        "save_only_topk_weights": False,
        "target_modules": sorted(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
        "topk": topk,
        "vblora_dropout": 0.0,
        "vector_length": vector_length,
    }


def tensor_layout(
    *,
    num_layers: int,
    hidden: int,
    intermediate: int,
    r: int,
    num_vectors: int,
    vector_length: int,
    **_: int,
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape (all float32), by key."""
    dims = {m: (hidden, hidden) for m in _ATTENTION}
    dims.update(
        gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate), down_proj=(intermediate, hidden)
    )
    shapes: dict[str, tuple[int, ...]] = {BANK_KEY: (num_vectors, vector_length)}
    for i in range(num_layers):
        for m in _ATTENTION + _MLP:
            in_f, out_f = dims[m]
            block = "self_attn" if m in _ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{m}.vblora_logits"
            shapes[f"{prefix}_A"] = (r, in_f // vector_length, num_vectors)
            shapes[f"{prefix}_B"] = (out_f // vector_length, r, num_vectors)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The safetensors header (length prefix included), laid out as ``save_file`` lays it out."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        size = _numel(shapes[key]) * 4
        entries[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def expected_bytes(**dims: int) -> int:
    """Size of the weights file the generator writes for ``dims`` (defaults: :data:`LLAMA7B`)."""
    shapes = tensor_layout(**{**LLAMA7B, **dims})
    return len(_header(shapes)) + sum(_numel(s) * 4 for s in shapes.values())


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int, bank_bound: float, logits_std: float) -> Iterator:
    """Yield ``(key, tensor)`` in file order, one freshly generated tensor at a time."""
    gen = torch.Generator().manual_seed(seed)
    for key in sorted(shapes):
        t = torch.empty(shapes[key], dtype=torch.float32)
        if key == BANK_KEY:
            t.uniform_(-bank_bound, bank_bound, generator=gen)
        else:
            t.normal_(0.0, logits_std, generator=gen)
        yield key, t


def make_llama7b_adapter(path: Union[str, Path], *, seed: int = 0, **dims: int) -> Path:
    """Write the full-form adapter folder ``path`` (created; files in it replaced).

    Args:
        path: The adapter folder to write (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        seed: Seed of the random logits and bank; the same seed gives the same bytes.
        **dims: Overrides of :data:`LLAMA7B` (``num_layers=2`` for a quick one).

    Returns:
        The folder.
    """
    dims = {**LLAMA7B, **dims}
    unknown = set(dims) - set(LLAMA7B)
    if unknown:
        raise TypeError(f"unknown dimension(s) {sorted(unknown)}; known: {sorted(LLAMA7B)}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter_config(
        r=dims["r"], num_vectors=dims["num_vectors"], vector_length=dims["vector_length"], topk=dims["topk"]
    )
    shapes = tensor_layout(**dims)
    tmp = folder / (WEIGHTS_NAME + ".partial")
    with open(tmp, "wb") as f:
        f.write(_header(shapes))
        for _, t in _tensors(shapes, seed, config["init_vector_bank_bound"], config["init_logits_std"]):
            f.write(t.numpy().tobytes())  # little-endian float32, as safetensors stores it
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return folder


def check_against_save_file(tmp: Union[str, Path]) -> None:
    """Assert the streaming writer's file equals ``save_file``'s, byte for byte, on a 2-layer adapter."""
    from safetensors.torch import save_file

    tmp = Path(tmp)
    dims = {**LLAMA7B, "num_layers": 2}
    ours = make_llama7b_adapter(tmp / "ours", seed=1, num_layers=2) / WEIGHTS_NAME
    shapes = tensor_layout(**dims)
    tensors = dict(_tensors(shapes, 1, 0.02, 0.1))
    theirs = tmp / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    if ours.read_bytes() != theirs.read_bytes():
        raise AssertionError(f"{ours} differs from save_file's {theirs}")
    assert ours.stat().st_size == expected_bytes(num_layers=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="adapter folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=LLAMA7B["num_layers"], help="number of decoder layers")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the writer against safetensors' save_file " "(2 layers, under PATH/check)",
    )
    args = parser.parse_args(argv)
    if args.check:
        check_against_save_file(Path(args.path) / "check")
        print("writer matches safetensors.torch.save_file byte for byte")
        return
    folder = make_llama7b_adapter(args.path, seed=args.seed, num_layers=args.layers)
    size = (folder / WEIGHTS_NAME).stat().st_size
    print(f"{folder}: {size:,} bytes ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
