"""The top-k form: PEFT's ``save_only_topk_weights=True``, written byte for byte as PEFT writes it.

::

    base_model.vblora_vector_bank                           (N, L)
    base_model.model.<m>.vblora_logits_X_topk_indices       (..., k)      PEFT's index dtype (keys.index_dtype)
    base_model.model.<m>.vblora_logits_X_topk_weights       (..., k - 1)  softmax of the top-k logits, last dropped

Counted as PEFT counts it: ``N·L + S·(k - 1) + S·k·f`` float32-equivalent
parameters, ``f`` = index bytes / 4 (0.25, 0.5, 1, 2 for uint8 ... int64),
floored as PEFT's ``int()`` floors its float sum.
"""

from __future__ import annotations

from ...topk import select_topk
from ..keys import index_dtype, indices_key, parse_key, weights_key
from .base import Codec, FormCounts, peft_kind

__all__ = ["TopKCodec", "CODEC"]


class TopKCodec(Codec):
    """PEFT's top-k form (see the module docstring).

    Example:
        >>> CODEC.savable_params(FormCounts(bank_params=800, slots=10, num_vectors=50, topk=2))  # uint8: f = 1/4
        815
    """

    label = "top-k"
    report_label = "top-k form stores"
    card_note = (
        "- **top-k** (PEFT's `save_only_topk_weights=True`): only the top-k bank indices and weights of "
        "each sub-vector are kept. **Inference only**: it cannot resume training, because the full "
        "logits were discarded; load it for inference or merging."
    )

    def detect(self, specs, metadata) -> bool:
        return peft_kind(specs) == "topk"

    def encode(self, adapter, **options):
        """PEFT's top-k tensors of ``adapter``: the top-k of each logits tensor, one tensor at a time."""
        k, dtype = adapter.config.topk, index_dtype(adapter.config.num_vectors)
        out = {}
        for key in adapter.specs:
            value = adapter.checked_tensor(key)
            parts = parse_key(key)
            if parts is not None and parts.part == "logits":
                indices, weights = select_topk(value, k, dtype)
                out[indices_key(parts.module, parts.side)] = indices
                out[weights_key(parts.module, parts.side)] = weights
                del value
            else:
                out[key] = value
        return out, {}

    def savable_params(self, counts: FormCounts, packing=None) -> int:
        index_bytes = index_dtype(counts.num_vectors).itemsize
        return (
            counts.bank_params
            + counts.slots * (counts.topk - 1)
            + (counts.slots * counts.topk * index_bytes) // 4
        )

    def data_bytes(self, counts: FormCounts) -> int:
        floats = 4 * (counts.bank_params + counts.slots * (counts.topk - 1))
        return floats + counts.slots * counts.topk * index_dtype(counts.num_vectors).itemsize


CODEC = TopKCodec()
