"""The Triton kernel behind :func:`vblora_store.engine.batched.add_lora` on CUDA (decode).

One launch per layer does shrink, expand and the addition for every token
(BGMV: each token may use another adapter).  A program takes one token and a
range of output columns:

1. it loads its row's slot and that slot's rank (rank 0: copy the base output);
2. shrink: ``y = A[slot] @ x[token]`` in float32, reading ``A[slot]`` (R, in)
   where it lies, in ``BLOCK_K`` columns at a time;
3. expand: for each ``BLOCK_N`` columns of its range, ``out = result + y @ Bt[slot]``,
   accumulated in float32 and rounded once to the output dtype.

Each program recomputes the (small) shrink; the grid gives every token enough
column ranges to fill the GPU (``TARGET_PROGRAMS``), so those re-reads of A
come from L2 and the launch costs about what reading each row's factors once
does.  Importing this module needs Triton; nothing else in the package does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_lora_kernel", "launch_config", "TARGET_PROGRAMS", "BLOCK_K", "BLOCK_N"]

TARGET_PROGRAMS = 528  # about four programs per multiprocessor of an H100/H200 (132)
BLOCK_K = 512
BLOCK_N = 256


@triton.jit
def _add_lora(
    X, RESULT, OUT, A, BT, RANKS, SLOTS,
    tokens_per_row, in_features, out_features, columns_per_program,
    stride_x, stride_result, stride_out, stride_a_slot, stride_a_rank, stride_bt_slot, stride_bt_rank,
    R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    first_column = tl.program_id(1) * columns_per_program
    slot = tl.load(SLOTS + token // tokens_per_row).to(tl.int64)
    rank = tl.load(RANKS + slot)
    result_row = RESULT + token.to(tl.int64) * stride_result
    out_row = OUT + token.to(tl.int64) * stride_out
    offs_r = tl.arange(0, R)
    if rank > 0:
        x_row = X + token.to(tl.int64) * stride_x
        a_slot = A + slot * stride_a_slot
        r_mask = offs_r < rank
        y = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xk = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = tl.load(
                a_slot + offs_r[:, None] * stride_a_rank + offs_k[None, :],
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            ).to(
                tl.float32
            )  # (R, BLOCK_K)
            y += tl.sum(a * xk[None, :], axis=1)  # (R, BLOCK_K) -> (R,)
        bt_slot = BT + slot * stride_bt_slot
        for n0 in range(first_column, first_column + columns_per_program, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < out_features
            bt = tl.load(
                bt_slot + offs_r[:, None] * stride_bt_rank + offs_n[None, :],
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            ).to(
                tl.float32
            )  # (R, BLOCK_N)
            delta = tl.sum(bt * y[:, None], axis=0)  # (R, BLOCK_N) -> (BLOCK_N,)
            base = tl.load(result_row + offs_n, mask=n_mask, other=0.0)
            tl.store(out_row + offs_n, (base.to(tl.float32) + delta).to(base.dtype), mask=n_mask)
    else:
        for n0 in range(first_column, first_column + columns_per_program, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < out_features
            tl.store(out_row + offs_n, tl.load(result_row + offs_n, mask=n_mask), mask=n_mask)


def launch_config(
    tokens: int, out_features: int, *, target_programs: int = TARGET_PROGRAMS
) -> tuple[int, int]:
    """``(column ranges per token, columns per program)``: enough programs to fill the GPU.

    Example:
        >>> launch_config(64, 4096)  # 64 tokens x 8 ranges of 512 columns = 512 programs
        (8, 512)
    """
    blocks = triton.cdiv(out_features, BLOCK_N)
    parts = max(1, min(blocks, triton.cdiv(target_programs, max(1, tokens))))
    per_program = triton.cdiv(blocks, parts) * BLOCK_N
    return triton.cdiv(out_features, per_program), per_program


def add_lora_kernel(
    x: torch.Tensor,
    result: torch.Tensor,
    stack_a: torch.Tensor,
    stack_bt: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """:func:`~vblora_store.engine.batched.add_lora` in one Triton launch (same arguments and result).

    With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernel
    runs on CPU tensors in Triton's interpreter: that is how the tests check it.
    """
    rows, in_features, out_features = x.shape[0], x.shape[-1], result.shape[-1]
    x2 = x.reshape(-1, in_features)  # (rows, ..., in) -> (tokens, in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    result2 = result.reshape(-1, out_features)  # (rows, ..., out) -> (tokens, out)
    if result2.stride(-1) != 1:
        result2 = result2.contiguous()
    tokens = x2.shape[0]
    out = torch.empty_like(result2)
    if tokens == 0:
        return out.reshape(result.shape)
    if stack_a.stride(-1) != 1 or stack_bt.stride(-1) != 1:
        raise ValueError("factor stacks must be contiguous in their last dimension")
    parts, per_program = launch_config(tokens, out_features)
    rank_block = max(2, triton.next_power_of_2(stack_a.shape[1]))
    _add_lora[(tokens, parts)](
        x2, result2, out, stack_a, stack_bt, ranks, slots,
        tokens // rows, in_features, out_features, per_program,
        x2.stride(0), result2.stride(0), out.stride(0),
        stack_a.stride(0), stack_a.stride(1), stack_bt.stride(0), stack_bt.stride(1),
        R=rank_block, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out.reshape(result.shape)  # (tokens, out) -> (rows, ..., out)
