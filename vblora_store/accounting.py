"""Parameter accounting: what an adapter stores, counted as PEFT counts it, per adapter.

PEFT's ``VBLoRAModel.get_nb_savable_parameters`` counts float32-equivalent
parameters (full form ``N·L + S·N``; top-k form ``N·L + S·(k - 1) + S·k·f``
with ``f`` = index bytes / 4), ``S`` the number of sub-vector slots.  Each
storage form's formula lives in its codec (:mod:`vblora_store.format.codecs`);
this module loops over the registered forms, so every form is counted, and
counts each adapter alone, from its files, with no model (PEFT sums every
adapter of a model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .dtypes import name_of
from .format.codecs.base import FormCounts
from .format.codecs.packed_metadata import rounded_from
from .format.stored import StoredAdapter
from .storage_forms import StorageForm

__all__ = ["ModuleTypeCount", "AdapterAccount", "FormCounts", "account"]


@dataclass(frozen=True)
class ModuleTypeCount:
    """Totals for every module of one type (the last part of its name, e.g. ``q_proj``)."""

    module_type: str
    num_modules: int
    slots: int
    lora_params: int


@dataclass(frozen=True)
class AdapterAccount:
    """Everything counted about one stored adapter.

    ``vblora_params`` and ``other_params`` describe the form as stored;
    ``form_params`` and ``form_bytes`` say what every registered form would store.
    """

    path: str
    adapter_name: str
    form: StorageForm
    r: int
    num_vectors: int
    vector_length: int
    topk: int
    num_modules: int
    slots: int
    file_bytes: int
    bank_params: int
    vblora_params: int
    other_params: int
    form_params: dict[str, int]  # float32-equivalent parameters each registered form stores, by form name
    lora_params: int
    form_bytes: dict[str, int]  # tensor bytes each registered form stores (lossless), by form name
    precision: str  # "lossless", or the lossy packed dtypes, e.g. "weights float16, bank int8"
    by_module_type: list[ModuleTypeCount] = field(default_factory=list)
    rounded_from: Optional[str] = None  # the adapter's dtype wider than float32 ("float64"), else None

    def __getattr__(self, name: str) -> int:
        """``<form>_vblora_params``: what that registered form would store (``full_vblora_params``, ...)."""
        form = name.removesuffix("_vblora_params")
        if name.endswith("_vblora_params") and form in self.__dict__.get("form_params", {}):
            return self.form_params[form]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def compression_vs_full(self) -> float:
        """How many times fewer float32-equivalent parameters than the full form."""
        return self.full_vblora_params / self.vblora_params

    @property
    def compression_vs_lora(self) -> float:
        """How many times fewer than a rank-r LoRA on the same modules."""
        return self.lora_params / self.vblora_params


def account(adapter: StoredAdapter) -> AdapterAccount:
    """Count one stored adapter from its header alone (no tensor data is read).

    Args:
        adapter: A stored adapter from :func:`vblora_store.format.read_adapters`.

    Returns:
        Its :class:`AdapterAccount`.

    Example:
        >>> from vblora_store import read_adapters
        >>> acc = account(read_adapters("fixtures/tiny-llama-vblora")[0])
        >>> acc.vblora_params, round(acc.compression_vs_lora, 3)
        (35840, 0.243)
    """
    cfg = adapter.config
    types: dict[str, list[int]] = {}
    slots = lora = 0
    for module in adapter.modules.values():
        module_lora = cfg.r * (module.in_features + module.out_features)
        module_slots = module_lora // cfg.vector_length  # r·in/L sub-vectors in A, out/L·r in B
        slots += module_slots
        lora += module_lora
        totals = types.setdefault(module.name.rsplit(".", 1)[-1], [0, 0, 0])
        totals[0] += 1
        totals[1] += module_slots
        totals[2] += module_lora
    counts = FormCounts(cfg.num_vectors * cfg.vector_length, slots, cfg.num_vectors, cfg.topk)
    codec = adapter.form.codec
    return AdapterAccount(
        path=str(adapter.folder),
        adapter_name=adapter.name,
        form=adapter.form,
        r=cfg.r,
        num_vectors=cfg.num_vectors,
        vector_length=cfg.vector_length,
        topk=cfg.topk,
        num_modules=len(adapter.modules),
        slots=slots,
        file_bytes=adapter.file_bytes,
        bank_params=counts.bank_params,
        vblora_params=codec.savable_params(counts, adapter.packing),
        other_params=sum(adapter.specs[k].numel for k in adapter.other_keys),
        form_params={form.value: form.codec.savable_params(counts) for form in StorageForm},
        lora_params=lora,
        form_bytes={form.value: form.codec.data_bytes(counts) for form in StorageForm},
        precision=codec.precision(adapter.packing),
        by_module_type=[ModuleTypeCount(t, *v) for t, v in sorted(types.items())],
        rounded_from=rounded_from(
            *(
                name_of(spec.dtype)
                for key, spec in adapter.specs.items()
                if spec.dtype.is_floating_point and key not in adapter.other_keys
            )
        ),
    )
