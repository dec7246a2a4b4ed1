"""The Triton kernels behind :func:`vblora_store.engine.batched.add_lora` on CUDA (decode).

Decode is latency-bound: a layer's whole job is a few megabytes, so what
costs is the chain of dependent loads inside each program and the number of
launches.  Two shapes of the same computation:

* **fused** (one launch, BGMV): a program takes one token and a range of
  output columns; it loads its row's slot and rank (rank 0: copy the base
  output), computes ``y = A[slot] @ x[token]`` (R values) reading ``A[slot]``
  where it lies, ``BLOCK_K`` columns per step into a 2-D float32 accumulator
  reduced once, then writes ``result + y @ Bt[slot]`` for its columns.  The
  programs of one token each recompute the small shrink (from L2), so the
  grid can give every token enough column ranges to fill the GPU.
* **split** (two launches, shrink then expand): the shrink is split over
  ``in`` across programs (each writes a partial ``y``), the expand sums the
  partials and adds ``y @ Bt[slot]``; each program does one step.

Both accumulate in float32 and round once to the output dtype.  Importing
this module needs Triton; nothing else in the package does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "DEFAULT_CONFIG", "add_lora_kernel", "add_lora_compiled", "launch_grid"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and grid of the decode kernels.

    Attributes:
        variant: ``"fused"`` or ``"split"``.
        block_k: Input columns per step of the shrink.
        block_n: Output columns per step of the expand.
        target_programs: About how many programs to launch (fused: column
            ranges per token are added until the grid reaches it).
        num_warps: Warps per program.
    """

    variant: str = "split"
    block_k: int = 1024
    block_n: int = 1024
    target_programs: int = 2112
    num_warps: int = 4


#: Best over the decode shapes of a Llama2-7B block on an H200 (benchmarks/bench_kernel.py): 4-6 us a layer.
DEFAULT_CONFIG = KernelConfig()


