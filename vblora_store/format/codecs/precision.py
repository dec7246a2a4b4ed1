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

import torch

from ...choices import BankDtype, WeightsDtype
from ...dtypes import by_name
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


def decode_bank(stored: dict[str, torch.Tensor], dtype: BankDtype, shape: tuple[int, int]) -> torch.Tensor:
    """The ``(N, L)`` float32 bank back from :func:`encode_bank`'s tensors."""
    code = stored[BANK]
    if dtype not in _SCALED:
        return code.float()
    if dtype is BankDtype.INT4:
        count = shape[0] * shape[1]
        code = (unpack(code, _INT4_BITS, count) - _INT4_OFFSET).reshape(shape)  # (bytes,) -> (N, L)
    return code.float() * stored[BANK_SCALE].unsqueeze(1)  # (N, L) * (N, 1)


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


def decode_weights(stored: dict[str, torch.Tensor], dtype: WeightsDtype) -> torch.Tensor:
    """The float32 weights back from :func:`encode_weights`'s tensors."""
    code = stored[WEIGHTS]
    if dtype not in _FIXED_BITS:
        return code.float()
    levels = (1 << _FIXED_BITS[dtype]) - 1
    low, high = (float(v) for v in stored[WEIGHTS_RANGE].double())
    span = high - low if high > low else 1.0
    return (low + code.to(torch.float64) / levels * span).float()


def bank_bits(dtype: BankDtype, num_vectors: int, bank_params: int) -> int:
    """Bits the bank takes stored at ``dtype``, scales included."""
    bits = _INT4_BITS if dtype is BankDtype.INT4 else _dtype(dtype).bits
    return bank_params * bits + (32 * num_vectors if dtype in _SCALED else 0)


def weights_bits(dtype: WeightsDtype, count: int) -> int:
    """Bits ``count`` top-k weights take stored at ``dtype`` (the fixed-point range included)."""
    if dtype in _FIXED_BITS:
        return count * _FIXED_BITS[dtype] + 64
    return count * _dtype(dtype).bits
