"""How the packed form stores the bank and the top-k weights at each precision: pure encode/decode pairs.

Bank (``(N, L)``), by :class:`~vblora_store.choices.BankDtype`::

    float32, float16, bfloat16   the values, cast
    float8_e4m3                  v / s_n in float8 (e4m3), s_n = max|v_n| / 448; scales float32 (N,)
    int8                         round(v / s_n) in [-127, 127], s_n = max|v_n| / 127; scales float32 (N,)
    int4                         round(v / s_n) in [-7, 7], s_n = max|v_n| / 7, stored + 8 as 4-bit
                                 values two to a byte (bitpack), uint8 (ceil(N·L / 2),); scales (N,)

Weights (``(S, k - 1)``, each in ``[0, 1]``), by :class:`~vblora_store.choices.WeightsDtype`::

    float32, float16, bfloat16   the values, cast
    fixed16, fixed8              round((w - lo) / (hi - lo) · (2^b - 1)) in uint16 / uint8, where
                                 lo, hi = the smallest and largest stored weight, kept float32 (2,)

Every scale is one per bank vector (an all-zero vector gets scale 1).  Decoding
gives float32, which the packed form casts back to the dtype the file was
converted from.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...choices import BankDtype, WeightsDtype
from ...dtypes import by_name
from ...errors import InvalidAdapterError
from ..bitpack import pack, packed_size, unpack

__all__ = [
    "BANK",
    "BANK_SCALE",
    "WEIGHTS",
    "WEIGHTS_RANGE",
    "bank_layout",
    "weights_layout",
    "encode_bank",
    "decode_bank",
    "encode_weights",
    "decode_weights",
    "weights_tolerance",
    "bank_bits",
    "weights_bits",
]

BANK = "vblora_packed.bank"
BANK_SCALE = "vblora_packed.bank_scale"
WEIGHTS = "vblora_packed.weights"
WEIGHTS_RANGE = "vblora_packed.weights_range"

#: Scaled bank codes: the largest magnitude each maps a vector's max|v| to, and its stored dtype.
_SCALED = {
    BankDtype.INT8: (127, torch.int8),
    BankDtype.INT4: (7, torch.uint8),
    BankDtype.FLOAT8_E4M3: (448, None),
}
_FIXED_BITS = {WeightsDtype.FIXED16: 16, WeightsDtype.FIXED8: 8}
#: One rounding of a weight in ``[0, 1]`` stored at each precision (its spacing just below 1).
_ROUNDING = {
    WeightsDtype.FLOAT32: 2.0**-24,
    WeightsDtype.FLOAT16: 2.0**-11,
    WeightsDtype.BFLOAT16: 2.0**-8,
    WeightsDtype.FIXED16: 1 / 65535,
    WeightsDtype.FIXED8: 1 / 255,
}


def _dtype(choice):
    """The :class:`~vblora_store.dtypes.DType` a float or int choice is stored in: its word names it."""
    return by_name(choice.value)


_INT4_OFFSET, _INT4_BITS = 8, 4


def bank_layout(
    dtype: BankDtype, num_vectors: int, vector_length: int
) -> dict[str, tuple[torch.dtype, tuple]]:
    """The stored tensors of a bank at ``dtype``: ``{key: (dtype, shape)}``.

    Example:
        >>> sorted(bank_layout(BankDtype.INT4, 3, 5).items())
        [('vblora_packed.bank', (torch.uint8, (8,))), ('vblora_packed.bank_scale', (torch.float32, (3,)))]
    """
    shape = (num_vectors, vector_length)
    if dtype is BankDtype.INT4:
        layout = {BANK: (torch.uint8, (packed_size(num_vectors * vector_length, _INT4_BITS),))}
    else:
        layout = {BANK: (_dtype(dtype).torch, shape)}
    if dtype in _SCALED:
        layout[BANK_SCALE] = (torch.float32, (num_vectors,))
    return layout


def weights_layout(dtype: WeightsDtype, slots: int, topk: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """The stored tensors of the weights at ``dtype``: ``{key: (dtype, shape)}``."""
    if dtype in _FIXED_BITS:
        stored = torch.uint16 if _FIXED_BITS[dtype] == 16 else torch.uint8
        return {WEIGHTS: (stored, (slots, topk - 1)), WEIGHTS_RANGE: (torch.float32, (2,))}
    return {WEIGHTS: (_dtype(dtype).torch, (slots, topk - 1))}


def encode_bank(bank: torch.Tensor, dtype: BankDtype) -> dict[str, torch.Tensor]:
    """The stored tensors of ``bank`` ``(N, L)`` at ``dtype`` (see the module docstring)."""
    if dtype not in _SCALED:
        return {BANK: bank.to(_dtype(dtype).torch)}
    top, stored = _SCALED[dtype]
    values = bank.float()
    scale = values.abs().amax(dim=1) / top  # (N, L) -> (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = values / scale.unsqueeze(1)  # (N, L) / (N, 1)
    if dtype is BankDtype.FLOAT8_E4M3:
        code = scaled.clamp(-top, top).to(torch.float8_e4m3fn)
    else:
        code = torch.round(scaled).clamp(-top, top)
        if dtype is BankDtype.INT4:
            code = pack((code + _INT4_OFFSET).to(torch.int64), _INT4_BITS)  # (N, L) -> (ceil(N·L/2),)
        code = code.to(stored)
    return {BANK: code, BANK_SCALE: scale}


def decode_bank(
    stored: dict[str, torch.Tensor],
    dtype: BankDtype,
    shape: tuple[int, int],
    *,
    bad: Callable = InvalidAdapterError,
) -> torch.Tensor:
    """The ``(N, L)`` float32 bank back from :func:`encode_bank`'s tensors, every stored value checked.

    Raises:
        ``bad(message)`` (default :class:`InvalidAdapterError`): a code outside what :func:`encode_bank`
        writes (int8 -128, int4 0, float8 NaN), a scale not finite and positive, a float value not finite.
    """
    code = stored[BANK]
    if dtype not in _SCALED:
        return _finite(code.float(), "the bank", bad)
    scale = stored[BANK_SCALE]
    if scale.numel() and not (float(scale.min()) > 0 and bool(torch.isfinite(scale).all())):
        raise bad("the bank's scales are not all finite and positive")
    top, _ = _SCALED[dtype]
    if dtype is BankDtype.INT4:
        count = shape[0] * shape[1]
        code = (unpack(code, _INT4_BITS, count) - _INT4_OFFSET).reshape(shape)  # (bytes,) -> (N, L)
    values = _finite(code.float(), "the bank's codes", bad)
    if values.numel() and float(values.abs().max()) > top:
        raise bad(f"the {dtype.value} bank holds a code outside [-{top}, {top}]")
    return values * scale.unsqueeze(1)  # (N, L) * (N, 1)


def _finite(values: torch.Tensor, what: str, bad: Callable) -> torch.Tensor:
    """``values`` if every one is finite (one ``aminmax`` pass: NaN and infinities reach its bounds)."""
    if values.numel():
        low, high = torch.aminmax(values)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise bad(f"{what} holds NaN or infinite values")
    return values


def encode_weights(weights: torch.Tensor, dtype: WeightsDtype) -> dict[str, torch.Tensor]:
    """The stored tensors of the top-k weights ``(S, k - 1)`` at ``dtype``."""
    if dtype not in _FIXED_BITS:
        return {WEIGHTS: weights.to(_dtype(dtype).torch)}
    levels = (1 << _FIXED_BITS[dtype]) - 1
    values = weights.double()
    ends = [float(values.min()), float(values.max())] if values.numel() else [0.0, 1.0]
    ends = torch.tensor(ends, dtype=torch.float32)  # (2,): stored as float32, so coded against those values
    low, high = (float(v) for v in ends.double())
    span = high - low if high > low else 1.0
    code = torch.round((values - low) / span * levels).clamp(0, levels)
    stored = torch.uint16 if levels > 255 else torch.uint8
    return {WEIGHTS: code.to(torch.int32).to(stored), WEIGHTS_RANGE: ends}


def decode_weights(
    stored: dict[str, torch.Tensor], dtype: WeightsDtype, *, bad: Callable = InvalidAdapterError
) -> torch.Tensor:
    """The float32 weights back from :func:`encode_weights`'s tensors, the fixed-point range checked.

    Raises:
        ``bad(message)`` (default :class:`InvalidAdapterError`): a range that is not finite with ``0 <= lo <= hi <= 1``,
        or, for equal ends, a code other than 0 (the encoder writes no other).
    """
    code = stored[WEIGHTS]
    if dtype not in _FIXED_BITS:
        return code.float()
    levels = (1 << _FIXED_BITS[dtype]) - 1
    low, high = (float(v) for v in stored[WEIGHTS_RANGE].double())
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high <= 1):
        raise bad(f"weights_range is [{low:g}, {high:g}], not finite with 0 <= lo <= hi <= 1")
    if high == low and code.numel() and int(code.to(torch.int32).max()) != 0:
        raise bad("the weights' range is a single value but a code is not 0")
    span = high - low if high > low else 1.0
    return (low + code.to(torch.float64) / levels * span).float()


def weights_tolerance(dtype: WeightsDtype, topk: int) -> float:
    """How far above 1 a row of ``k - 1`` weights stored at ``dtype`` may sum: ``(k - 1)`` times one rounding.

    One rounding is the spacing of the stored values just below 1 (:data:`_ROUNDING`): float32 2^-24,
    float16 2^-11, bfloat16 2^-8, fixed16 1/65535, fixed8 1/255 (the range's whole span at most).

    Example:
        >>> weights_tolerance(WeightsDtype.FIXED8, 3) == 2 / 255
        True
    """
    return max(topk - 1, 0) * _ROUNDING[dtype]


def bank_bits(dtype: BankDtype, num_vectors: int, bank_params: int) -> int:
    """Bits the bank takes stored at ``dtype``, scales included."""
    bits = _INT4_BITS if dtype is BankDtype.INT4 else _dtype(dtype).bits
    return bank_params * bits + (32 * num_vectors if dtype in _SCALED else 0)


def weights_bits(dtype: WeightsDtype, count: int) -> int:
    """Bits ``count`` top-k weights take stored at ``dtype`` (the fixed-point range included)."""
    if dtype in _FIXED_BITS:
        return count * _FIXED_BITS[dtype] + 64
    return count * _dtype(dtype).bits
