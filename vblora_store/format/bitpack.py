"""Bit packing of small unsigned integers into a uint8 stream, and back.

Layout: value ``i`` occupies stream bits ``[i·b, (i+1)·b)``, least significant
bit first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.  The last byte
is padded with zero bits.  Example with ``b = 3`` and values ``[5, 2, 7]``::

    5 = 101, 2 = 010, 7 = 111        (written most significant bit first)
    stream bits, LSB first:  1 0 1 | 0 1 0 | 1 1 1 | 0 0 0 0 0 0 0
    byte 0 = bits 0..7  = 1,0,1,0,1,0,1,1  -> 0b11010101 = 0xd5
    byte 1 = bits 8..15 = 1,0,0,0,0,0,0,0  -> 0b00000001 = 0x01

so ``pack(tensor([5, 2, 7]), bits=3)`` is ``tensor([0xd5, 0x01], dtype=uint8)``.
"""

from __future__ import annotations

import torch

__all__ = ["BYTE_BITS", "bits_for", "packed_size", "pack", "unpack"]

BYTE_BITS = 8
_CHUNK = 1 << 20  # values per step, so memory stays O(chunk · bits)


def bits_for(num_values: int) -> int:
    """Bits needed for integers in ``[0, num_values)``: ``ceil(log2 num_values)``, at least 1.

    Example:
        >>> bits_for(2048), bits_for(2049), bits_for(1)
        (11, 12, 1)
    """
    return max(1, (num_values - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ``ceil(count · bits / 8)``."""
    return (count * bits + BYTE_BITS - 1) // BYTE_BITS


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a 1-D uint8 tensor.

    Args:
        values: Integers of any integer dtype and shape (flattened in row-major order).
        bits: Width of each value, 1 to 32.

    Returns:
        ``(packed_size(values.numel(), bits),)`` uint8.

    Raises:
        ValueError: a value is negative or does not fit in ``bits``.

    Example:
        >>> pack(torch.tensor([5, 2, 7]), 3).tolist()
        [213, 1]
    """
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.int64)  # (...) -> (n,)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits}) to pack at {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = torch.empty(flat.numel() * bits, dtype=torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        bit_rows = ((chunk.unsqueeze(1) >> shifts) & 1).to(torch.uint8)  # (c,) -> (c, bits)
        stream[start * bits : (start + chunk.numel()) * bits] = bit_rows.reshape(-1)  # (c, bits) -> (c·bits,)
    padded = torch.zeros(packed_size(flat.numel(), bits) * BYTE_BITS, dtype=torch.uint8)
    padded[: stream.numel()] = stream
    byte_rows = padded.reshape(-1, BYTE_BITS).to(torch.int64)  # (n·bits + pad,) -> (bytes, 8)
    weights = 1 << torch.arange(BYTE_BITS, dtype=torch.int64)
    return (byte_rows * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` values of ``bits`` bits.

    Args:
        packed: 1-D uint8 stream from :func:`pack`.
        bits: Width of each value, 1 to 32.
        count: How many values to read.

    Returns:
        ``(count,)`` int64.

    Raises:
        ValueError: ``packed`` is too short for ``count`` values.

    Example:
        >>> unpack(torch.tensor([213, 1], dtype=torch.uint8), 3, 3).tolist()
        [5, 2, 7]
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() < packed_size(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits")
    byte_shifts = torch.arange(BYTE_BITS, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    out = torch.empty(count, dtype=torch.int64)
    step = _CHUNK - _CHUNK % BYTE_BITS  # whole bytes per chunk
    for start in range(0, count, step):
        n = min(step, count - start)
        first_bit, last_bit = start * bits, (start + n) * bits
        raw = packed[first_bit // BYTE_BITS : packed_size(start + n, bits)]
        stream = ((raw.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)  # (bytes,) -> (bytes, 8) -> (bytes·8,)
        offset = first_bit % BYTE_BITS
        bit_rows = (
            stream[offset : offset + last_bit - first_bit].reshape(n, bits).to(torch.int64)
        )  # (n, bits)
        out[start : start + n] = (bit_rows << shifts).sum(1)
    return out


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer from 1 to 32, got {bits!r}")
