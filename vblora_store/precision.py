"""Precision chosen by measured error: the smallest bank and weights precision whose ΔW error is within a bound.

``convert(src, dst, to="packed", max_error=X)`` (and ``vblora-store convert
--to packed --max-error X``) tries the packed form's precisions from the
fewest stored bytes in the target form up (the compressed form's estimated at
a quick zstd level); for each, it encodes the adapter, decodes it back and
measures ``verify``'s metric, the largest relative Frobenius error of
``ΔW = B·A`` over every module (computed from rank-2r Gram matrices:
:func:`vblora_store.topk.relative_error`), against the lossless top-k data of the same
adapter; the first within ``X`` is written.  ``max_error=0`` gives the
smallest lossless form.  Works for every form that takes the packed form's
precision options (``packed``, ``compressed``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .choices import BankDtype, WeightsDtype
from .dtypes import name_of
from .errors import UnsupportedConversionError
from .format import StoredAdapter, TensorSpec
from .format import convert as convert_form
from .format.codecs.packed import CODEC as PACKED
from .format.codecs.packed import pack_topk
from .format.keys import BANK_KEY, parse_key
from .format.codecs.packed_metadata import Packing, rounded_from
from .format.codecs.precision import BANK, WEIGHTS, encode_bank, encode_weights
from .format.codecs.topk import CODEC as TOPK
from .factors import module_factors
from .topk import relative_error
from .storage_forms import StorageForm

__all__ = [
    "PrecisionChoice",
    "candidates",
    "lossless_reference",
    "measured_error",
    "choose_precision",
    "convert",
    "convert_choosing",
]

_BANKS = tuple(BankDtype)
_WEIGHTS = tuple(WeightsDtype)


@dataclass(frozen=True)
class PrecisionChoice:
    """What :func:`choose_precision` chose for one adapter, and the error it measured."""

    adapter: str  # "<path> [<name>]"
    bank: BankDtype
    weights: WeightsDtype
    max_rel_error: float
    tried: int  # candidates measured before this one passed, itself included

    def describe(self) -> str:
        return (
            f"{self.adapter}: bank {self.bank.value}, weights {self.weights.value}: max relative ΔW error "
            f"{self.max_rel_error:.3e} ({self.tried} tried)"
        )


def _in_memory(adapter: StoredAdapter, tensors: dict, *, packing=None) -> StoredAdapter:
    """``adapter`` with the top-k ``tensors`` held in memory."""
    config = dataclasses.replace(adapter.config, save_only_topk_weights=True)
    specs = {key: TensorSpec(value.dtype, tuple(value.shape)) for key, value in tensors.items()}
    return StoredAdapter(
        folder=adapter.folder, name=adapter.name, config=config, weights_path=adapter.weights_path,
        form=StorageForm.TOPK, modules=adapter.modules, specs=specs, stored_specs=specs,
        packing=packing, reader=tensors.__getitem__,
    )  # fmt: skip


def lossless_reference(adapter: StoredAdapter) -> StoredAdapter:
    """``adapter``'s top-k data in memory: what every precision is measured against (computed once)."""
    return _in_memory(adapter, TOPK.encode(adapter)[0])


def _pack(reference: StoredAdapter, bank: BankDtype, weights: WeightsDtype):
    cfg = reference.config
    tensors = {key: reference.tensor(key) for key in reference.specs}
    return pack_topk(
        list(reference.modules.values()), tensors, num_vectors=cfg.num_vectors, topk=cfg.topk,
        weights_dtype=weights, bank_dtype=bank,
    )  # fmt: skip


def candidates(
    adapter: StoredAdapter, to: Union[StorageForm, str] = StorageForm.PACKED, *, reference=None
) -> list[tuple[BankDtype, WeightsDtype]]:
    """Every bank and weights precision, the fewest bytes in form ``to`` first (lossless last among equals).

    Example:
        >>> from vblora_store import read_adapter
        >>> candidates(read_adapter("fixtures/tiny-llama-vblora"))[:2]
        [(<BankDtype.INT4: 'int4'>, <WeightsDtype.FIXED8: 'fixed8'>), (<BankDtype.FLOAT8_E4M3: 'float8_e4m3'>, <WeightsDtype.FIXED8: 'fixed8'>)]
    """
    codec = StorageForm(to).codec
    tensors, _ = _pack(reference or lossless_reference(adapter), BankDtype.FLOAT32, WeightsDtype.FLOAT32)
    bank, weights = tensors[BANK].float(), tensors[WEIGHTS].float()
    bank_bytes = {b: codec.stored_bytes(encode_bank(bank, b)) for b in _BANKS}
    weights_bytes = {w: codec.stored_bytes(encode_weights(weights, w)) for w in _WEIGHTS}

    def size(pair):
        b, w = pair
        return bank_bytes[b] + weights_bytes[w], _BANKS.index(b), _WEIGHTS.index(w)

    return sorted(((b, w) for b in _BANKS for w in _WEIGHTS), key=size)


