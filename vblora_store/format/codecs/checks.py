"""What every codec checks while it decodes: numbers in metadata, the memory a file may expand to, weights.

Files come from strangers.  A codec that decodes (the packed and compressed
forms, any form registered later) reads numbers out of JSON metadata, allocates
what they declare, and gives back values at a precision it rounded to.  The
three rules for that live here, once:

- :func:`integer`: a number meant as an integer is a JSON integer (never a
  bool, a float such as ``4.0``, ``1e400`` or ``Infinity``, ``NaN`` or a
  string), within its bounds.
- :func:`check_expansion`: what decoding allocates is bounded by the file that
  backs it, ``MAX_EXPANSION`` times its bytes plus ``EXPANSION_SLACK``
  (:meth:`~vblora_store.format.codecs.base.Codec.decode` runs it before any
  codec decodes a byte); so are the dense factors its modules build, at
  ``FACTOR_EXPANSION`` times (:func:`check_factors`, which reading runs on every form).
- :func:`simplex_problem`: top-k weights are non-negative and each row sums to
  at most 1, up to the rounding of the precision they were stored at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from ...errors import InvalidAdapterError

__all__ = [
    "MAX_EXPANSION",
    "FACTOR_EXPANSION",
    "EXPANSION_SLACK",
    "integer",
    "check_expansion",
    "check_factors",
    "simplex_problem",
]

#: Largest ratio of the bytes decoding allocates to the bytes of the file: a packed file expands at most 24x
#: (1-bit indices to uint8, an int4 bank to float64 with its float32 step), a compressed one's zstd planes at
#: most 3x on real adapters (the mantissa bytes are noise); 64 leaves room for both.
MAX_EXPANSION = 64
#: Bytes any file may expand to whatever its size: a tiny adapter's planes can compress far better than 64x.
EXPANSION_SLACK = 16 << 20
#: Bytes of one dense factor value as the widest builder makes it (float64, ``verify``).
FACTOR_BYTES = 8
#: Largest ratio of the dense factors' float64 bytes to the file's.  A slot builds L float64 values from k
#: indices and k - 1 weights: a Llama2-7B-shaped adapter (N=2048, L=256, r=4, k=2; 80 MB of factors) reaches
#: about 200x packed with an int4 bank and fixed8 weights, but k = 1 stores one index a slot, so PEFT's own
#: top-k form reaches 8·L (one uint8 index builds 8·L bytes: 8192x at L = 1024) and the packed form
#: 64·L / ceil(log2 N).  16384 takes every top-k adapter up to L = 2048 and packed k = 1 ones with N = 64 up
#: to L = 1536; a forged file of few slots and a huge L stays refused.
FACTOR_EXPANSION = 16384
#: The largest integer a metadata field may hold (what a shape or size could ever be).
_LARGEST = (1 << 53) - 1


def integer(
    value: object, what: str, bad: Callable[[str], Exception], *, minimum: int = 0, maximum: int = _LARGEST
) -> int:
    """``value`` if it is a JSON integer in ``[minimum, maximum]`` (at most ``2**53 - 1``), else ``bad(...)``.

    Example:
        >>> integer(3, "index_bits", ValueError)
        3
        >>> integer(6.5, "index_bits", ValueError)
        Traceback (most recent call last):
        ValueError: index_bits is 6.5, not an integer from 0 to 9007199254740991
    """
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise bad(f"{what} is {value!r}, not an integer from {minimum} to {maximum}")
    return value


def check_expansion(
    expanded: int,
    path: Union[str, Path],
    *,
    what: str = "bytes of decoded data",
    ratio: int = MAX_EXPANSION,
    file_bytes: Optional[int] = None,
) -> None:
    """Refuse a file that declares more than it can back: at most ``ratio`` times its bytes plus the slack.

    Args:
        expanded: Bytes the file makes us allocate, computed from its header alone.
        path: The weights file.
        what: What the bytes are, as the message names them.
        ratio: Bytes allowed per byte of the file.
        file_bytes: Its size (default: read from the file system).

    Raises:
        InvalidAdapterError: ``expanded`` exceeds ``ratio * file_bytes + EXPANSION_SLACK``.
    """
    if file_bytes is None:
        file_bytes = Path(path).stat().st_size
    limit = ratio * file_bytes + EXPANSION_SLACK
    if expanded > limit:
        raise InvalidAdapterError(
            f"{path}: declares {expanded:,} {what}, more than its {file_bytes:,} bytes can hold "
            f"(at most {limit:,}: {ratio}x the file plus {EXPANSION_SLACK >> 20} MiB); the file is forged "
            "or damaged, fetch it again."
        )


def check_factors(modules: Iterable, r: int, path: Union[str, Path]) -> None:
    """Refuse a file whose modules' dense factors would outgrow it beyond ``FACTOR_EXPANSION``.

    ``export-lora`` builds every module's A ``(r, in)`` and B ``(out, r)`` (float32), ``verify`` and
    the engine one module's at a time (float64 at most): ``8·r·(in + out)`` bytes summed over the
    modules bounds them all.  A sub-vector slot stores k indices and k - 1 weights but builds L values,
    so a file of few slots and a long L could declare terabytes of factors.
    """
    total = FACTOR_BYTES * r * sum(m.in_features + m.out_features for m in modules)
    check_expansion(total, path, what="bytes of dense factors (float64)", ratio=FACTOR_EXPANSION)


def simplex_problem(weights: torch.Tensor, tolerance: float) -> Optional[str]:
    """What keeps top-k ``weights`` (``(..., k - 1)``) off the simplex beyond ``tolerance``, or ``None``.

    Each weight must be non-negative and finite, and each row's sum at most ``1 + tolerance`` (PEFT
    recovers the last weight as ``1 - sum``).

    Example:
        >>> simplex_problem(torch.tensor([[0.5, 0.4]]), 0.0) is None
        True
        >>> simplex_problem(torch.tensor([[2.0]]), 0.01)
        'has a row summing to 2, above 1 + 0.01'
    """
    if weights.numel() == 0:
        return None
    values = weights.double()
    low, high = torch.aminmax(values)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        return "holds NaN or infinite weights"
    if float(low) < 0:
        return f"holds a negative weight ({float(low):.6g})"
    largest = float(values.sum(-1).max())
    if largest > 1 + tolerance:
        return f"has a row summing to {largest:.6g}, above 1 + {tolerance:.3g}"
    return None
