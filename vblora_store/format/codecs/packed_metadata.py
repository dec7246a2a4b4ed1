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
from ...dtypes import DType, by_name, name_of
from ...errors import InvalidAdapterError
from ..bitpack import bits_for, packed_size
from .checks import integer
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
    "check_version",
    "RESTORE_DTYPES",
]

FORMAT_NAME = "vblora-packed"
FORMAT_VERSION = "1"
INDICES = "vblora_packed.indices"
# One metadata key holding canonical JSON: safetensors writes metadata keys in
# hash order, so several keys would make the bytes differ from run to run.
METADATA_KEY = "vblora_store.packed"
#: The dtypes PEFT's top-k weights and bank can be given back in: the floating dtypes a VB-LoRA adapter is
#: trained and saved in (float8 is a storage choice, never an adapter's own dtype).
RESTORE_DTYPES = ("float64", "float32", "float16", "bfloat16")


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
        if not isinstance(description, dict):
            raise TypeError(f"the metadata is a JSON {type(description).__name__}, not an object")
        if description["format"] != FORMAT_NAME:
            raise ValueError(f"format is {description['format']!r}")
        version = description["version"]
        fields = {name: description[name] for name in ("index_bits", "num_slots", "modules")}
        weights_dtype = WeightsDtype(description["weights_dtype"])
        bank_dtype = BankDtype(description["bank_dtype"])
        restore = {field: description[field] for field in ("restore_weights_dtype", "restore_bank_dtype")}
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise bad(f"metadata is incomplete or malformed ({type(e).__name__}: {e})") from e
    check_version("packed", version, FORMAT_VERSION, source)
    restore_weights, restore_bank = (_restore_dtype(field, name, bad) for field, name in restore.items())
    bits = integer(fields["index_bits"], "index_bits", bad, minimum=1)
    if bits != bits_for(num_vectors):
        raise bad(f"index_bits is {bits} but num_vectors={num_vectors} needs {bits_for(num_vectors)}")
    modules = _module_table(fields["modules"], bad)
    shapes = []
    for name, n_in, n_out in modules:
        if n_in % vector_length or n_out % vector_length:
            raise bad(f"module {name!r} has features {n_in}x{n_out}, not multiples of {vector_length}")
        shapes += [(name, "A", (r, n_in // vector_length)), (name, "B", (n_out // vector_length, r))]
    slots = sum(a * b for _, _, (a, b) in shapes)
    declared_slots = integer(fields["num_slots"], "num_slots", bad)
    if declared_slots != slots:
        raise bad(f"num_slots is {declared_slots} but its module table (r={r}) gives {slots}")
    expected = {INDICES: (torch.uint8, (packed_size(slots * topk, bits),))}
    expected.update(weights_layout(weights_dtype, slots, topk))
    expected.update(bank_layout(bank_dtype, num_vectors, vector_length))
    packing = Packing(bits, weights_dtype, bank_dtype, rounded_from(restore_weights.name, restore_bank.name))
    return Description(packing, restore_weights, restore_bank, modules, shapes, slots, expected)


def check_version(form: str, version: object, known: str, source: str) -> None:
    """Refuse a ``version`` other than ``known`` (a JSON string): an unknown one asks for an upgrade."""
    if version == known:
        return
    if not isinstance(version, str):
        raise InvalidAdapterError(
            f"{source}: {form} form: version is {json.dumps(version)}, not a string such as "
            f"{json.dumps(known)}; the file is damaged or not ours, fetch it again."
        )
    raise InvalidAdapterError(
        f"{source}: {form} format version {version!r}; this vblora_store reads version {known!r}. "
        "Upgrade vblora_store."
    )


def _module_table(table: object, bad) -> list[tuple[str, int, int]]:
    """The module table checked: ``[name, in, out]`` rows, names unique strings, features positive."""
    if not isinstance(table, list) or not table:
        raise bad(f"modules is {type(table).__name__} {table!r:.60}, not a non-empty list of [name, in, out]")
    modules, seen = [], set()
    for row in table:
        if not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str) or not row[0]:
            raise bad(
                f"module table row {row!r:.80} is not [name, in_features, out_features] with a name string"
            )
        name = row[0]
        if name in seen:
            raise bad(f"module {name!r} is listed twice in the module table")
        seen.add(name)
        n_in, n_out = (
            integer(v, f"module {name!r} {what}", bad, minimum=1)
            for v, what in zip(row[1:], ("in_features", "out_features"))
        )
        modules.append((name, n_in, n_out))
    return modules


def _restore_dtype(field: str, name: object, bad) -> DType:
    """The dtype the metadata's ``field`` names: one the encoder writes (:data:`RESTORE_DTYPES`)."""
    if name not in RESTORE_DTYPES:
        raise bad(f"{field} is {name!r}, not one of {', '.join(RESTORE_DTYPES)}")
    return by_name(name)
