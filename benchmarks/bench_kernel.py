"""The decode kernel alone: every tile configuration against the torch paths, under CUDA-graph replay.

A benchmark, not a test (CUDA only).  For the three linear shapes of a
Llama2-7B block (4096 -> 4096, 4096 -> 11008, 11008 -> 4096), rank 4, bf16,
``--tokens`` decode tokens each with its own adapter (64 slots) or all on one,
it times with ``triton.testing.do_bench_cudagraph`` (median of replays):

* ``copy``: ``result.clone()``, the floor of any op that writes a new output;
* ``one adapter``: ``result + F.linear(x, A) @ Bt`` (the engine's one-adapter path);
* ``gather``: the torch reference (``index_select`` + two ``bmm``);
* ``fused``/``split`` with each tile configuration (checked against the reference first).

    python3 benchmarks/bench_kernel.py [--tokens 16,64,256] [--json FILE]

Figures: docs/benchmarks.md ("Serving many adapters").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vblora_store.engine.batched import add_lora_reference  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def configs(kernels):
    """The tile configurations tried: both variants, tiles and grid sizes around the defaults."""
    for block_k, block_n, target in itertools.product((1024, 2048, 4096), (256, 512, 1024), (132, 264, 528)):
        yield kernels.KernelConfig("fused", block_k, block_n, target, 8)
    for block_k, block_n, warps, target in itertools.product(
        (512, 1024, 2048), (256, 512, 1024), (4, 8), (528, 2112, 8192)
    ):
        yield kernels.KernelConfig("split", block_k, block_n, target, warps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16,64")
    p.add_argument("--patterns", default="distinct,one")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import triton.testing

    from vblora_store.engine import triton_kernels as kernels

    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")  # noqa: E731
    dtype, device, r = torch.bfloat16, "cuda", args.rank
    rows = []
    for (name, (n_in, n_out)), tokens in itertools.product(SHAPES.items(), map(int, args.tokens.split(","))):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, 1, n_in, device=device, dtype=dtype, generator=g)
        result = torch.randn(tokens, 1, n_out, device=device, dtype=dtype, generator=g)
        stack_a = torch.randn(args.slots + 1, r, n_in, device=device, dtype=dtype, generator=g) / n_in**0.5
        stack_bt = torch.randn(args.slots + 1, r, n_out, device=device, dtype=dtype, generator=g)
        stack_a[0], stack_bt[0] = 0, 0
        ranks = torch.full((args.slots + 1,), r, device=device, dtype=torch.int32)
        ranks[0] = 0
        patterns = {
            "distinct": torch.arange(tokens, device=device) % args.slots + 1,
            "one": torch.ones(tokens, device=device, dtype=torch.int64),
        }
        for pattern, slots in [(k, patterns[k]) for k in args.patterns.split(",")]:
            ref = add_lora_reference(x.double(), result.double(), stack_a.double(), stack_bt.double(), slots)
            row = {"shape": name, "tokens": tokens, "slots": pattern}
            row["copy"] = bench(lambda: result.clone())
            a, bt = stack_a[1], stack_bt[1]
            row["one adapter"] = bench(lambda: result + F.linear(x, a) @ bt)
            row["gather"] = bench(lambda: add_lora_reference(x, result, stack_a, stack_bt, slots))
            for config in configs(kernels):
                out = kernels.add_lora_kernel(x, result, stack_a, stack_bt, ranks, slots, config)
                error = float((out.double() - ref).norm() / ref.norm())
                label = label_of(config)
                if not error < 2e-2:
                    row[label] = float("nan")
                    print(f"WRONG {label} {name} {tokens} {pattern}: rel error {error:.2e}")
                    continue
                row[label] = bench(
                    lambda config=config: kernels.add_lora_kernel(
                        x, result, stack_a, stack_bt, ranks, slots, config
                    )
                )
            rows.append(row)
            best = min((k for k in row if k.startswith(("fused", "split"))), key=lambda k: row[k])
            print(
                f"{name:<9} tokens {tokens:<4} {pattern:<8} copy {row['copy'] * 1e3:6.1f} us  one {row['one adapter'] * 1e3:6.1f}"
                f"  gather {row['gather'] * 1e3:6.1f}"
                f"  best {best} {row[best] * 1e3:6.1f} us"
            )
    labels = [k for k in rows[0] if k.startswith(("fused", "split"))]
    totals = {k: sum(row[k] for row in rows) for k in labels}
    print("\nsum over all cases (us), best first:")
    for k in sorted(totals, key=totals.get)[:15]:
        print(f"  {k:<26} {totals[k] * 1e3:8.1f}")
    print(f"  {'gather':<26} {sum(row['gather'] for row in rows) * 1e3:8.1f}")
    print(f"  {'one adapter':<26} {sum(row['one adapter'] for row in rows) * 1e3:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def label_of(config) -> str:
    return (
        f"{config.variant} k{config.block_k} n{config.block_n} w{config.num_warps} t{config.target_programs}"
    )


if __name__ == "__main__":
    main()
