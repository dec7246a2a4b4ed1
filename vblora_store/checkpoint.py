"""A transformers checkpoint folder's safetensors shards, read and written one tensor at a time.

``save_pretrained`` writes ``model.safetensors``, or shards listed in
``model.safetensors.index.json``.  safetensors' own ``load_file``/``save_file``
hold a whole shard in memory (and its memory map counts in the resident set),
so merging a 10 GB shard would need 20 GB.  This module reads the headers,
reads single tensors with plain file reads, and writes a shard as a header
followed by each tensor's bytes as soon as it is produced: memory holds one
tensor, whatever the shard size.

The safetensors layout (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length, a JSON header ``{key: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to
a multiple of 8, then the tensors' little-endian bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple, Optional, Union

import torch

from .dtypes import DTYPES, by_code
from .errors import CheckpointNotFoundError, InvalidCheckpointError

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "FLOAT_DTYPES",
    "TensorEntry",
    "Shard",
    "Checkpoint",
    "read_checkpoint",
    "read_tensor",
    "write_shard",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: safetensors' names of the floating dtypes a weight can be merged in, and their torch dtypes: those of
#: 16 bits or more (F64, F32, F16, BF16); a float8 weight is a quantized checkpoint's.
FLOAT_DTYPES = {d.code: d.torch for d in DTYPES if d.floating and d.bits >= 16}
_COPY_CHUNK = 64 * 2**20  # bytes per read when a tensor is copied unchanged


class TensorEntry(NamedTuple):
    """Where one tensor lives in a checkpoint, from its shard's header."""

    shard: str  # shard file name
    dtype: str  # safetensors dtype name: "BF16", "F32", "I64", ...
    shape: tuple[int, ...]
    begin: int  # byte range in the shard file
    end: int


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint."""

    name: str
    metadata: Optional[dict[str, str]]
    keys: list[str]  # in data order


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's weights, as its headers describe them (no tensor loaded).

    Attributes:
        folder: The checkpoint folder.
        shards: Its safetensors files, in name order.
        tensors: Every tensor's :class:`TensorEntry`, by key.
        index: The parsed ``model.safetensors.index.json``, or ``None`` for a single file.
    """

    folder: Path
    shards: list[Shard]
    tensors: dict[str, TensorEntry]
    index: Optional[dict] = None

    def path(self, key: str) -> Path:
        """The shard file holding ``key``."""
        return self.folder / self.tensors[key].shard


