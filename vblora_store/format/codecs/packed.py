"""The packed form: one safetensors file, every index bit-packed, one tensor per kind.

Specified byte by byte in docs/format.md ("The packed form").  In short::

    vblora_packed.indices     uint8 (ceil(S·k·b / 8),)   all top-k indices, b = ceil(log2 N) bits each
    vblora_packed.weights     (S, k - 1)                  all stored top-k weights
    vblora_packed.bank        (N, L)                      the bank: float, or scaled codes (int4: two a byte)
    vblora_packed.bank_scale  float32 (N,)                only with a scaled bank (float8_e4m3, int8, int4)
    <other PEFT keys>                                     modules_to_save, biases: untouched

Slots are laid out module by module in the order of the module table, side A
``(r, in/L)`` then side B ``(out/L, r)``, each row-major.  The safetensors
metadata makes the file self-describing (format, version, bit width, module
table, dtypes: :mod:`.packed_metadata`).  Unpacking gives back PEFT's top-k tensors; with float32 weights
and bank (the default) bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Iterator, Optional

import torch

from ...choices import BankDtype, WeightsDtype
from ...dtypes import name_of
from ...errors import InvalidAdapterError, UnsupportedConversionError
from ..bitpack import bits_for, pack, packed_size, unpack
from ..keys import BANK_KEY, index_dtype, indices_key, parse_key, weights_key
from ..stored import Slots, TensorSpec
from .base import Codec, Decoded, FormCounts
from .precision import (
    BANK,
    WEIGHTS,
    bank_bits,
    decode_bank,
    decode_weights,
    encode_bank,
    encode_weights,
    weights_bits,
    weights_tolerance,
)
from .checks import simplex_problem
from .packed_metadata import (
    RESTORE_DTYPES,
    Description,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDICES,
    METADATA_KEY,
    Packing,
    describe,
    is_packed,
    read_description,
)
from .topk import CODEC as TOPK

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WeightsDtype",
    "BankDtype",
    "Packing",
    "PackedCodec",
    "CODEC",
    "is_packed",
    "pack_topk",
    "unpack_topk",
]

PREFIX = "vblora_packed."  # every packed tensor's key begins so


def _sides(modules: Iterable) -> Iterable[tuple[str, str]]:
    for module in modules:
        yield module.name, "A"
        yield module.name, "B"


def pack_topk(
    modules: list,
    tensors: dict[str, torch.Tensor],
    *,
    num_vectors: int,
    topk: int,
    weights_dtype: WeightsDtype = WeightsDtype.FLOAT32,
    bank_dtype: BankDtype = BankDtype.FLOAT32,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT top-k tensors -> packed tensors and metadata.

    Args:
        modules: ``ModuleShape``s in the order to lay them out.
        tensors: PEFT's top-k state dict (indices, weights, bank, others).
        num_vectors: N.
        topk: k.
        weights_dtype: How to store the weights.
        bank_dtype: How to store the bank.

    Returns:
        ``(tensors, metadata)`` for ``safetensors.torch.save_file``.
    """
    weights_dtype, bank_dtype = WeightsDtype(weights_dtype), BankDtype(bank_dtype)
    bits = bits_for(num_vectors)
    sides = list(_sides(modules))
    all_indices = torch.cat([tensors[indices_key(m, s)].reshape(-1) for m, s in sides])  # (S·k,)
    weights = [
        tensors[weights_key(m, s)].flatten(0, -2) for m, s in sides
    ]  # (..., k-1) -> (slots, k-1); k=1 too
    restore_weights = weights[0].dtype
    bank = tensors[BANK_KEY]
    for what, dtype in (("top-k weights", restore_weights), ("bank", bank.dtype)):
        if name_of(dtype) not in RESTORE_DTYPES:
            raise UnsupportedConversionError(
                f"the adapter's {what} are {name_of(dtype)}; the packed form gives back only "
                f"{', '.join(RESTORE_DTYPES)}: convert it to topk instead."
            )
    out = {k: v for k, v in tensors.items() if k != BANK_KEY and parse_key(k) is None}
    out[INDICES] = pack(all_indices, bits)
    out.update(encode_weights(torch.cat(weights), weights_dtype))  # (S, k-1), at its precision
    out.update(encode_bank(bank, bank_dtype))
    packing = Packing(bits, weights_dtype, bank_dtype)
    slots = sum(w.shape[0] for w in weights)
    return out, describe(packing, modules, slots, restore_weights=restore_weights, restore_bank=bank.dtype)


