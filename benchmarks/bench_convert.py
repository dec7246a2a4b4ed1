"""Benchmark ``vblora-store convert --to topk`` against a bare lower bound, on a Llama2-7B-shaped adapter.

What it does:

1. Writes the full-form Llama2-7B-shaped adapter (~322 MB, see
   ``make_llama7b_adapter.py``) into ``--adapter`` (kept if already there) or
   into a temporary folder under /tmp (removed at the end).
2. Warms the page cache: reads the weights file once and runs each command
   once, untimed, so neither disk reads nor cold ``.pyc``/shared-library loads
   dominate the figures.
3. Runs ``--rounds`` rounds of [lower bound, ``vblora-store convert``] as separate
   processes, alternating which goes first, and takes each process's wall time
   (spawn to exit, interpreter start and imports included), peak RSS
   (``ru_maxrss`` from ``os.wait4``, i.e. that child alone) and CPU time
   (user + system, from the same ``wait4``; steadier than wall time when other
   processes share the cores).
4. Checks both outputs hold identical tensors and configs (sanity).
5. Prints medians, minima and the ratios convert / lower bound (of the medians,
   of the minima, and the median of the per-round ratios); ``--json FILE`` also
   writes every figure.

On a small shared machine torch's default of one OpenMP thread per core makes
wall time jumpy (a parallel region waits for a thread whose core another
process took); ``--threads 1`` gives steadier figures.

This process never imports torch: on Linux a child's ``ru_maxrss`` also counts
the RSS of the process it was spawned from (``exec`` keeps the old address
space's high-water mark), so generation and the sanity check run as
subprocesses and the parent stays under 20 MB; its own peak is printed too.

Usage:
    python benchmarks/bench_convert.py [--rounds 5] [--adapter DIR] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 1.5
LOWER, CLI = "lower bound", "vblora-store convert"

_SANITY = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
for k in ta:
    assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
ca = json.loads((a / "adapter_config.json").read_text())
cb = json.loads((b / "adapter_config.json").read_text())
assert ca == cb, {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)}
assert ca["save_only_topk_weights"] is True
same = (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
print(json.dumps({"tensors": len(ta), "byte_identical": same}))
"""