def measured_error(
    adapter: StoredAdapter, bank: BankDtype, weights: WeightsDtype, *, reference=None
) -> float:
    """``verify``'s largest relative ΔW error of ``adapter`` stored at ``(bank, weights)``, against its top-k data."""
    reference = reference or lossless_reference(adapter)
    packed, metadata = _pack(reference, bank, weights)
    decoded = PACKED.unpack(packed, metadata, reference.config, adapter.weights_path)
    candidate = _in_memory(adapter, {k: decoded.reader(k) for k in decoded.specs}, packing=decoded.packing)
    worst, order = 0.0, list(adapter.modules)
    for (_, a_ref, b_ref), (_, a, b) in zip(
        module_factors(reference, order), module_factors(candidate, order)
    ):
        worst = max(worst, relative_error(a_ref, b_ref, a, b))
    return worst


def choose_precision(
    adapter: StoredAdapter, max_error: float, to: Union[StorageForm, str] = StorageForm.PACKED
) -> PrecisionChoice:
    """The smallest precision in form ``to`` whose measured error is at most ``max_error`` (module docstring).

    Raises:
        UnsupportedConversionError: none is within ``max_error`` (only a float64 adapter, which even
            float32 storage rounds, can have none).

    Example:
        >>> from vblora_store import read_adapter
        >>> choose_precision(read_adapter("fixtures/tiny-llama-vblora"), 0.0).bank.value
        'float32'
    """
    reference = lossless_reference(adapter)
    packed = [k for k in reference.specs if k == BANK_KEY or getattr(parse_key(k), "part", "") == "weights"]
    wide = rounded_from(*(name_of(reference.specs[k].dtype) for k in packed))  # float64: float32 rounds it
    best = math.inf
    for tried, (bank, weights) in enumerate(candidates(adapter, to, reference=reference), start=1):
        exact = not Packing(0, weights, bank, wide).lossy
        error = 0.0 if exact else measured_error(adapter, bank, weights, reference=reference)
        if error <= max_error:
            return PrecisionChoice(f"{adapter.folder} [{adapter.name}]", bank, weights, error, tried)
        best = min(best, error)
    raise UnsupportedConversionError(
        f"{adapter.folder} [{adapter.name}]: no precision of the {StorageForm(to).value} form is within "
        f"--max-error {max_error:g} (the closest: {best:.3e}; the adapter is {wide}, stored as float32 at "
        "most); raise --max-error, or keep it exact with --to topk."
    )


def convert_choosing(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    to: Union[StorageForm, str],
    max_error: float,
    _read: Optional[list] = None,
    **options,
) -> list[PrecisionChoice]:
    """:func:`convert` with ``max_error``; returns what was chosen for each adapter.

    Raises:
        UnsupportedConversionError: ``to`` takes no precision options, ``max_error``
            is negative or NaN, or a precision option is given too.
    """
    to = StorageForm(to)
    if not {"weights_dtype", "bank_dtype"} <= set(to.codec.options):
        names = ", ".join(f.value for f in StorageForm if "bank_dtype" in f.codec.options)
        raise UnsupportedConversionError(
            f"{src}: --max-error applies to the forms with a precision ({names}); add --to packed."
        )
    if not max_error >= 0:
        raise UnsupportedConversionError(f"{src}: --max-error must be a number >= 0, got {max_error!r}.")
    if any(options.get(name) is not None for name in ("weights_dtype", "bank_dtype")):
        raise UnsupportedConversionError(
            f"{src}: --max-error chooses --bank-dtype and --weights-dtype itself; give one or the other."
        )
    options = {k: v for k, v in options.items() if k not in ("weights_dtype", "bank_dtype")}
    chosen: list[PrecisionChoice] = []

    def choose(adapter: StoredAdapter) -> dict:
        choice = choose_precision(adapter, max_error, to)
        chosen.append(choice)
        return {"bank_dtype": choice.bank, "weights_dtype": choice.weights}

    adapters = convert_form(src, dst, to=to, precision=choose, **options)
    if _read is not None:
        _read.extend(adapters)
    return chosen


def convert(
    src, dst, *, to=StorageForm.TOPK, max_error: Optional[float] = None, **options
) -> list[StoredAdapter]:
    """:func:`vblora_store.format.convert`, and with ``max_error`` the precision chosen by measured error.

    Example:
        >>> [a.name for a in convert("fixtures/tiny-llama-vblora", tmp / "small", to="packed", max_error=1e-2)]
        ['default']
    """
    if max_error is None:
        return convert_form(src, dst, to=to, **options)
    read: list[StoredAdapter] = []
    convert_choosing(src, dst, to=to, max_error=max_error, _read=read, **options)
    return read