@triton.jit
def _fused(
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
        acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
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
            acc += a * xk[None, :]
        y = tl.sum(acc, axis=1)  # (R, BLOCK_K) -> (R,)
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


@triton.jit
def _shrink(
    X, A, RANKS, SLOTS, PARTIAL,
    tokens, tokens_per_row, in_features, stride_x, stride_a_slot, stride_a_rank,
    R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(SLOTS + token // tokens_per_row).to(tl.int64)
    rank = tl.load(RANKS + slot)
    offs_r = tl.arange(0, R)
    offs_k = split * BLOCK_K + tl.arange(0, BLOCK_K)
    # A row without adapter (rank 0) reads no x: its columns end at 0.  (Not ``& (rank > 0)``: Triton's
    # interpreter turns a tensor-and-scalar ``&`` into int32, which it refuses as a load mask.)
    k_mask = offs_k < tl.where(rank > 0, in_features, 0)
    xk = tl.load(X + token.to(tl.int64) * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    a = tl.load(
        A + slot * stride_a_slot + offs_r[:, None] * stride_a_rank + offs_k[None, :],
        mask=(offs_r[:, None] < rank) & k_mask[None, :],
        other=0.0,
    ).to(
        tl.float32
    )  # (R, BLOCK_K)
    y = tl.sum(a * xk[None, :], axis=1)  # (R,)
    tl.store(PARTIAL + (split.to(tl.int64) * tokens + token) * R + offs_r, y)


@triton.jit
def _expand(
    PARTIAL, RESULT, OUT, BT, RANKS, SLOTS,
    tokens, tokens_per_row, out_features, splits, columns_per_program,
    stride_result, stride_out, stride_bt_slot, stride_bt_rank,
    R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    first_column = tl.program_id(1) * columns_per_program
    slot = tl.load(SLOTS + token // tokens_per_row).to(tl.int64)
    rank = tl.load(RANKS + slot)
    offs_r = tl.arange(0, R)
    y = tl.zeros((R,), dtype=tl.float32)
    for s in range(0, splits):
        y += tl.load(PARTIAL + (s * tokens + token) * R + offs_r)
    result_row = RESULT + token.to(tl.int64) * stride_result
    out_row = OUT + token.to(tl.int64) * stride_out
    bt_slot = BT + slot * stride_bt_slot
    for n0 in range(first_column, first_column + columns_per_program, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out_features
        bt = tl.load(
            bt_slot + offs_r[:, None] * stride_bt_rank + offs_n[None, :],
            mask=(offs_r[:, None] < rank) & n_mask[None, :],
            other=0.0,
        ).to(
            tl.float32
        )  # (R, BLOCK_N)
        delta = tl.sum(bt * y[:, None], axis=0)
        base = tl.load(result_row + offs_n, mask=n_mask, other=0.0)
        tl.store(out_row + offs_n, (base.to(tl.float32) + delta).to(base.dtype), mask=n_mask)


def launch_grid(tokens: int, out_features: int, config: KernelConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """``(column ranges per token, columns per program)`` of the expand: enough programs to fill the GPU.

    Example:
        >>> launch_grid(64, 4096)  # 64 tokens x 4 ranges of 1024 columns = 256 programs
        (4, 1024)
    """
    blocks = triton.cdiv(out_features, config.block_n)
    parts = max(1, min(blocks, triton.cdiv(config.target_programs, max(1, tokens))))
    per_program = triton.cdiv(blocks, parts) * config.block_n
    return triton.cdiv(out_features, per_program), per_program


def add_lora_kernel(
    x: torch.Tensor,
    result: torch.Tensor,
    stack_a: torch.Tensor,
    stack_bt: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    config: KernelConfig = DEFAULT_CONFIG,
    *,
    launch=lambda kernel: kernel,
) -> torch.Tensor:
    """:func:`~vblora_store.engine.batched.add_lora` in Triton (same arguments and result).

    With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels
    run on CPU tensors in Triton's interpreter: that is how the tests check them.
    ``launch`` wraps each kernel before its launch (``torch.library.wrap_triton``
    inside :func:`add_lora_compiled`).
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
    parts, per_program = launch_grid(tokens, out_features, config)
    rank_block = max(2, triton.next_power_of_2(stack_a.shape[1]))
    per_row = tokens // rows
    if config.variant == "split":
        splits = triton.cdiv(in_features, config.block_k)
        partial = torch.empty((splits, tokens, rank_block), device=x.device, dtype=torch.float32)
        launch(_shrink)[(tokens, splits)](
            x2, stack_a, ranks, slots, partial, tokens, per_row, in_features,
            x2.stride(0), stack_a.stride(0), stack_a.stride(1),
            R=rank_block, BLOCK_K=config.block_k, num_warps=config.num_warps,
        )  # fmt: skip
        launch(_expand)[(tokens, parts)](
            partial, result2, out, stack_bt, ranks, slots, tokens, per_row, out_features, splits, per_program,
            result2.stride(0), out.stride(0), stack_bt.stride(0), stack_bt.stride(1),
            R=rank_block, BLOCK_N=config.block_n, num_warps=config.num_warps,
        )  # fmt: skip
    else:
        launch(_fused)[(tokens, parts)](
            x2, result2, out, stack_a, stack_bt, ranks, slots,
            per_row, in_features, out_features, per_program,
            x2.stride(0), result2.stride(0), out.stride(0),
            stack_a.stride(0), stack_a.stride(1), stack_bt.stride(0), stack_bt.stride(1),
            R=rank_block, BLOCK_K=config.block_k, BLOCK_N=config.block_n, num_warps=config.num_warps,
        )  # fmt: skip
    return out.reshape(result.shape)  # (tokens, out) -> (rows, ..., out)


@torch.library.triton_op("vblora_store::add_lora", mutates_args={})
def add_lora_compiled(
    x: torch.Tensor,
    result: torch.Tensor,
    stack_a: torch.Tensor,
    stack_bt: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """:func:`add_lora_kernel` as a torch op that ``torch.compile`` sees into: the graph launches
    the kernel itself, with no Python in between (and no graph break)."""
    return add_lora_kernel(x, result, stack_a, stack_bt, ranks, slots, launch=torch.library.wrap_triton)
