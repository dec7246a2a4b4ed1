"""The named choices of the package, free of torch: what the command line offers before it imports anything.

Each is a ``str`` Enum whose values are the command line's words (storage forms
are a registry, :mod:`vblora_store.storage_forms`, re-exported here); the modules
that act on them (``format.codecs.packed``, ``report``, ``merge``)
re-export them, so ``--help``, ``--version`` and usage errors cost neither
torch nor safetensors.
"""

from __future__ import annotations

from enum import Enum

from .storage_forms import StorageForm  # noqa: F401  (the registry of forms, also torch-free)

__all__ = ["StorageForm", "WeightsDtype", "BankDtype", "ReportFormat", "MergeDtype"]


class WeightsDtype(str, Enum):
    """How the packed form stores top-k weights.

    Members:
        FLOAT32: as PEFT stores them: lossless.
        FLOAT16: half the bytes; about 3 significant digits.
        BFLOAT16: half the bytes; about 2 significant digits, float32's range.
        FIXED16: 16-bit fixed point over the stored weights' own range [min, max].
        FIXED8: 8-bit fixed point over that range: a quarter of the bytes.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FIXED16 = "fixed16"
    FIXED8 = "fixed8"


class BankDtype(str, Enum):
    """How the packed form stores the vector bank.

    Members:
        FLOAT32: lossless.
        FLOAT16: half the bytes.
        BFLOAT16: half the bytes, float32's range.
        FLOAT8_E4M3: a quarter of the bytes: each vector scaled to float8 e4m3's range (448) and cast;
            the scales are stored as float32 (N,).
        INT8: a quarter of the bytes: each vector scaled by max|v| / 127 and rounded; scales likewise.
        INT4: an eighth of the bytes: each vector scaled by max|v| / 7, rounded, two values a byte.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3 = "float8_e4m3"
    INT8 = "int8"
    INT4 = "int4"


class ReportFormat(str, Enum):
    """How a report is rendered.

    Members:
        TEXT: aligned lines for a terminal.
        JSON: one object ``{"adapters": [...], "checks": [...], "passed": bool}``.
        MARKDOWN: tables for a CI job summary or a model card.
    """

    TEXT = "text"
    JSON = "json"
    MARKDOWN = "markdown"


class MergeDtype(str, Enum):
    """The dtype of the merged checkpoint's floating tensors (``auto``: each as in the base)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