def unpack_topk(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    r: int,
    num_vectors: int,
    vector_length: int,
    topk: int,
    source: str,
    description: Optional[Description] = None,
) -> tuple[list[tuple[str, int, int]], "TopKViews", Packing, Slots]:
    """Packed tensors -> PEFT's top-k tensors.

    Args:
        tensors: The packed file's tensors.
        metadata: Its safetensors metadata.
        r, num_vectors, vector_length, topk: From the adapter's config.
        source: The file, named in errors.
        description: ``metadata``'s description, if the caller has already read it (:func:`read_description`).

    Returns:
        ``(modules, tensors, packing, slots)``: the module table as ``(name, in, out)``,
        PEFT's top-k state dict (:class:`TopKViews`), the :class:`Packing`, and the indices and
        weights of every slot in one table, of which the top-k tensors are views.

    Raises:
        InvalidAdapterError: the metadata or a tensor does not fit the config.
    """
    d = description or read_description(
        metadata[METADATA_KEY], r=r, num_vectors=num_vectors, vector_length=vector_length, topk=topk,
        source=source,
    )  # fmt: skip
    bits, weights_dtype, bank_dtype = d.packing.index_bits, d.packing.weights, d.packing.bank
    restore_weights, restore_bank, slots, shapes, modules, expected = (
        d.restore_weights, d.restore_bank, d.slots, d.shapes, d.modules, d.expected
    )  # fmt: skip

    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(
            f"{source}: packed form: {message}; the file is damaged or not ours, fetch it again."
        )

    for key in tensors:
        if key == BANK_KEY or parse_key(key) is not None or (key.startswith(PREFIX) and key not in expected):
            raise bad(f"it holds {key!r} beside its packed tensors (a mixed file)")
    for key, (dtype, shape) in expected.items():
        value = tensors.get(key)
        if value is None or value.dtype != dtype or tuple(value.shape) != shape:
            found = "missing" if value is None else f"{value.dtype} {list(value.shape)}"
            raise bad(f"tensor {key!r} is {found}, expected {dtype} {list(shape)}")

    indices = unpack(tensors[INDICES], bits, slots * topk).to(index_dtype(num_vectors))  # (S·k,)
    # Stored as given back when the choice is a plain cast to the restore dtype (the same name; float8_e4m3,
    # a scaled code, never is): the reader's checks of PEFT's own tensors then apply as they are.
    if weights_dtype.value == restore_weights.name:
        weights = tensors[WEIGHTS]  # (S, k-1), stored as they were: bit for bit
    else:
        weights = decode_weights(tensors, weights_dtype, bad=bad)
        problem = simplex_problem(weights, weights_tolerance(weights_dtype, topk))
        if problem is not None:
            raise bad(f"the {weights_dtype.value} top-k weights {problem}, beyond their rounding")
        weights = _fit_simplex(weights.to(restore_weights.torch))
    if bank_dtype.value == restore_bank.name:
        bank = tensors[BANK]
    else:
        bank = decode_bank(tensors, bank_dtype, (num_vectors, vector_length), bad=bad)
    others = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    others[BANK_KEY] = bank.to(restore_bank.torch)
    table = Slots(indices.reshape(slots, topk), weights)  # (S·k,) -> (S, k)
    return modules, TopKViews(others, table, shapes), d.packing, table


class TopKViews(Mapping):
    """PEFT's top-k state dict over a slot table: the other tensors as they are, and each module
    side's indices ``(rows, cols, k)`` and weights ``(rows, cols, k - 1)`` made (a view of the
    table) when asked for.

    Keys run as unpacking always gave them: the other tensors, the bank, then each side's indices and
    weights in the table's order.
    """

    def __init__(self, others: dict[str, torch.Tensor], table: Slots, shapes: list):
        self._others, self._table = others, table
        self._runs: dict[str, tuple[bool, int, int, int]] = {}
        row = 0
        for name, side, (rows, cols) in shapes:
            self._runs[indices_key(name, side)] = (True, row, rows, cols)
            self._runs[weights_key(name, side)] = (False, row, rows, cols)
            row += rows * cols

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._others:
            return self._others[key]
        is_indices, row, rows, cols = self._runs[key]
        values = self._table.indices if is_indices else self._table.weights
        run = values[row : row + rows * cols]
        return run.reshape(rows, cols, values.shape[1])  # (n, k) -> (rows, cols, k)

    def __iter__(self) -> Iterator[str]:
        yield from self._others
        yield from self._runs

    def __len__(self) -> int:
        return len(self._others) + len(self._runs)

    def spec(self, key: str) -> TensorSpec:
        """The dtype and shape of ``key``'s tensor, without making it."""
        if key in self._others:
            value = self._others[key]
            return TensorSpec(value.dtype, tuple(value.shape))
        is_indices, _, rows, cols = self._runs[key]
        values = self._table.indices if is_indices else self._table.weights
        return TensorSpec(values.dtype, (rows, cols, values.shape[1]))


