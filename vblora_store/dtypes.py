"""The package's one vocabulary of dtypes: each name, its torch dtype, bits and safetensors code.

Who looks dtypes up here: reading adapters' safetensors headers
(``format/reading.py``: codes to torch dtypes); the precision codec
(``format/codecs/precision.py``: the dtype and bits each bank and weights
precision is stored in, which the packed form's counts and so the accounting
use); the packed form (the restore dtypes in its metadata) and the compressed
form (each compressed tensor's code); the checkpoint reader and writer and the
merge (``checkpoint.py``, ``merge.py``: the dtypes a weight can be merged in,
their codes and sizes); and every message and ``inspect`` naming a dtype
(:func:`name_of`).  Not here: PEFT's index-dtype rule (``format/keys.py``), and
the command line's torch-free choices (``choices.py``), whose words are the
names or aliases of rows here.  torch is imported only when a torch dtype is
asked for, so the table itself costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DType", "DTYPES", "by_name", "by_code", "by_torch", "name_of"]


@dataclass(frozen=True)
class DType:
    """One dtype.

    Attributes:
        name: torch's name without ``torch.``: ``"float32"``, ``"int16"``, ...
        code: safetensors' name in a file header: ``"F32"``, ``"I16"``, ...
        bits: Width of one value.
        floating: A floating-point dtype.
        aliases: Other names :func:`by_name` takes for it: the command line's words where they
            differ from torch's (``"float8_e4m3"`` for ``float8_e4m3fn``).

    Example:
        >>> by_code("BF16").name, by_code("BF16").bits, by_name("int16").code
        ('bfloat16', 16, 'I16')
    """

    name: str
    code: str
    bits: int
    floating: bool
    aliases: tuple[str, ...] = ()

    @property
    def torch(self) -> Any:
        """The ``torch.dtype``."""
        import torch

        return getattr(torch, self.name)

    @property
    def itemsize(self) -> int:
        """Bytes of one value (a whole number for every dtype of the table)."""
        return self.bits // 8


DTYPES: tuple[DType, ...] = (
    DType("float64", "F64", 64, True),
    DType("float32", "F32", 32, True),
    DType("float16", "F16", 16, True),
    DType("bfloat16", "BF16", 16, True),
    DType("float8_e4m3fn", "F8_E4M3", 8, True, aliases=("float8_e4m3",)),
    DType("float8_e5m2", "F8_E5M2", 8, True),
    DType("int64", "I64", 64, False),
    DType("int32", "I32", 32, False),
    DType("int16", "I16", 16, False),
    DType("uint16", "U16", 16, False),
    DType("int8", "I8", 8, False),
    DType("uint8", "U8", 8, False),
    DType("bool", "BOOL", 8, False),
)
_BY_NAME = {name: d for d in DTYPES for name in (d.name, *d.aliases)}
_BY_CODE = {d.code: d for d in DTYPES}


def by_name(name: str) -> DType:
    """The dtype named ``name`` (``"float32"``, ``"torch.float32"``, or an alias: ``"float8_e4m3"``).

    Raises:
        KeyError: no such dtype in the table.

    Example:
        >>> by_name("float8_e4m3").name, by_name("torch.float64").code
        ('float8_e4m3fn', 'F64')
    """
    return _BY_NAME[name.removeprefix("torch.")]


def by_code(code: str) -> DType:
    """The dtype of a safetensors header code (``"F32"``).

    Raises:
        KeyError: a code the table does not hold.
    """
    return _BY_CODE[code]


def by_torch(dtype: Any) -> DType:
    """The table's entry of a ``torch.dtype``."""
    return by_name(str(dtype))


def name_of(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32``: how every message and file names a torch dtype.

    Example:
        >>> import torch
        >>> name_of(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")
