"""The VB-LoRA arithmetic, as pure functions over tensors.

Each sub-vector of a LoRA factor is a mix of ``k`` bank vectors::

    sub_vector = sum_j  w_j * bank[i_j]        w = softmax(top-k logits)

A (r, in) is built from ``(r, in/L)`` sub-vectors and B (out, r) from
``(out/L, r)`` sub-vectors; the update is ``ΔW = B @ A`` with no scaling.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "mix_weights",
    "select_topk",
    "complete_weights",
    "compose",
    "subvector_factors",
    "lora_factors",
    "delta_weight",
    "relative_error",
]


def mix_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k indices and their softmax weights, as PEFT's forward computes them.

    Args:
        logits: ``(..., N)`` logits.
        k: How many vectors each sub-vector mixes.

    Returns:
        ``(indices, weights)``, both ``(..., k)``: int64 indices in descending
        logit order and the complete softmax weights, differentiable.

    Example:
        >>> i, w = mix_weights(torch.tensor([0.0, 2.0, 1.0]), 2)
        >>> i.tolist(), [round(x, 4) for x in w.tolist()]
        ([1, 2], [0.7311, 0.2689])
    """
    top, indices = logits.topk(k)
    return indices, torch.softmax(top, dim=-1)


def select_topk(logits: torch.Tensor, k: int, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's top-k form of a logits tensor.

    Args:
        logits: ``(..., N)`` logits.
        k: How many vectors to keep.
        index_dtype: The dtype the indices are stored in (``keys.index_dtype``).

    Returns:
        ``(indices, weights)``: ``(..., k)`` indices in ``index_dtype`` and the
        ``(..., k - 1)`` softmax weights of the top-k logits without the last
        one, exactly as PEFT computes them.

    Example:
        >>> i, w = select_topk(torch.tensor([[[0.0, 2.0, 1.0]]]), 2, torch.uint8)
        >>> i.tolist(), [round(x, 4) for x in w.flatten().tolist()]
        ([[[1, 2]]], [0.7311])
    """
    indices, weights = mix_weights(logits, k)
    return indices.to(dtype=index_dtype), weights[..., :-1].contiguous()


def complete_weights(weights: torch.Tensor) -> torch.Tensor:
    """Append the dropped last weight, ``1 - sum(others)``: ``(..., k-1) -> (..., k)``.

    The last weight is clamped at zero: rounding (or a lossy packed form) can
    make the stored weights sum past one, and a negative weight would flip a
    bank vector's sign.
    """
    last = (1 - weights.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([weights, last], dim=-1)


def compose(indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Mix bank vectors into sub-vectors.

    Args:
        indices: ``(..., k)`` bank rows, any integer dtype.
        weights: ``(..., k)`` mixing weights (complete, summing to one).
        bank: ``(N, L)`` vector bank.

    Returns:
        ``(..., L)`` sub-vectors in the dtype of ``weights`` and ``bank`` promoted.
    """
    rows = torch.index_select(bank, 0, indices.reshape(-1).long())  # (..., k) -> (n·k, L)
    vectors = rows.view(*indices.shape, bank.shape[-1])  # (n·k, L) -> (..., k, L)
    differentiable = torch.is_grad_enabled() and (weights.requires_grad or bank.requires_grad)
    if weights.dtype == bank.dtype and not differentiable:  # weigh the gathered rows where they are
        products = vectors.mul_(weights.unsqueeze(-1))
    else:
        products = weights.unsqueeze(-1) * vectors
    if indices.shape[-1] == 2:  # the same sum, 3x faster: torch's sum adds from +0, so -0 + -0 gives +0 too
        return torch.add(products[..., 0, :], products[..., 1, :]).add_(0.0)
    return products.sum(-2)  # (..., k, L) -> (..., L)


def subvector_factors(sub_a: torch.Tensor, sub_b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense factors of one module from its composed sub-vectors: the layout of A and B.

    Args:
        sub_a: Side A's sub-vectors, ``(r, in/L, L)``, or flat ``(r·in/L, L)`` row-major over ``(r, in/L)``.
        sub_b: Side B's, ``(out/L, r, L)``, or flat ``(out/L·r, L)`` row-major over ``(out/L, r)``.
        r: The rank.

    Returns:
        ``(A, B)`` with A ``(r, in)`` (each row its sub-vectors end to end)
        and B ``(out, r)`` (each column its sub-vectors end to end).

    Example:
        >>> a, b = subvector_factors(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0]]), 1)
        >>> a.tolist(), b.tolist()
        ([[1.0, 2.0, 3.0, 4.0]], [[5.0], [6.0]])
    """
    a = sub_a.reshape(r, -1)  # (r, in/L, L) or (r·in/L, L) -> (r, in)
    b_sub = sub_b.reshape(-1, r, sub_b.shape[-1])  # (out/L·r, L) -> (out/L, r, L)
    b = b_sub.transpose(1, 2).reshape(-1, r)  # (out/L, r, L) -> (out/L, L, r) -> (out, r)
    return a, b


def lora_factors(
    a_indices: torch.Tensor,
    a_weights: torch.Tensor,
    b_indices: torch.Tensor,
    b_weights: torch.Tensor,
    bank: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense factors of one module from complete top-k weights.

    Args:
        a_indices, a_weights: ``(r, in/L, k)``.
        b_indices, b_weights: ``(out/L, r, k)``.
        bank: ``(N, L)``.

    Returns:
        ``(A, B)`` with A ``(r, in)`` and B ``(out, r)``.
    """
    sub_a = compose(a_indices, a_weights, bank)  # (r, in/L, k) -> (r, in/L, L)
    sub_b = compose(b_indices, b_weights, bank)  # (out/L, r, k) -> (out/L, r, L)
    return subvector_factors(sub_a, sub_b, a_indices.shape[0])