def _cli_path() -> str:
    beside = Path(sys.executable).parent / "vblora-store"
    found = str(beside) if beside.exists() else shutil.which("vblora-store")
    if not found:
        sys.exit("vblora-store not found: install the package (pip install -e .) in this environment")
    return found


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, float]:
    """Run ``cmd``; return its wall time (s), peak RSS (bytes) and CPU time (user + system, s)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # wait4 reaps the child and returns its own rusage; stderr is tiny (empty on success)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux: ru_maxrss in kilobytes


def _machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except OSError:
        pass
    return info


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "safetensors", "click", "vblora_store"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


METRICS = ("wall_s", "peak_rss_bytes", "cpu_s")


def _summary(samples: list[tuple[float, int, float]]) -> dict:
    out = {}
    for j, metric in enumerate(METRICS):
        values = [s[j] for s in samples]
        out[metric] = {"median": statistics.median(values), "min": min(values), "all": values}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--adapter", type=Path, help="full adapter folder to use, generated there if missing")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--threads",
        type=int,
        help="set OMP_NUM_THREADS/MKL_NUM_THREADS for both commands " "(default: torch's own choice)",
    )
    args = parser.parse_args(argv)

    cli = _cli_path()
    work = Path(tempfile.mkdtemp(prefix="vblora-bench-convert-", dir="/tmp"))
    try:
        src = args.adapter or work / "full"
        if not (src / "adapter_model.safetensors").is_file():
            print(f"generating the Llama2-7B-shaped adapter into {src} ...", flush=True)
            subprocess.run([sys.executable, str(HERE / "make_llama7b_adapter.py"), str(src)], check=True)
        src_bytes = (src / "adapter_model.safetensors").stat().st_size
        out = {LOWER: work / "out-lower", CLI: work / "out-cli"}
        cmds = {
            LOWER: [sys.executable, str(HERE / "lower_bound_convert.py"), str(src), str(out[LOWER])],
            CLI: [cli, "convert", str(src), str(out[CLI]), "--to", "topk"],
        }

        env = dict(os.environ)
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

        def once(name: str) -> tuple[float, int, float]:
            shutil.rmtree(out[name], ignore_errors=True)
            return run_measured(cmds[name], env)

        # the convert command must not pull in huggingface_hub (import time and memory)
        probe = "import sys, vblora_store.cli; print('huggingface_hub' in sys.modules)"
        hub = (
            subprocess.run(
                [sys.executable, "-c", probe], check=True, capture_output=True, text=True
            ).stdout.strip()
            == "True"
        )

        # warm-up, untimed: page cache for the source, the interpreter, torch's libraries and .pyc files
        with open(src / "adapter_model.safetensors", "rb") as f:
            while f.read(1 << 20):
                pass
        for name in (LOWER, CLI):
            once(name)

        load_before = os.getloadavg()
        samples: dict[str, list[tuple[float, int, float]]] = {LOWER: [], CLI: []}
        for i in range(args.rounds):
            order = (LOWER, CLI) if i % 2 == 0 else (CLI, LOWER)
            for name in order:
                samples[name].append(once(name))
            lw, lr, _ = samples[LOWER][-1]
            cw, cr, _ = samples[CLI][-1]
            print(
                f"round {i + 1}/{args.rounds} ({order[0]} first): "
                f"lower bound {lw:.2f} s {lr / 2**20:.0f} MiB, convert {cw:.2f} s {cr / 2**20:.0f} MiB",
                flush=True,
            )
        load_after = os.getloadavg()

        sanity = subprocess.run(
            [sys.executable, "-c", _SANITY, str(out[LOWER]), str(out[CLI])],
            check=True,
            capture_output=True,
            text=True,
        )
        identical = json.loads(sanity.stdout)

        stats = {name: _summary(s) for name, s in samples.items()}
        ratio = {
            metric: {
                "median": stats[CLI][metric]["median"] / stats[LOWER][metric]["median"],
                "min": stats[CLI][metric]["min"] / stats[LOWER][metric]["min"],
            }
            for metric in METRICS
        }
        # per-round (paired) ratios: both commands of a round ran back to back, so they saw the same load
        for j, metric in enumerate(METRICS):
            ratio[metric]["paired_median"] = statistics.median(
                c[j] / lo[j] for c, lo in zip(samples[CLI], samples[LOWER])
            )
        parent_rss = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024

        print()
        threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "default threads"
        print(
            f"source: {src} ({src_bytes / 1e6:.1f} MB), {args.rounds} interleaved rounds, warm page cache, "
            f"{threads}"
        )
        print(
            f"{'':22} {'wall median':>12} {'wall min':>10} {'RSS median':>12} {'RSS min':>10} "
            f"{'CPU median':>11} {'CPU min':>9}"
        )
        for name in (LOWER, CLI):
            w, r, c = (stats[name][m] for m in METRICS)
            print(
                f"{name:22} {w['median']:>10.2f} s {w['min']:>8.2f} s "
                f"{r['median'] / 2**20:>8.0f} MiB {r['min'] / 2**20:>6.0f} MiB "
                f"{c['median']:>9.2f} s {c['min']:>7.2f} s"
            )
        w, r, c = (ratio[m] for m in METRICS)
        print(
            f"{'ratio convert/lower':22} {w['median']:>11.2f}x {w['min']:>9.2f}x "
            f"{r['median']:>11.2f}x {r['min']:>9.2f}x {c['median']:>10.2f}x {c['min']:>8.2f}x"
        )
        print(
            f"{'paired ratio (median)':22} {w['paired_median']:>11.2f}x {'':>10} "
            f"{r['paired_median']:>11.2f}x {'':>10} {c['paired_median']:>10.2f}x"
        )
        ok = w["median"] <= TARGET_RATIO and r["median"] <= TARGET_RATIO
        print(f"target <= {TARGET_RATIO}x of the lower bound (medians): {'met' if ok else 'NOT met'}")
        print(
            f"outputs: {identical['tensors']} tensors identical; files byte-identical: "
            f"{identical['byte_identical']}"
        )
        print(f"huggingface_hub imported by the CLI: {'YES' if hub else 'no'}")
        print(
            f"load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; "
            f"this process's peak RSS {parent_rss / 2**20:.0f} MiB"
        )

        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "benchmark": "convert full->topk, Llama2-7B-shaped VB-LoRA adapter",
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "command": "python benchmarks/bench_convert.py "
                        + " ".join(argv if argv is not None else sys.argv[1:]),
                        "rounds": args.rounds,
                        "threads": args.threads,
                        "cli_imports_huggingface_hub": hub,
                        "source_bytes": src_bytes,
                        "commands": cmds,
                        "stats": stats,
                        "ratio_convert_over_lower": ratio,
                        "target_ratio": TARGET_RATIO,
                        "target_met": ok,
                        "outputs": identical,
                        "load_average_before_after": [load_before, load_after],
                        "parent_peak_rss_bytes": parent_rss,
                        "machine": _machine(),
                        "versions": _versions(),
                    },
                    indent=2,
                )
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
