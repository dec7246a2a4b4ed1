"""The named choices of the package, free of torch: what the command line offers before it imports anything.

Each is a ``str`` Enum whose values are the command line's words; the modules
that act on them (``format.keys``, ``format.packed``, ``report``, ``merge``)
re-export them, so ``--help``, ``--version`` and usage errors cost neither
torch nor safetensors.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["StorageForm", "WeightsDtype", "BankDtype", "ReportFormat", "MergeDtype"]


class StorageForm(str, Enum):
    """How an adapter's logits are stored.

    Members:
        FULL: every logit, ``(..., N)`` per module side; training can resume.
        TOPK: PEFT's ``save_only_topk_weights`` form: the top-k indices
            ``(..., k)`` and the softmax of the top-k logits without its last
            entry ``(..., k - 1)``; inference and merging only.
        PACKED: vblora_store's form of the same top-k data: indices bit-packed,
            one tensor per kind, optional lower precision (docs/format.md).
    """

    FULL = "full"
    TOPK = "topk"
    PACKED = "packed"

    @property
    def has_logits(self) -> bool:
        """Whether every logit is stored (training can resume)."""
        return self is StorageForm.FULL


class WeightsDtype(str, Enum):
    """How the packed form stores top-k weights.

    Members:
        FLOAT32: as PEFT stores them: lossless.
        FLOAT16: half the bytes; about 3 significant digits.
        BFLOAT16: half the bytes; about 2 significant digits, float32's range.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class BankDtype(str, Enum):
    """How the packed form stores the vector bank.

    Members:
        FLOAT32: lossless.
        FLOAT16: half the bytes.
        BFLOAT16: half the bytes, float32's range.
        INT8: a quarter of the bytes: each vector scaled by max|v| / 127 and rounded;
            the scales are stored as float32 (N,).
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"


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