def unpacked_bytes(d: Description, *, num_vectors: int, vector_length: int, topk: int) -> int:
    """Bytes unpacking allocates for a file of description ``d``: its packed tensors and PEFT's top-k ones.

    Counted from the metadata alone, before a byte is read (:meth:`Codec.expanded_bytes`).
    """
    stored = sum(_nbytes(dtype, shape) for dtype, shape in d.expected.values())
    index_bytes = torch.empty(0, dtype=index_dtype(num_vectors)).element_size()
    topk_bytes = d.slots * topk * index_bytes + d.slots * (topk - 1) * d.restore_weights.itemsize
    return stored + topk_bytes + num_vectors * vector_length * d.restore_bank.itemsize


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _fit_simplex(weights: torch.Tensor) -> torch.Tensor:
    """Lossy weights, checked within their rounding of the simplex, back on it: summing below one.

    Rounding can push ``sum(w) >= 1``, which would make PEFT's recovered last
    weight ``1 - sum`` negative and its logit ``log`` of it NaN; such rows are
    scaled just below one, in float64, then cast back.  Anything further off
    was refused before (:func:`~.checks.simplex_problem`).
    """
    w = weights.double().clamp(min=0)
    total = w.sum(-1, keepdim=True)
    w = torch.where(total >= 1, w / total * (1 - 1e-6), w)
    return w.to(weights.dtype)


class PackedCodec(Codec):
    """vblora_store's packed form (see the module docstring and docs/format.md).

    Counted as every stored bit: the bank and weights at their stored width,
    ``ceil(log2 N)`` bits per index, the int8 bank's float32 scales;
    ``floor(total bits / 32)``.

    Example:
        >>> CODEC.savable_params(FormCounts(bank_params=800, slots=10, num_vectors=50, topk=2))  # 6-bit indices
        813
    """

    label = "packed"
    report_label = "packed form stores"
    bytes_note = "bytes, lossless"
    card_note = (
        "- **packed** (vblora_store's form of the top-k data: bit-packed indices, one tensor per kind). "
        "**Inference only**: it cannot resume training. **PEFT cannot read it directly**: convert it "
        "first with `vblora-store convert {repo_id} {name}-topk --to topk`."
    )
    options = ("weights_dtype", "bank_dtype")

    def detect(self, specs, metadata) -> bool:
        return is_packed(metadata)

    def expanded_bytes(self, specs, metadata, config, path) -> int:
        d = read_description(
            metadata[METADATA_KEY], r=config.r, num_vectors=config.num_vectors,
            vector_length=config.vector_length, topk=config.topk, source=str(path),
        )  # fmt: skip
        counts = dict(num_vectors=config.num_vectors, vector_length=config.vector_length, topk=config.topk)
        others = sum(spec.nbytes for key, spec in specs.items() if key not in d.expected)
        return unpacked_bytes(d, **counts) + others

    def decode_tensors(self, specs, reader, metadata, config, path) -> Decoded:
        """Unpack the (small) file into PEFT's top-k tensors in memory."""
        return self.unpack({key: reader(key) for key in specs}, metadata, config, path)

    def unpack(self, stored: dict[str, torch.Tensor], metadata, config, path, description=None) -> Decoded:
        """:meth:`decode_tensors` of tensors already in memory (the compressed form's, once decompressed)."""
        modules, tensors, packing, slots = unpack_topk(
            stored, metadata, r=config.r, num_vectors=config.num_vectors, vector_length=config.vector_length,
            topk=config.topk, source=str(path), description=description,
        )  # fmt: skip
        views = {key: tensors.spec(key) for key in tensors}
        order = [m[0] for m in modules]
        return Decoded(views, tensors.__getitem__, order=order, packing=packing, slots=slots)

    def encode(self, adapter, *, weights_dtype=WeightsDtype.FLOAT32, bank_dtype=BankDtype.FLOAT32, **options):
        tensors, _ = TOPK.encode(adapter)
        config = adapter.config
        return pack_topk(
            list(adapter.modules.values()), tensors, num_vectors=config.num_vectors, topk=config.topk,
            weights_dtype=weights_dtype, bank_dtype=bank_dtype,
        )  # fmt: skip

    def stored_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """Bytes these tensors take in this form's file (headers aside): what precision choices compare."""
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def savable_params(self, counts: FormCounts, packing: "Packing | None" = None) -> int:
        packing = packing or Packing(bits_for(counts.num_vectors))
        bits = bank_bits(packing.bank, counts.num_vectors, counts.bank_params)
        bits += weights_bits(packing.weights, counts.slots * (counts.topk - 1))
        bits += counts.slots * counts.topk * bits_for(counts.num_vectors)
        return bits // 32

    def data_bytes(self, counts: FormCounts) -> int:
        floats = 4 * (counts.bank_params + counts.slots * (counts.topk - 1))
        return floats + packed_size(counts.slots * counts.topk, bits_for(counts.num_vectors))

    def bytes_note_for(self, rounded_from: Optional[str] = None) -> str:
        if rounded_from is None:
            return self.bytes_note
        return self.bytes_note.replace("lossless", f"{rounded_from} rounded to float32")

    def precision(self, packing: "Packing | None" = None) -> str:
        if packing is None or not packing.lossy:
            return "lossless"
        rounded = f" (rounded from {packing.rounded_from})" if packing.rounded_from else ""
        return f"weights {packing.weights.value}, bank {packing.bank.value}{rounded}"


CODEC = PackedCodec()
