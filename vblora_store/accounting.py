"""Parameter accounting: what an adapter stores, counted as PEFT counts it, per adapter.

PEFT's ``VBLoRAModel.get_nb_savable_parameters`` counts float32-equivalent
parameters::

    full form:   bank + every logit                      = N·L + S·N
    top-k form:  bank + S·(k - 1) + S·k·f                f = index bytes / 4

where ``S`` is the number of sub-vector slots (logits numel / N) and ``f`` is
0.25, 0.5, 1 or 2 for the uint8, int16, int32 or int64 indices of PEFT's
index-dtype rule.  PEFT sums every adapter of a model; here each adapter is
counted alone, from its files, with no model.

The packed form follows the same idea, every stored bit counted: the bank and
weights at their stored width, ``b = ceil(log2 N)`` bits per index, plus the
int8 bank's float32 scales; ``floor(total bits / 32)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .format.bitpack import bits_for, packed_size
from .format.keys import StorageForm, index_dtype
from .format.peft import StoredAdapter

__all__ = [
    "ModuleTypeCount",
    "AdapterAccount",
    "full_savable_params",
    "topk_savable_params",
    "packed_savable_params",
    "form_data_bytes",
    "account",
]


def full_savable_params(*, bank_params: int, slots: int, num_vectors: int) -> int:
    """Float32-equivalent count of the full form: the bank plus ``slots · N`` logits."""
    return bank_params + slots * num_vectors


def topk_savable_params(*, bank_params: int, slots: int, num_vectors: int, topk: int) -> int:
    """Float32-equivalent count of PEFT's top-k form (see the module docstring).

    Example:
        >>> topk_savable_params(bank_params=800, slots=10, num_vectors=50, topk=2)  # uint8: f = 1/4
        815
    """
    index_bytes = index_dtype(num_vectors).itemsize
    # S·k·f with f = bytes/4, floored as PEFT's int() floors its float sum.
    return bank_params + slots * (topk - 1) + (slots * topk * index_bytes) // 4


def packed_savable_params(
    *, bank_params: int, slots: int, num_vectors: int, topk: int, weights_bits: int = 32, bank_bits: int = 32
) -> int:
    """Float32-equivalent count of the packed form (see the module docstring).

    Example:
        >>> packed_savable_params(bank_params=800, slots=10, num_vectors=50, topk=2)  # 6-bit indices
        813
    """
    scale_bits = 32 * num_vectors if bank_bits == 8 else 0
    bits = bank_params * bank_bits + scale_bits + slots * (topk - 1) * weights_bits
    bits += slots * topk * bits_for(num_vectors)
    return bits // 32


def form_data_bytes(*, bank_params: int, slots: int, num_vectors: int, topk: int) -> dict[str, int]:
    """Tensor bytes (headers aside) each lossless form stores, float32 bank and weights.

    Example:
        >>> form_data_bytes(bank_params=800, slots=10, num_vectors=50, topk=2)
        {'full': 5200, 'topk': 3260, 'packed': 3255}
    """
    floats = 4 * (bank_params + slots * (topk - 1))
    return {
        "full": 4 * (bank_params + slots * num_vectors),
        "topk": floats + slots * topk * index_dtype(num_vectors).itemsize,
        "packed": floats + packed_size(slots * topk, bits_for(num_vectors)),
    }


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

    ``vblora_params`` and ``other_params`` describe the form as stored; the
    ``full_``/``topk_`` counts say what each form would store.
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
    full_vblora_params: int
    topk_vblora_params: int
    packed_vblora_params: int
    lora_params: int
    form_bytes: dict[str, int]
    precision: str  # "lossless", or the lossy packed dtypes, e.g. "weights float16, bank int8"
    by_module_type: list[ModuleTypeCount] = field(default_factory=list)

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
        >>> acc = account(read_adapters("fixtures/tiny-llama-vblora")[0])  # doctest: +SKIP
        >>> acc.vblora_params, acc.compression_vs_lora  # doctest: +SKIP
    """
    cfg = adapter.config
    n, length = cfg.num_vectors, cfg.vector_length
    types: dict[str, list[int]] = {}
    slots = lora = 0
    for module in adapter.modules.values():
        module_lora = cfg.r * (module.in_features + module.out_features)
        module_slots = module_lora // length  # r·in/L sub-vectors in A, out/L·r in B
        slots += module_slots
        lora += module_lora
        totals = types.setdefault(module.name.rsplit(".", 1)[-1], [0, 0, 0])
        totals[0] += 1
        totals[1] += module_slots
        totals[2] += module_lora
    bank = n * length
    full = full_savable_params(bank_params=bank, slots=slots, num_vectors=n)
    topk = topk_savable_params(bank_params=bank, slots=slots, num_vectors=n, topk=cfg.topk)
    packed = packed_savable_params(bank_params=bank, slots=slots, num_vectors=n, topk=cfg.topk)
    stored = {StorageForm.FULL: full, StorageForm.TOPK: topk}.get(adapter.form)
    precision = "lossless"
    if stored is None:  # packed: count the stored widths
        weights, bank_dtype = adapter.packing["weights_dtype"], adapter.packing["bank_dtype"]
        stored = packed_savable_params(
            bank_params=bank, slots=slots, num_vectors=n, topk=cfg.topk,
            weights_bits=_bits(weights), bank_bits=_bits(bank_dtype),
        )  # fmt: skip
        if (weights, bank_dtype) != ("float32", "float32"):
            precision = f"weights {weights}, bank {bank_dtype}"
    return AdapterAccount(
        path=str(adapter.folder),
        adapter_name=adapter.name,
        form=adapter.form,
        r=cfg.r,
        num_vectors=n,
        vector_length=length,
        topk=cfg.topk,
        num_modules=len(adapter.modules),
        slots=slots,
        file_bytes=adapter.file_bytes,
        bank_params=bank,
        vblora_params=stored,
        other_params=sum(adapter.specs[k].numel for k in adapter.other_keys),
        full_vblora_params=full,
        topk_vblora_params=topk,
        packed_vblora_params=packed,
        lora_params=lora,
        form_bytes=form_data_bytes(bank_params=bank, slots=slots, num_vectors=n, topk=cfg.topk),
        precision=precision,
        by_module_type=[ModuleTypeCount(t, *v) for t, v in sorted(types.items())],
    )


def _bits(dtype_name: str) -> int:
    return {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8}[dtype_name]