def delta_weight(a: torch.Tensor, b: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``ΔW = B @ A``: ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out``."""
    delta = b @ a  # (out, r) @ (r, in) -> (out, in)
    return delta.T if fan_in_fan_out else delta  # (out, in) -> (in, out) for Conv1D


def relative_error(a_ref, b_ref, a, b, *, diff_norm: Optional[float] = None) -> float:
    """The metric of ``verify`` and ``--max-error``: ``||B·A - B_ref·A_ref||_F / ||B_ref·A_ref||_F``.

    ``ΔW - ΔW_ref = [B, -B_ref] @ [A; A_ref]``, and the Frobenius norm of a
    product ``P @ Q`` is ``sqrt(sum((PᵀP) * (QQᵀ)))``: ``(2r, 2r)`` matrices,
    never ``(out, in)`` (a 7B-shaped adapter: 224 modules in a second, not half
    a minute).  In float64 that resolves relative errors down to about 1e-7;
    ``verify``, which builds the ``(out, in)`` difference anyway (block by block)
    for its largest absolute error, passes its norm as ``diff_norm``, exact.

    Args:
        a_ref, b_ref: The reference's factors, ``(r, in)`` and ``(out, r)``.
        a, b: The candidate's, same shapes (any rank).
        diff_norm: The Frobenius norm of ``B·A - B_ref·A_ref`` if already measured.

    Returns:
        The relative error (from the Gram matrices, rounded to 12 decimals); 0 for two zero updates, ``inf``
        against a zero reference.

    Example:
        >>> a, b = torch.ones(1, 3, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
        >>> relative_error(a, b, 1.1 * a, b)
        0.1
    """
    norm = float(((b_ref.T @ b_ref) * (a_ref @ a_ref.T)).sum().clamp(min=0).sqrt())  # (r, r) * (r, r)
    if diff_norm is None:
        p, q = torch.cat([b, -b_ref], dim=1), torch.cat([a, a_ref], dim=0)  # (out, 2r), (2r, in)
        difference = float(((p.T @ p) * (q @ q.T)).sum().clamp(min=0).sqrt())  # (2r, 2r) * (2r, 2r)
        digits = 12  # below that, the Gram matrices' cancellation is noise
    else:
        difference, digits = diff_norm, None  # exact to float64's rounding
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm if digits is None else round(difference / norm, digits)
