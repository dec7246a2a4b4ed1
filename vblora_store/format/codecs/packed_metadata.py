"""What a packed file says about itself: its metadata, written and read back checked.

One safetensors metadata key (:data:`METADATA_KEY`) holds canonical JSON: the
format and version, the index width, the slots, how the weights and bank are
stored (:class:`Packing`), the dtypes PEFT's tensors are given back in, and the
module table.  :func:`describe` writes it; :func:`read_description` parses it
and checks it against the adapter's config before any tensor is read, so every
tensor's dtype and shape is known in advance.  The packed and compressed codecs
share it.  Specified in docs/format.md ("The packed form").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from ...choices import BankDtype, WeightsDtype
from ...dtypes import DTYPES, DType, by_name, name_of
from ...errors import InvalidAdapterError
from ..bitpack import bits_for, packed_size
from .precision import bank_layout, weights_layout

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDICES",
    "METADATA_KEY",
    "Packing",
    "Description",
    "is_packed",
    "rounded_from",
    "describe",
    "read_description",
]

FORMAT_NAME = "vblora-packed"
FORMAT_VERSION = "1"
INDICES = "vblora_packed.indices"
# One metadata key holding canonical JSON: safetensors writes metadata keys in
# hash order, so several keys would make the bytes differ from run to run.
METADATA_KEY = "vblora_store.packed"


def is_packed(metadata: dict | None) -> bool:
    """Whether a safetensors header's metadata marks the packed form."""
    return bool(metadata) and METADATA_KEY in metadata


@dataclass(frozen=True)
class Packing:
    """How a packed file stores its values (its metadata, typed).

    Attributes:
        index_bits: Bits per top-k index: ``ceil(log2 N)``.
        weights: How the top-k weights are stored.
        bank: How the bank is stored.
        rounded_from: The adapter's own dtype where it is wider than the packed form's widest
            (float64 kept as float32: :func:`rounded_from`), else ``None``.  When set, even
            float32 storage is lossy.

    Example:
        >>> Packing(11, WeightsDtype.FLOAT16, BankDtype.INT8).lossy, Packing(11).info()
        (True, {'weights_dtype': 'float32', 'bank_dtype': 'float32', 'index_bits': '11'})
    """

    index_bits: int
    weights: WeightsDtype = WeightsDtype.FLOAT32
    bank: BankDtype = BankDtype.FLOAT32
    rounded_from: Optional[str] = None

    @property
    def lossy(self) -> bool:
        """Whether the weights or the bank lose precision."""
        stored_wide = (self.weights, self.bank) == (WeightsDtype.FLOAT32, BankDtype.FLOAT32)
        return not stored_wide or self.rounded_from is not None

    def info(self) -> dict[str, str]:
        """The stored dtypes and index width as ``inspect`` shows them."""
        return {
            "weights_dtype": self.weights.value,
            "bank_dtype": self.bank.value,
            "index_bits": str(self.index_bits),
        }


def rounded_from(*dtype_names: str) -> Optional[str]:
    """The first of an adapter's dtypes wider than the packed form stores (float32 at most), or ``None``.

    Example:
        >>> rounded_from("float32", "float64"), rounded_from("bfloat16", "float32")
        ('float64', None)
    """
    return next((name for name in dtype_names if by_name(name).bits > 32), None)


def describe(
    packing: Packing, modules: list, slots: int, *, restore_weights: torch.dtype, restore_bank: torch.dtype
) -> dict[str, str]:
    """The safetensors metadata of a packed file: one key, canonical JSON (sorted keys, no spaces).

    Args:
        packing: How the weights and bank are stored, and the index width.
        modules: ``ModuleShape``s in the order their slots are laid out.
        slots: Sub-vector slots ``S``.
        restore_weights, restore_bank: The dtypes PEFT's top-k weights and bank are given back in.

    Example:
        >>> from types import SimpleNamespace as Module
        >>> describe(Packing(2), [Module(name="fc", in_features=4, out_features=2)], 3,
        ...          restore_weights=torch.float32, restore_bank=torch.float32)[METADATA_KEY][:52]
        '{"bank_dtype":"float32","format":"vblora-packed","in'
    """
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "index_bits": packing.index_bits,
        "num_slots": slots,
        "weights_dtype": packing.weights.value,
        "bank_dtype": packing.bank.value,
        "restore_weights_dtype": name_of(restore_weights),
        "restore_bank_dtype": name_of(restore_bank),
        "modules": [[m.name, m.in_features, m.out_features] for m in modules],
    }
    return {METADATA_KEY: json.dumps(description, sort_keys=True, separators=(",", ":"))}


