"""Reading the compressed form against the packed form: back to top-k, and into the engine (whole processes).

What it does:

1. Converts the Llama2-7B-shaped full adapter (``make_llama7b_adapter.py``;
   ``--adapter`` or a temporary one) to the packed and the compressed form,
   both lossless.
2. Times, as separate processes, interleaved round by round (the order
   alternating), for each of the two folders:

   * ``topk``: ``vblora-store convert DIR OUT --to topk`` (read, decode, write PEFT's file);
   * ``engine``: ``VBLoRAModel.from_pretrained`` onto a skeleton model of the
     adapter's own module shapes (built on the meta device and given empty
     bf16 storage, so building it costs next to nothing and reading the
     adapter is what is timed).

3. Checks both ``topk`` outputs are the same bytes, prints the medians and the
   ratio compressed / packed per round (their median is the figure quoted).

Usage:
    python benchmarks/bench_read_forms.py [--adapter DIR] [--rounds 7] [--threads 1] [--json FILE]
    python benchmarks/bench_read_forms.py --load DIR     # one engine load (what each engine round runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_convert import _cli_path, run_measured  # noqa: E402

FORMS = ("packed", "compressed")


def load_into_engine(folder: str) -> None:
    """``VBLoRAModel.from_pretrained`` of ``folder`` onto a skeleton of its module shapes."""
    import torch
    from torch import nn

    from vblora_store import read_adapter
    from vblora_store.engine import VBLoRAModel

    adapter = read_adapter(folder)
    root = nn.Module()
    with torch.device("meta"):
        for name, shape in adapter.modules.items():
            parent = root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(shape.in_features, shape.out_features, bias=False, dtype=torch.bfloat16))
    root = root.to_empty(device="cpu")  # storage never touched: no page is written
    model = VBLoRAModel.from_pretrained(root, folder)
    assert len(model.base_model.targeted_module_names) == len(adapter.modules)


def decode_times(folders: list[str], repeats: int) -> dict[str, float]:
    """In one process, interleaved: the fastest of ``repeats`` reads of every tensor the engine reads."""
    import time

    from vblora_store import read_adapter
    from vblora_store.factors import module_sides
    from vblora_store.format.keys import BANK_KEY

    best = {folder: float("inf") for folder in folders}
    for i in range(repeats):
        for folder in folders if i % 2 == 0 else folders[::-1]:
            start = time.perf_counter()
            adapter = read_adapter(folder)
            for name in adapter.modules:
                module_sides(adapter, name)
            adapter.checked_tensor(BANK_KEY)
            best[folder] = min(best[folder], time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="full adapter folder (generated there if missing)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--decode", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load_into_engine(args.load)
        return 0
    if args.decode:
        print(json.dumps(decode_times(args.decode, args.rounds)))
        return 0
    cli = _cli_path()
    work = Path(tempfile.mkdtemp(prefix="vblora-bench-read-", dir="/tmp"))
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        src = args.adapter or work / "full"
        if not (src / "adapter_model.safetensors").is_file():
            subprocess.run([sys.executable, str(HERE / "make_llama7b_adapter.py"), str(src)], check=True)
        for form in FORMS:
            subprocess.run([cli, "convert", str(src), str(work / form), "--to", form], check=True, env=env,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        commands = {}
        for form in FORMS:
            out = work / f"{form}-topk"
            commands["topk", form] = (
                out,
                [cli, "convert", str(work / form), str(out), "--to", "topk", "--force"],
            )
            load = [sys.executable, str(Path(__file__).resolve()), "--load", str(work / form)]
            commands["engine", form] = (None, load)
        samples = {key: [] for key in commands}
        for key, (_, command) in commands.items():  # warm-up, untimed
            run_measured(command, env)
        for i in range(args.rounds):
            for task in ("topk", "engine"):
                order = FORMS if i % 2 == 0 else FORMS[::-1]
                for form in order:
                    samples[task, form].append(run_measured(commands[task, form][1], env))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{task} {form} {samples[task, form][-1][0]:.2f} s" for task in ("topk", "engine") for form in FORMS
            ), flush=True)  # fmt: skip
        same = (work / "packed-topk" / "adapter_model.safetensors").read_bytes() == (
            work / "compressed-topk" / "adapter_model.safetensors"
        ).read_bytes()
        if not same:
            raise SystemExit("the two top-k outputs differ: the compressed form is not lossless")
        figures = {"sizes": {f: (work / f / "adapter_model.safetensors").stat().st_size for f in FORMS}}
        decode = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(args.rounds), "--decode"]
        best = json.loads(subprocess.run(decode + [str(work / f) for f in FORMS], env=env, check=True,
                                         capture_output=True, text=True).stdout)  # fmt: skip
        figures["decode_in_process_s"] = {f: best[str(work / f)] for f in FORMS}
        print("decode alone, in one process (fastest of the rounds): " + ", ".join(
            f"{f} {figures['decode_in_process_s'][f] * 1e3:.0f} ms" for f in FORMS))  # fmt: skip
        for task in ("topk", "engine"):
            walls = {form: [s[0] for s in samples[task, form]] for form in FORMS}
            peaks = {form: [s[1] for s in samples[task, form]] for form in FORMS}
            paired = [c / p for p, c in zip(walls["packed"], walls["compressed"])]
            figures[task] = {
                "median_wall_s": {f: statistics.median(walls[f]) for f in FORMS},
                "median_peak_rss_mib": {f: statistics.median(peaks[f]) / 2**20 for f in FORMS},
                "paired_ratio_median": statistics.median(paired),
                "paired_ratios": paired,
            }
            m = figures[task]["median_wall_s"]
            print(f"{task}: packed {m['packed']:.2f} s, compressed {m['compressed']:.2f} s; compressed / packed "
                  f"(median of paired ratios) {figures[task]['paired_ratio_median']:.3f}x; peak RSS "
                  + ", ".join(f"{f} {figures[task]['median_peak_rss_mib'][f]:.0f} MiB" for f in FORMS))  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
