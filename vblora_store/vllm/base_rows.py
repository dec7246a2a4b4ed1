"""Mend vLLM's CPU LoRA ops so a request without an adapter gets none.

vLLM marks each token's LoRA slot in an index tensor, ``-1`` for a request
without an adapter.  Its PyTorch ops (``vllm/lora/ops/torch_ops``, what the CPU
backend runs) select ``weights[indices]``, and ``weights[-1]`` is the *last*
slot: in a batch mixing adapter and base requests, every base row gets
whatever adapter sits in the last slot, once that slot has ever been filled.
That is a silent wrong answer, with or without VB-LoRA.

:func:`install` wraps the three token-wise ops (shrink, expand, expand-slice;
the segment ops call them) so that the rows marked ``-1`` enter them as zeros:
their LoRA product is exactly zero, whatever sits in any slot, and the rows of
adapter requests are computed as before.  The GPU kernels skip ``-1`` rows
themselves and are left alone.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["without_base_rows", "install"]

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def without_base_rows(op: Callable) -> Callable:
    """``op(inputs, weights, output, indices, ...)`` with the rows whose index is negative zeroed first.

    Example:
        >>> pick = lambda x, w, out, idx: out.copy_(torch.einsum("bi,boi->bo", x, w[idx]))
        >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # (slots=2, out=2, in=2)
        >>> out = torch.zeros(2, 2)
        >>> without_base_rows(pick)(torch.ones(2, 2), w, out, torch.tensor([0, -1])).tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """

    @functools.wraps(op)
    def mended(inputs, weights, output, indices, *args, **kwargs):
        base = indices < 0
        if bool(base.any()) and inputs.shape[0] == indices.shape[0]:
            inputs = inputs.masked_fill(base.unsqueeze(-1), 0)  # (tokens, in): base rows -> 0
        return op(inputs, weights, output, indices, *args, **kwargs)

    mended.vblora_mended = True
    return mended


def install() -> None:
    """Wrap the ops where vLLM's torch ops module and its CPU punica wrapper look them up."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, torch_ops, punica_cpu):
        for name in _OPS:
            op = getattr(module, name, None)
            if op is not None and not getattr(op, "vblora_mended", False):
                setattr(module, name, without_base_rows(op))