@dataclass(frozen=True)
class Description:
    """A packed file's metadata, checked against the config: what the file must hold, and how to read it."""

    packing: Packing
    restore_weights: DType  # the dtypes PEFT's top-k weights and bank are given back in
    restore_bank: DType
    modules: list[tuple[str, int, int]]  # (name, in, out), the slots' order
    shapes: list[tuple[str, str, tuple[int, int]]]  # (module, side, (rows, cols)) of every side, in order
    slots: int
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # every packed tensor's dtype and shape


def read_description(
    text: str, *, r: int, num_vectors: int, vector_length: int, topk: int, source: str
) -> Description:
    """Parse and check the packed form's metadata (one JSON string) against the config.

    Raises:
        InvalidAdapterError: malformed, another version, or not fitting the config.
    """

    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(
            f"{source}: packed form: {message}; the file is damaged or not ours, fetch it again."
        )

    try:
        description = json.loads(text)
        if description["format"] != FORMAT_NAME:
            raise ValueError(f"format is {description['format']!r}")
        version = description["version"]
        bits = int(description["index_bits"])
        weights_dtype = WeightsDtype(description["weights_dtype"])
        bank_dtype = BankDtype(description["bank_dtype"])
        restore = {field: description[field] for field in ("restore_weights_dtype", "restore_bank_dtype")}
        modules = [(str(name), int(n_in), int(n_out)) for name, n_in, n_out in description["modules"]]
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise bad(f"metadata is incomplete or malformed ({type(e).__name__}: {e})") from e
    if version != FORMAT_VERSION:
        raise InvalidAdapterError(
            f"{source}: packed format version {version}; this vblora_store reads version {FORMAT_VERSION}. "
            "Upgrade vblora_store."
        )
    restore_weights, restore_bank = (_restore_dtype(field, name, bad) for field, name in restore.items())
    if bits != bits_for(num_vectors):
        raise bad(f"index_bits is {bits} but num_vectors={num_vectors} needs {bits_for(num_vectors)}")
    shapes = []
    for name, n_in, n_out in modules:
        if n_in <= 0 or n_out <= 0 or n_in % vector_length or n_out % vector_length:
            raise bad(
                f"module {name!r} has features {n_in}x{n_out}, not positive multiples of {vector_length}"
            )
        shapes += [(name, "A", (r, n_in // vector_length)), (name, "B", (n_out // vector_length, r))]
    slots = sum(a * b for _, _, (a, b) in shapes)
    expected = {INDICES: (torch.uint8, (packed_size(slots * topk, bits),))}
    expected.update(weights_layout(weights_dtype, slots, topk))
    expected.update(bank_layout(bank_dtype, num_vectors, vector_length))
    packing = Packing(bits, weights_dtype, bank_dtype, rounded_from(restore_weights.name, restore_bank.name))
    return Description(packing, restore_weights, restore_bank, modules, shapes, slots, expected)


def _restore_dtype(field: str, name: object, bad) -> DType:
    """The dtype the metadata's ``field`` names: any floating dtype of :mod:`vblora_store.dtypes`."""
    try:
        dtype = by_name(name) if isinstance(name, str) else None
    except KeyError:
        dtype = None
    if dtype is None or not dtype.floating:
        known = ", ".join(d.name for d in DTYPES if d.floating)
        raise bad(f"{field} is {name!r}, not a floating dtype ({known})")
    return dtype
