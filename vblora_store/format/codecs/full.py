"""The full form: every logit, as PEFT saves by default; training can resume.

::

    base_model.vblora_vector_bank              (N, L)
    base_model.model.<m>.vblora_logits_A       (r, in/L, N)
    base_model.model.<m>.vblora_logits_B       (out/L, r, N)

Counted as PEFT counts it: ``N·L + S·N`` float32-equivalent parameters.
"""

from __future__ import annotations

from ...errors import UnsupportedConversionError
from .base import Codec, FormCounts, peft_kind

__all__ = ["FullCodec", "CODEC"]


class FullCodec(Codec):
    """PEFT's full form (see the module docstring).

    Example:
        >>> CODEC.savable_params(FormCounts(bank_params=800, slots=10, num_vectors=50, topk=2))
        1300
    """

    label = "full"
    report_label = "full form would store"
    bytes_note = "bytes of tensors"
    card_note = (
        "- **full**: every logit is stored, as PEFT saves by default; training can resume from it "
        "(`is_trainable=True`)."
    )

    def detect(self, specs, metadata) -> bool:
        return peft_kind(specs) == "logits"

    def encode(self, adapter, **options):
        if not adapter.form.has_logits:
            raise UnsupportedConversionError(
                f"{adapter.folder}: is in {adapter.form.value} form; the full logits were discarded when it was "
                "saved, so it cannot become full again. Convert the original full adapter instead."
            )
        return {key: adapter.checked_tensor(key) for key in adapter.specs}, {}

    def savable_params(self, counts: FormCounts, packing=None) -> int:
        return counts.bank_params + counts.slots * counts.num_vectors

    def data_bytes(self, counts: FormCounts) -> int:
        return 4 * self.savable_params(counts)


CODEC = FullCodec()
