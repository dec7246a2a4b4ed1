"""The compressed form: the packed form with its bank and weights split into byte planes and zstd-compressed.

Specified byte by byte in docs/format.md ("The compressed form").  In short: a
safetensors file holding the packed form's tensors (:mod:`.packed`), except
that each of ``vblora_packed.bank``, ``vblora_packed.bank_scale`` and
``vblora_packed.weights`` is replaced by one uint8 tensor
``vblora_compressed.<that key>``: the tensor's little-endian bytes split into
byte planes (plane ``j`` holds byte ``j`` of every value), each plane stored as
a zstd frame or, where zstd would not shrink it, raw, one after another.  The
indices stay bit-packed (their entropy is already their width).  One
metadata key (canonical JSON) names the codec, its level, each plane's stored
size and kind, and holds the packed form's own metadata, so decoding gives
back the packed tensors, and from them PEFT's top-k tensors, bit for bit.

Why byte planes: the sign/exponent byte of a float32 bank carries about 2.7
bits, its three mantissa bytes near 8; compressing the planes apart leaves
the mantissa alone and codes the exponent close to its entropy.  Reading is
safe: every plane's size is known from the packed metadata and the config
before anything is decompressed, a zstd frame must declare exactly that
size, and decompression is capped there, so no frame can expand past what
the adapter's shapes allow; every frame carries zstd's checksum of its
content, so a damaged frame is refused rather than decoded to other values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from ...choices import BankDtype, WeightsDtype
from ...dtypes import by_torch
from ...errors import InvalidAdapterError
from .base import Codec, Decoded, FormCounts
from .checks import integer
from .packed import CODEC as PACKED
from .packed import unpacked_bytes
from .packed_metadata import METADATA_KEY as PACKED_KEY
from .packed_metadata import Packing, check_version, read_description
from .precision import BANK, BANK_SCALE, WEIGHTS

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "LEVEL", "CompressedPacking", "CODEC"]

FORMAT_NAME = "vblora-compressed"
FORMAT_VERSION = "1"
METADATA_KEY = "vblora_store.compressed"
PREFIX = "vblora_compressed."
LEVEL = 19  # zstd's level: 22 gains nothing more on banks (measured), 19 is within 2% of the entropy
MAX_LEVEL = 22  # zstd's highest level; negative levels down to -2**17 are its fast modes
QUICK_LEVEL = 3  # for comparing precisions: the same ranking as level 19 at a hundredth of the time
COMPRESSED = (BANK, BANK_SCALE, WEIGHTS)


@dataclass(frozen=True)
class CompressedPacking(Packing):
    """A compressed file's packing, and the bytes its tensors take on disk."""

    stored_bytes: int = 0

    def info(self) -> dict[str, str]:
        return {
            **super().info(),
            "codec": f"zstd-{LEVEL} byte planes",
            "stored_bytes": str(self.stored_bytes),
        }


def _planes(value: torch.Tensor) -> list[bytes]:
    """The byte planes of ``value``: plane ``j`` holds byte ``j`` (little-endian) of every element."""
    width = value.element_size()
    raw = value.contiguous().reshape(-1).view(torch.uint8).reshape(-1, width)  # (n,) -> (n, width) bytes
    return [raw[:, j].contiguous().numpy().tobytes() for j in range(width)]


def _stored_planes(value: torch.Tensor, compressor) -> list[tuple[str, bytes]]:
    """``value``'s byte planes as stored: each a zstd frame, or raw where the frame is not smaller."""
    out = []
    for plane in _planes(value):
        frame = compressor.compress(plane)
        out.append(("zstd", frame) if len(frame) < len(plane) else ("raw", plane))
    return out


