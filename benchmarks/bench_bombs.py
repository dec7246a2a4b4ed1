"""Peak memory of every command on issue 18's bombs, beside the same command on the committed fixture.

What it does:

1. Builds the two bombs of ``tests/test_hostile.py`` (one builder, shared): a 34 KB compressed file
   whose config and zstd frames declare a 1 GiB bank, and a 700 KB top-k file whose dense factors
   would take 16 GiB.
2. Runs each command (``inspect``, ``report``, ``convert --to topk``, ``verify``, ``export-lora``) as
   a separate process on the fixture, then on each bomb, interleaved round by round, and records each
   process's peak RSS (``wait4``) and exit code.
3. Prints, per command, the median peak RSS of each input and the ratio bomb / fixture (the figure
   quoted): the refusal costs no more than reading a tiny adapter.

Run it with the vblora_store to measure first on ``PYTHONPATH`` (``PYTHONPATH=/path/to/old/checkout``
measures another version: an old one reads the bombs instead of refusing them).

Usage:
    python benchmarks/bench_bombs.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile import bomb, factor_bomb  # noqa: E402

FIXTURE = ROOT / "fixtures" / "tiny-llama-vblora"


def peak(args: list[str]) -> tuple[int, int]:
    """Run ``vblora-store ARGS`` as a process: ``(exit code, peak RSS in bytes)``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblora_store", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024  # Linux: ru_maxrss in kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        inputs = {"fixture": FIXTURE, "zstd bomb": bomb(work / "zstd"), "factor bomb": factor_bomb(work / "f")}
        commands = {
            "inspect": lambda src, out: ["inspect", src],
            "report": lambda src, out: ["report", src],
            "convert --to topk": lambda src, out: ["convert", src, out, "--to", "topk"],
            "verify": lambda src, out: ["verify", FIXTURE, src],
            "export-lora": lambda src, out: ["export-lora", src, out],
        }
        peaks: dict[tuple[str, str], list[int]] = {}
        codes: dict[tuple[str, str], set[int]] = {}
        for round_ in range(args.rounds):
            for command, make in commands.items():
                for name, src in inputs.items():
                    out = work / f"out-{round_}-{name.replace(' ', '-')}-{command.split()[0]}"
                    code, rss = peak([str(a) for a in make(src, out)])
                    peaks.setdefault((command, name), []).append(rss)
                    codes.setdefault((command, name), set()).add(code)
        print("| command | " + " | ".join(f"{n} (exit, peak RSS)" for n in inputs) + " | bombs / fixture |")
        print("|---|" + "--:|" * (len(inputs) + 1))
        for command in commands:
            mib = {n: statistics.median(peaks[(command, n)]) / 2**20 for n in inputs}
            cells = [f"{sorted(codes[(command, n)])}, {mib[n]:.0f} MiB" for n in inputs]
            ratios = " / ".join(f"{mib[n] / mib['fixture']:.2f}x" for n in inputs if n != "fixture")
            print(f"| `{command}` | " + " | ".join(cells) + f" | {ratios} |")


if __name__ == "__main__":
    main()
