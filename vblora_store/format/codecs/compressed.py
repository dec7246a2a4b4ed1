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
from ...dtypes import by_code, by_torch
from ...errors import InvalidAdapterError
from .base import Codec, Decoded, FormCounts
from .packed import CODEC as PACKED
from .packed_metadata import METADATA_KEY as PACKED_KEY
from .packed_metadata import Packing, read_description
from .precision import BANK, BANK_SCALE, WEIGHTS

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "LEVEL", "CompressedPacking", "CODEC"]

FORMAT_NAME = "vblora-compressed"
FORMAT_VERSION = "1"
METADATA_KEY = "vblora_store.compressed"
PREFIX = "vblora_compressed."
LEVEL = 19  # zstd's level: 22 gains nothing more on banks (measured), 19 is within 2% of the entropy
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

    def decode(self, specs, reader, metadata, config, path) -> Decoded:
        import zstandard

        def bad(message: str) -> InvalidAdapterError:
            return InvalidAdapterError(
                f"{path}: compressed form: {message}; the file is damaged or not ours, fetch it again."
            )

        try:
            description = json.loads(metadata[METADATA_KEY])
            if description["format"] != FORMAT_NAME:
                raise ValueError(f"format is {description['format']!r}")
            version, codec, packed_text = description["version"], description["codec"], description["packed"]
            entries = dict(description["tensors"])
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            raise bad(f"metadata is incomplete or malformed ({type(e).__name__}: {e})") from e
        if version != FORMAT_VERSION or codec != "zstd":
            raise InvalidAdapterError(
                f"{path}: compressed form version {version} with codec {codec!r}; this vblora_store reads version "
                f"{FORMAT_VERSION} with zstd. Upgrade vblora_store."
            )
        layout = read_description(
            packed_text, r=config.r, num_vectors=config.num_vectors, vector_length=config.vector_length,
            topk=config.topk, source=str(path),
        ).expected  # fmt: skip
        tensors = {key: reader(key) for key in specs if not key.startswith(PREFIX)}
        decompressor = zstandard.ZstdDecompressor()
        for key, entry in entries.items():
            if key not in COMPRESSED or key not in layout or PREFIX + key not in specs:
                raise bad(f"it lists {key!r}, which it cannot hold")
            dtype, shape = layout[key]
            try:
                declared = (by_code(entry["dtype"]).torch, tuple(int(d) for d in entry["shape"]))
                planes = [(int(size), str(kind)) for size, kind in entry["planes"]]
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"the entry of {key!r} is malformed ({type(e).__name__}: {e})") from e
            if declared != (dtype, shape) or len(planes) != dtype.itemsize:
                raise bad(
                    f"{key!r} is declared {declared} in {len(planes)} planes; the config gives {dtype} {list(shape)}"
                )
            count = 1
            for d in shape:
                count *= d
            blob = reader(PREFIX + key)
            if (
                blob.dtype != torch.uint8
                or blob.dim() != 1
                or sum(size for size, _ in planes) != blob.numel()
            ):
                raise bad(
                    f"{PREFIX + key!r} does not hold the {sum(s for s, _ in planes)} bytes its planes declare"
                )
            data, offset, raw_planes = blob.numpy().tobytes(), 0, []
            for size, kind in planes:
                chunk, offset = data[offset : offset + size], offset + size
                raw_planes.append(self._plane(decompressor, chunk, kind, count, key, bad))
            tensors[key] = _join(raw_planes, dtype, shape)
        decoded = PACKED.decode(
            {k: None for k in tensors}, tensors.__getitem__, {PACKED_KEY: packed_text}, config, path
        )
        stored = sum(spec.nbytes for spec in specs.values())
        packing = CompressedPacking(**vars(decoded.packing), stored_bytes=stored)
        return Decoded(decoded.specs, decoded.reader, order=decoded.order, packing=packing)

    @staticmethod
    def _plane(decompressor, chunk: bytes, kind: str, count: int, key: str, bad) -> bytes:
        """One plane of ``count`` bytes, its size checked before anything is decompressed."""
        import zstandard

        if kind == "raw":
            if len(chunk) != count:
                raise bad(f"a raw plane of {key!r} holds {len(chunk)} bytes, not {count}")
            return chunk
        if kind != "zstd":
            raise bad(f"a plane of {key!r} is {kind!r}, neither zstd nor raw")
        try:
            frame = zstandard.get_frame_parameters(chunk)
            if frame.content_size != count:
                raise bad(f"a zstd frame of {key!r} declares {frame.content_size} bytes, not {count}")
            if not frame.has_checksum:
                raise bad(f"a zstd frame of {key!r} carries no checksum")
            plane = decompressor.decompress(chunk, max_output_size=count)
        except zstandard.ZstdError as e:
            raise bad(f"a zstd frame of {key!r} cannot be decompressed ({e})") from e
        if len(plane) != count:
            raise bad(f"a zstd frame of {key!r} gave {len(plane)} bytes, not {count}")
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

    def precision(self, packing: Optional[Packing] = None) -> str:
        return PACKED.precision(packing)


CODEC = CompressedCodec()