def _as_tensor(data: bytes) -> torch.Tensor:
    """``data`` as a uint8 tensor (``frombuffer`` refuses an empty buffer: a top-1 adapter stores no weight)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def frame_length(data: bytes) -> int:
    """Bytes the zstd frame at the start of ``data`` takes (RFC 8878: header, blocks, checksum).

    Only called on a frame zstd has just decoded, so its header and blocks are sound.
    """
    import zstandard

    offset = zstandard.frame_header_size(data)
    while offset + 3 <= len(data):
        header = int.from_bytes(data[offset : offset + 3], "little")  # last (1 bit), type (2), size (21)
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        offset += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if last:
            return offset + 4 * bool(zstandard.get_frame_parameters(data).has_checksum)
    return len(data) + 1  # no last block: not one whole frame


def _bad(path, message: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"{path}: compressed form: {message}; the file is damaged or not ours, fetch it again."
    )


def _join(planes: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    columns = [_as_tensor(p) for p in planes]
    raw = torch.stack(columns, dim=1).reshape(-1)  # (n, width) -> (n·width,) in element order
    return raw.view(dtype).reshape(shape)


class CompressedCodec(Codec):
    """The compressed form (see the module docstring); takes the packed form's precision options.

    Counted as the bytes it stores: ``stored bytes · 8 / 32`` float32-equivalent
    parameters once a file exists; before, the packed form's count (an upper bound).
    """

    label = "compressed"
    report_label = "compressed stores"
    bytes_note = "bytes at most, lossless"
    card_note = (
        "- **compressed** (vblora_store's packed form with the bank and weights split into byte planes and "
        "zstd-compressed; the same top-k data, bit for bit). **Inference only**: it cannot resume training. "
        "**PEFT cannot read it directly**: convert it first with "
        "`vblora-store convert {repo_id} {name}-topk --to topk`."
    )
    options = PACKED.options

    def detect(self, specs, metadata) -> bool:
        return bool(metadata) and METADATA_KEY in metadata

    def encode(self, adapter, *, weights_dtype=WeightsDtype.FLOAT32, bank_dtype=BankDtype.FLOAT32, **options):
        import zstandard

        tensors, packed_metadata = PACKED.encode(adapter, weights_dtype=weights_dtype, bank_dtype=bank_dtype)
        compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, write_content_size=True)
        entries = {}
        for key in COMPRESSED:
            if key not in tensors:
                continue
            value = tensors.pop(key)
            stored = _stored_planes(value, compressor)
            planes = [[len(data), kind] for kind, data in stored]
            tensors[PREFIX + key] = _as_tensor(b"".join(data for _, data in stored))
            entries[key] = {"dtype": by_torch(value.dtype).code, "shape": list(value.shape), "planes": planes}
        description = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "codec": "zstd", "level": LEVEL,
            "packed": packed_metadata[PACKED_KEY], "tensors": entries,
        }  # fmt: skip
        return tensors, {METADATA_KEY: json.dumps(description, sort_keys=True, separators=(",", ":"))}

    def expanded_bytes(self, specs, metadata, config, path) -> int:
        """The decompressed planes, then what unpacking them allocates: all from the header, all checked."""
        _, entries, packed_text = self._description(metadata, path)
        layout = self._layout(packed_text, config, path)
        counts = dict(num_vectors=config.num_vectors, vector_length=config.vector_length, topk=config.topk)
        return unpacked_bytes(layout, **counts) + sum(spec.nbytes for spec in specs.values())

    def decode_tensors(self, specs, reader, metadata, config, path) -> Decoded:
        import zstandard

        def bad(message: str) -> InvalidAdapterError:
            return _bad(path, message)

        _, entries, packed_text = self._description(metadata, path)
        description = self._layout(packed_text, config, path)
        layout = description.expected
        for key in specs:
            if key.startswith(PREFIX) and key[len(PREFIX) :] not in entries:
                raise bad(f"it holds {key!r}, which its metadata does not list")
            if key in COMPRESSED:
                raise bad(f"it holds {key!r} uncompressed beside its compressed tensors (a mixed file)")
        tensors = {key: reader(key) for key in specs if not key.startswith(PREFIX)}
        decompressor = zstandard.ZstdDecompressor()
        for key, entry in entries.items():
            if key not in COMPRESSED or key not in layout or PREFIX + key not in specs:
                raise bad(f"it lists {key!r}, which it cannot hold")
            dtype, shape = layout[key]
            declared, planes = self._entry(key, entry, bad)
            if declared != (by_torch(dtype).code, list(shape)) or len(planes) != dtype.itemsize:
                raise bad(
                    f"{key!r} is declared {declared[0]} {declared[1]} in {len(planes)} planes; "
                    f"the config gives {by_torch(dtype).code} {list(shape)} in {dtype.itemsize} planes"
                )
            count = 1
            for d in shape:
                count *= d
            spec = specs[PREFIX + key]
            if spec.dtype != torch.uint8 or len(spec.shape) != 1:
                raise bad(f"{PREFIX + key!r} is {spec.describe()}, not a 1-D uint8 tensor of byte planes")
            total = sum(size for size, _ in planes)
            if total != spec.numel:
                raise bad(f"{PREFIX + key!r} holds {spec.numel} bytes but its planes declare {total}")
            data, offset, raw_planes = reader(PREFIX + key).numpy().tobytes(), 0, []
            for size, kind in planes:
                chunk, offset = data[offset : offset + size], offset + size
                raw_planes.append(self._plane(decompressor, chunk, kind, count, key, bad))
            tensors[key] = _join(raw_planes, dtype, shape)
        decoded = PACKED.unpack(tensors, {PACKED_KEY: packed_text}, config, path, description)
        stored = sum(spec.nbytes for spec in specs.values())
        packing = CompressedPacking(**vars(decoded.packing), stored_bytes=stored)
        return Decoded(
            decoded.specs, decoded.reader, order=decoded.order, packing=packing, slots=decoded.slots
        )

    @staticmethod
    def _description(metadata, path) -> tuple[dict, dict, str]:
        """The compressed form's metadata, version, codec and level checked: ``(it, entries, packed text)``."""

        def bad(message: str) -> InvalidAdapterError:
            return _bad(path, message)

        try:
            description = json.loads(metadata[METADATA_KEY])
            if not isinstance(description, dict):
                raise TypeError(f"the metadata is a JSON {type(description).__name__}, not an object")
            if description["format"] != FORMAT_NAME:
                raise ValueError(f"format is {description['format']!r}")
            version, codec, level = description["version"], description["codec"], description["level"]
            packed_text, entries = description["packed"], description["tensors"]
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            raise bad(f"metadata is incomplete or malformed ({type(e).__name__}: {e})") from e
        check_version("compressed", version, FORMAT_VERSION, str(path))
        if codec != "zstd":
            raise InvalidAdapterError(
                f"{path}: compressed form with codec {codec!r}; this vblora_store reads zstd. "
                "Upgrade vblora_store."
            )
        integer(level, "level", bad, minimum=-(1 << 17), maximum=MAX_LEVEL)
        if not isinstance(packed_text, str) or not isinstance(entries, dict):
            raise bad("metadata's packed is not a string or its tensors not an object")
        return description, entries, packed_text

    @staticmethod
    def _layout(packed_text: str, config, path):
        return read_description(
            packed_text, r=config.r, num_vectors=config.num_vectors, vector_length=config.vector_length,
            topk=config.topk, source=str(path),
        )  # fmt: skip

    @staticmethod
    def _entry(key: str, entry: object, bad) -> tuple[tuple[str, list], list[tuple[int, str]]]:
        """One ``tensors`` entry checked: ``((dtype code, shape), [(stored bytes, kind), ...])``."""
        if not isinstance(entry, dict) or not {"dtype", "shape", "planes"} <= entry.keys():
            raise bad(f"the entry of {key!r} is not an object with dtype, shape and planes")
        shape, planes = entry["shape"], entry["planes"]
        if not isinstance(shape, list) or not isinstance(planes, list):
            raise bad(f"the entry of {key!r} has a shape or planes that is not a list")
        dims = [integer(d, f"a dimension of {key!r}", bad) for d in shape]
        checked = []
        for plane in planes:
            if not isinstance(plane, list) or len(plane) != 2 or plane[1] not in ("zstd", "raw"):
                raise bad(f'a plane of {key!r} is {plane!r:.60}, not [stored bytes, "zstd" or "raw"]')
            checked.append((integer(plane[0], f"a plane size of {key!r}", bad), plane[1]))
        return (entry["dtype"], dims), checked

    @staticmethod
    def _plane(decompressor, chunk: bytes, kind: str, count: int, key: str, bad) -> bytes:
        """One plane of ``count`` bytes, its size checked before anything is decompressed."""
        import zstandard

        if kind == "raw":
            if len(chunk) != count:
                raise bad(f"a raw plane of {key!r} holds {len(chunk)} bytes, not {count}")
            return chunk
        try:
            frame = zstandard.get_frame_parameters(chunk)
            if frame.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
                raise bad(f"a zstd frame of {key!r} declares no content size (its plane holds {count} bytes)")
            if frame.content_size != count:
                raise bad(f"a zstd frame of {key!r} declares {frame.content_size} bytes, not {count}")
            if not frame.has_checksum:
                raise bad(f"a zstd frame of {key!r} carries no checksum")
            plane = decompressor.decompress(chunk, max_output_size=count)
        except zstandard.ZstdError as e:
            raise bad(f"a zstd frame of {key!r} cannot be decompressed ({e})") from e
        if len(plane) != count:
            raise bad(f"a zstd frame of {key!r} gave {len(plane)} bytes, not {count}")
        if frame_length(chunk) != len(chunk):
            raise bad(f"a zstd frame of {key!r} is followed by {len(chunk) - frame_length(chunk)} more bytes")
        return plane

    def stored_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """The bytes of the packed tensors once compressed, estimated at :data:`QUICK_LEVEL`."""
        import zstandard

        quick = zstandard.ZstdCompressor(level=QUICK_LEVEL)
        total = 0
        for key, value in tensors.items():
            if key in COMPRESSED:
                total += sum(len(data) for _, data in _stored_planes(value, quick))
            else:
                total += value.numel() * value.element_size()
        return total

    def savable_params(self, counts: FormCounts, packing: Optional[Packing] = None) -> int:
        if isinstance(packing, CompressedPacking):
            return packing.stored_bytes * 8 // 32
        return PACKED.savable_params(counts, packing)

    def data_bytes(self, counts: FormCounts) -> int:
        return PACKED.data_bytes(counts)

    def bytes_note_for(self, rounded_from: Optional[str] = None) -> str:
        if rounded_from is None:
            return self.bytes_note
        return self.bytes_note.replace("lossless", f"{rounded_from} rounded to float32")

    def precision(self, packing: Optional[Packing] = None) -> str:
        return PACKED.precision(packing)


CODEC = CompressedCodec()
