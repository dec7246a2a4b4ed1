"""Batch conversion throughput: many small per-user adapters, ``--jobs 1`` beside ``--jobs N``.

Copies ``fixtures/tiny-llama-vblora`` (a full-form PEFT adapter, 14 modules;
or, with ``--llama-layers K``, a Llama2-7B-shaped full adapter of K layers, about
10 MB a layer) ``--adapters`` times into a tree ``users/<i // 100>/<i>/``, then runs, as whole
processes, interleaved for ``--rounds`` rounds: ``vblora-store convert ROOT OUT
--recursive --to packed --jobs 1`` and the same with ``--jobs N``; also, for
scale, a shell loop of one ``vblora-store convert`` process per adapter on a
tenth of the tree.  Prints medians and adapters per second.

Usage:
    python benchmarks/bench_batch.py [--adapters 1000] [--jobs 2] [--rounds 3] [--llama-layers K]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama-vblora"
CLI = [sys.executable, "-m", "vblora_store"]


def make_tree(root: Path, count: int, source: Path) -> list[Path]:
    """``count`` copies of ``source`` under ``root/users/<i // 100>/<i>``."""
    folders = []
    for i in range(count):
        folder = root / "users" / f"{i // 100:03d}" / f"{i:05d}"
        shutil.copytree(source, folder)
        folders.append(folder)
    return folders


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-layers", type=int, help="use a Llama2-7B-shaped adapter of this many layers")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        source = FIXTURE
        if args.llama_layers:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from make_llama7b_adapter import make_llama7b_adapter

            source = make_llama7b_adapter(work / "llama", num_layers=args.llama_layers)
        folders = make_tree(work / "src", args.adapters, source)
        per_process = folders[: max(1, args.adapters // 10)]
        times: dict[str, list[float]] = {"jobs 1": [], f"jobs {args.jobs}": [], "one process each": []}
        for round_ in range(args.rounds):
            order = [1, args.jobs] if round_ % 2 == 0 else [args.jobs, 1]
            for jobs in order:
                out = work / f"out-{jobs}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [*CLI, "convert", str(work / "src"), str(out), "--recursive", "--to", "packed"]
                times[f"jobs {jobs}"].append(timed([*argv, "--jobs", str(jobs)]))
            loop_out = work / "out-loop"
            shutil.rmtree(loop_out, ignore_errors=True)
            start = time.perf_counter()
            for folder in per_process:
                dst = loop_out / folder.relative_to(work / "src")
                subprocess.run([*CLI, "convert", str(folder), str(dst), "--to", "packed"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            times["one process each"].append((time.perf_counter() - start) * args.adapters / len(per_process))
        converted = sum(1 for _ in (work / f"out-{args.jobs}").rglob("adapter_model.safetensors"))
        print(f"{args.adapters} adapters ({converted} converted), {args.rounds} rounds, medians:")
        for label, values in times.items():
            median = statistics.median(values)
            note = " (extrapolated from a tenth)" if label == "one process each" else ""
            print(f"  {label:<18} {median:8.1f} s  {args.adapters / median:7.1f} adapters/s{note}")
        base = statistics.median(times["jobs 1"])
        print(
            f"  speed-up jobs {args.jobs} / jobs 1: {base / statistics.median(times[f'jobs {args.jobs}']):.2f}x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
