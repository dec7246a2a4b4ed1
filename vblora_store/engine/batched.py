"""Many adapters in one batch: each row of the batch through its own adapter's factors.

The factors of every adapter a layer serves sit stacked in two tensors, one slot
per adapter, and each row of the batch carries the slot of its adapter::

    stack_a   (slots, R, in)     A of the adapter in each slot, rank padded with zeros to R
    stack_bt  (slots, R, out)    B transposed, likewise
    ranks     (slots,) int32     the rank actually stored in each slot (0: the slot adds nothing)
    slots     (rows,)  int64     the slot of each row; slot 0 always holds zeros (no adapter)

Two pure operations, as in Punica and S-LoRA: :func:`shrink` (each token times
its row's A: ``(tokens, in) -> (tokens, R)``) and :func:`expand` (times its
row's B, added into the output: ``(tokens, R) -> (tokens, out)``).
:func:`add_lora` is both, added to the base layer's output; it picks the
implementation:

* in a compiled model on CUDA, for decode-sized inputs (a few tokens per row),
  Triton kernels (:mod:`.triton_kernels`) that read each row's factors in
  place, never copying them;
* otherwise the reference below, written with torch ops: gather each row's
  factors once (``index_select``) and apply them with two batched products,
  which is also the CPU path, the eager path (see :data:`KERNEL_IN_EAGER`) and
  what the kernels are tested against.

Neither the cost nor the shapes depend on how many distinct adapters the
batch holds, so a CUDA graph captured once serves any mix.  Under
``torch.compile`` the kernel is a ``torch.library.triton_op``
(``vblora_store::add_lora``) that the compiled graph launches directly, and the
reference is plain torch ops, so the adapter layers never break the graph.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "shrink",
    "expand",
    "add_lora_reference",
    "add_lora",
    "triton_available",
    "load_kernels",
    "DECODE_TOKENS_PER_ROW",
    "KERNEL_IN_EAGER",
]

#: Rows of at most this many tokens take the in-place kernel on CUDA; longer rows (prefill) gather.
DECODE_TOKENS_PER_ROW = 4
#: Whether eager (uncompiled) calls take the kernel too.  No: an eager decode step is bound by the
#: host's launch overhead, and two Triton launches cost more of it than the four torch ops of the
#: reference (H200, 8 Llama2-7B-shaped layers, batch 64 over 64 adapters: 12.4 ms against 10.5 ms).
#: Under CUDA graphs the kernel wins (4-6 us a layer against 13-18 us).
KERNEL_IN_EAGER = False


def shrink(x: torch.Tensor, stack_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row's tokens times its adapter's A (reference implementation).

    Args:
        x: ``(rows, tokens, in)``.
        stack_a: ``(slots, R, in)``.
        slots: ``(rows,)`` integer slot of each row.

    Returns:
        ``(rows, tokens, R)`` in the dtype of ``x``.

    Example:
        >>> stack_a = torch.stack([torch.zeros(1, 2), torch.tensor([[1.0, 2.0]])])  # slot 0 is zero
        >>> shrink(torch.ones(2, 1, 2), stack_a, torch.tensor([1, 0])).flatten().tolist()
        [3.0, 0.0]
    """
    a = stack_a.index_select(0, slots).to(x.dtype)  # (slots, R, in) -> (rows, R, in)
    return torch.bmm(x, a.transpose(1, 2))  # (rows, tokens, in) @ (rows, in, R) -> (rows, tokens, R)


def expand(y: torch.Tensor, stack_bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row's shrunk tokens times its adapter's B (reference implementation).

    Args:
        y: ``(rows, tokens, R)`` from :func:`shrink`.
        stack_bt: ``(slots, R, out)``.
        slots: ``(rows,)``.

    Returns:
        ``(rows, tokens, out)``: the adapters' contribution to the output.
    """
    bt = stack_bt.index_select(0, slots).to(y.dtype)  # (slots, R, out) -> (rows, R, out)
    return torch.bmm(y, bt)  # (rows, tokens, R) @ (rows, R, out) -> (rows, tokens, out)


def add_lora_reference(
    x: torch.Tensor,
    result: torch.Tensor,
    stack_a: torch.Tensor,
    stack_bt: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """``result + expand(shrink(x))`` with torch ops: the CPU path and the kernel's reference.

    Args:
        x: ``(rows, ..., in)``, the layer's input (batch first).
        result: ``(rows, ..., out)``, the base layer's output.
        stack_a, stack_bt, slots: See the module docstring.

    Returns:
        A new tensor shaped like ``result``.
    """
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])  # (rows, ..., in) -> (rows, tokens, in)
    delta = expand(shrink(x3, stack_a, slots), stack_bt, slots)  # (rows, tokens, out)
    return result + delta.reshape(result.shape).to(result.dtype)  # (rows, tokens, out) -> (rows, ..., out)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (the CUDA kernel needs it; every other path does not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_kernels = None  # vblora_store.engine.triton_kernels, once a CUDA call has loaded it


def load_kernels():
    """Import the Triton kernels (registering their compiled op); ``None`` without Triton."""
    global _kernels
    if _kernels is None and triton_available():
        from . import triton_kernels

        _kernels = triton_kernels
    return _kernels


def _tokens_per_row(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[0] * x.shape[-1])


def add_lora(
    x: torch.Tensor,
    result: torch.Tensor,
    stack_a: torch.Tensor,
    stack_bt: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """The base output plus each row's own adapter: ``result + x @ A[slot].T @ B[slot].T`` row by row.

    Args:
        x: ``(rows, ..., in)``, batch first.
        result: ``(rows, ..., out)``, the base layer's output for ``x``.
        stack_a: ``(slots, R, in)``.
        stack_bt: ``(slots, R, out)``.
        ranks: ``(slots,)`` int32, the rank stored in each slot.
        slots: ``(rows,)`` int64, each row's slot (0: no adapter).

    Returns:
        A new tensor shaped and typed like ``result``.

    Example:
        >>> stack_a = torch.zeros(2, 1, 2); stack_a[1] = torch.tensor([[1.0, 1.0]])
        >>> stack_bt = torch.zeros(2, 1, 3); stack_bt[1] = torch.tensor([[1.0, 2.0, 3.0]])
        >>> out = add_lora(torch.ones(2, 1, 2), torch.zeros(2, 1, 3), stack_a, stack_bt,
        ...                torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 0]))
        >>> out.squeeze(1).tolist()
        [[2.0, 4.0, 6.0], [0.0, 0.0, 0.0]]
    """
    decode = x.is_cuda and _tokens_per_row(x) <= DECODE_TOKENS_PER_ROW
    if torch.compiler.is_compiling():
        if decode and _kernels is not None:  # loaded by the route, outside the graph
            return torch.ops.vblora_store.add_lora(x, result, stack_a, stack_bt, ranks, slots)
        return add_lora_reference(x, result, stack_a, stack_bt, slots)
    if decode and KERNEL_IN_EAGER and load_kernels() is not None:
        return _kernels.add_lora_kernel(x, result, stack_a, stack_bt, ranks, slots)
    return add_lora_reference(x, result, stack_a, stack_bt, slots)