def read_checkpoint(folder: Union[str, Path]) -> Checkpoint:
    """Read the index and the shard headers of a checkpoint folder written by ``save_pretrained``.

    Args:
        folder: A folder with ``model.safetensors``, or ``model.safetensors.index.json``
            and the shards it lists.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        CheckpointNotFoundError: no such folder, no safetensors weights in it, or a listed shard is missing.
        InvalidCheckpointError: the index or a header is unreadable, or they disagree.

    Example:
        >>> [s.name for s in read_checkpoint(checkpoint).shards]
        ['model.safetensors']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: no such folder; pass the base model's checkpoint folder.")
    index = None
    if (folder / INDEX_FILE).is_file():
        index = _read_index(folder / INDEX_FILE)
        names = sorted(set(index["weight_map"].values()))
    elif (folder / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (
            f"it holds {', '.join(others)}: load the model and save_pretrained it again (safetensors is the "
            "default)"
            if others
            else "pass the folder written by the base model's save_pretrained"
        )
        raise CheckpointNotFoundError(
            f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; merge reads safetensors checkpoints only; {hint}."
        )
    shards, tensors = [], {}
    for name in names:
        shard, entries = _read_header(folder / name)
        for key, entry in entries.items():
            if key in tensors:
                raise InvalidCheckpointError(
                    f"{folder}: tensor {key!r} is in both {tensors[key].shard} and {name}; "
                    "save the model again."
                )
            tensors[key] = entry
        shards.append(shard)
    if index is not None:
        wrong = sorted(
            k for k, name in index["weight_map"].items() if k not in tensors or tensors[k].shard != name
        )
        if wrong:
            raise InvalidCheckpointError(
                f"{folder / INDEX_FILE}: lists {wrong[0]!r} in {index['weight_map'][wrong[0]]}, which does "
                f"not hold it ({len(wrong)} such keys); the index does not belong to these shards, "
                "save the model again."
            )
    return Checkpoint(folder, shards, tensors, index)


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpointError(f"{path}: not valid JSON ({e}); save the model again.") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidCheckpointError(
            f"{path}: no weight_map; it is not a transformers index, save the model again."
        )
    for name in set(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name or not (path.parent / name).is_file():
            raise CheckpointNotFoundError(
                f"{path}: lists the shard {name!r}, which is not in {path.parent}; "
                "copy every shard beside the index."
            )
    return index


def _read_header(path: Path) -> tuple[Shard, dict[str, TensorEntry]]:
    """Parse one safetensors header, checking every tensor's byte range against the file size."""

    def bad(problem: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(
            f"{path}: {problem}; the file is damaged or not safetensors, fetch it again."
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise bad(f"declares a {length}-byte header in a {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start, entries = 8 + length, {}
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            entry = TensorEntry(path.name, str(info["dtype"]), shape, data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"header entry {key!r} is malformed ({e!r})") from e
        if not data_start <= entry.begin <= entry.end <= size:
            raise bad(f"tensor {key!r} lies outside the file")
        entries[key] = entry
    keys = sorted(entries, key=lambda k: entries[k].begin)
    return Shard(path.name, metadata, keys), entries


# -- one tensor at a time ---------------------------------------------------------------------


def read_tensor(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """Read one floating tensor with plain file reads (no memory map), into memory of its own.

    Args:
        checkpoint: The checkpoint.
        key: A key whose dtype is in :data:`FLOAT_DTYPES`.

    Returns:
        The tensor, in its stored dtype and shape.

    Example:
        >>> read_tensor(read_checkpoint(checkpoint), "model.norm.weight").shape
        torch.Size([64])
    """
    entry = checkpoint.tensors[key]
    buffer = bytearray(entry.end - entry.begin)
    with open(checkpoint.path(key), "rb") as f:
        f.seek(entry.begin)
        if f.readinto(buffer) != len(buffer):
            raise InvalidCheckpointError(f"{f.name}: tensor {key!r} is truncated; fetch the file again.")
    dtype = FLOAT_DTYPES[entry.dtype]
    flat = (
        torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
    )  # shares buffer's memory
    return flat.reshape(entry.shape)  # (numel,) -> shape


def write_shard(
    checkpoint: Checkpoint,
    shard: Shard,
    dst: Path,
    out_dtypes: dict[str, str],
    produce: Callable[[str], Optional[torch.Tensor]],
) -> int:
    """Write a copy of one shard into ``dst``, tensor by tensor, with some tensors replaced.

    The header is written first (every output dtype is known in advance), then
    each tensor: ``produce(key)`` returns the new tensor, or ``None`` to copy the
    stored bytes unchanged (then ``out_dtypes[key]`` must be the stored dtype).

    Args:
        checkpoint: The source checkpoint.
        shard: The shard to copy.
        dst: The file to write.
        out_dtypes: Each key's output safetensors dtype name.
        produce: Called once per key, in data order.

    Returns:
        The size of the data section written, in bytes (for the index's ``total_size``).

    Raises:
        InvalidCheckpointError: the source shard ends early.
        RuntimeError: ``produce`` returned a tensor of another shape or dtype than announced.
    """
    header: dict = {"__metadata__": shard.metadata} if shard.metadata is not None else {}
    offset = 0
    for key in shard.keys:
        entry = checkpoint.tensors[key]
        same = out_dtypes[key] == entry.dtype
        size = entry.end - entry.begin if same else math.prod(entry.shape) * by_code(out_dtypes[key]).itemsize
        header[key] = {
            "dtype": out_dtypes[key],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(checkpoint.folder / shard.name, "rb") as src, open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for key in shard.keys:
            entry = checkpoint.tensors[key]
            tensor = produce(key)
            if tensor is None:
                _copy_range(src, out, entry.begin, entry.end - entry.begin)
                continue
            if tuple(tensor.shape) != entry.shape or tensor.dtype != FLOAT_DTYPES[out_dtypes[key]]:
                raise RuntimeError(  # not bad input: the caller broke its promise
                    f"{dst}: {key!r} came out {tensor.dtype} {list(tensor.shape)}, announced "
                    f"{out_dtypes[key]} {list(entry.shape)}"
                )
            out.write(
                memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            )  # (numel * size,) bytes
    return offset


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, length: int) -> None:
    src.seek(start)
    while length:
        chunk = src.read(min(length, _COPY_CHUNK))
        if not chunk:
            raise InvalidCheckpointError(
                f"{src.name}: ends inside a tensor; the file is truncated, fetch it again."
            )
        out.write(chunk)
        length -= len(chunk)
