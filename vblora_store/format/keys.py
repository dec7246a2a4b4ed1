"""Tensor names, storage forms and the index-dtype rule: PEFT's layout in one place.

A PEFT VB-LoRA weights file names its tensors like this (``<m>`` is a module name
such as ``model.layers.0.self_attn.q_proj``; ``<X>`` is ``A`` or ``B``)::

    base_model.vblora_vector_bank                           (N, L)        the bank
    base_model.model.<m>.vblora_logits_<X>                  (..., N)      full form
    base_model.model.<m>.vblora_logits_<X>_topk_indices     (..., k)      top-k form
    base_model.model.<m>.vblora_logits_<X>_topk_weights     (..., k - 1)  top-k form

where ``...`` is ``(r, in/L)`` for A and ``(out/L, r)`` for B.  Any other tensor
(``modules_to_save`` copies, trained biases) is carried through untouched.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ..choices import StorageForm
from ..folders import WEIGHTS_NAME, WEIGHTS_NAME_BIN

__all__ = [
    "StorageForm",
    "BANK_KEY",
    "MODEL_PREFIX",
    "WEIGHTS_NAME",
    "WEIGHTS_NAME_BIN",
    "KeyParts",
    "parse_key",
    "logits_key",
    "indices_key",
    "weights_key",
    "index_dtype",
]

BANK_KEY = "base_model.vblora_vector_bank"
MODEL_PREFIX = "base_model.model."

_KEY = re.compile(r"^(?P<prefix>.+)\.vblora_logits_(?P<side>[AB])(?P<suffix>_topk_indices|_topk_weights)?$")
_PART_OF_SUFFIX = {None: "logits", "_topk_indices": "indices", "_topk_weights": "weights"}


class KeyParts(NamedTuple):
    """A logits-family tensor name split into its parts."""

    module: str  # "model.layers.0.self_attn.q_proj"
    side: str  # "A" or "B"
    part: str  # "logits", "indices" or "weights"


@lru_cache(maxsize=1 << 14)  # a server reads the same key names for every adapter of a base model
def parse_key(key: str) -> Optional[KeyParts]:
    """Split a logits, indices or weights key; ``None`` for any other tensor.

    Example:
        >>> parse_key("base_model.model.fc.vblora_logits_B_topk_weights")
        KeyParts(module='fc', side='B', part='weights')
    """
    match = _KEY.match(key)
    if match is None:
        return None
    prefix = match["prefix"]
    module = prefix[len(MODEL_PREFIX) :] if prefix.startswith(MODEL_PREFIX) else prefix
    return KeyParts(module, match["side"], _PART_OF_SUFFIX[match["suffix"]])


def logits_key(module: str, side: str) -> str:
    """``base_model.model.<module>.vblora_logits_<side>``."""
    return f"{MODEL_PREFIX}{module}.vblora_logits_{side}"


def indices_key(module: str, side: str) -> str:
    """The top-k indices key of one module side."""
    return logits_key(module, side) + "_topk_indices"


def weights_key(module: str, side: str) -> str:
    """The top-k weights key of one module side."""
    return logits_key(module, side) + "_topk_weights"


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's rule for the dtype of stored top-k indices.

    The smallest of uint8, int16, int32, int64 whose range holds ``num_vectors``
    (note PEFT's bounds: ``< 2**8``, ``< 2**15``, ``< 2**31``).  The parameter
    accounting derives its float32-equivalent factor from this dtype's size.

    Example:
        >>> index_dtype(255), index_dtype(256), index_dtype(2048)
        (torch.uint8, torch.int16, torch.int16)
    """
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64
