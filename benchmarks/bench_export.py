"""Benchmark ``vblora-store export-lora`` and ``vblora-store merge`` on Llama2-7B shapes: time and peak RSS.

What it does:

1. export-lora: writes the full-form Llama2-7B-shaped adapter (32 layers,
   ~322 MB, ``make_llama7b_adapter.py``) and its top-k conversion, then times
   ``export-lora`` on each.
2. merge: a full Llama2-7B bf16 checkpoint is 13.5 GB, so it writes synthetic
   bf16 checkpoints with Llama2-7B's real shapes (vocab 32000, hidden 4096,
   intermediate 11008; embeddings, norms and lm_head included) but only
   ``--layers`` decoder layers (default 2 and 4), sharded at ``--shard-mb``
   (default 1000 MB) as ``save_pretrained`` shards, plus the adapter restricted
   to those layers.  It times ``merge`` on each and, as a floor, ``cp -r`` of
   the same checkpoint then ``sync`` of the copies (every byte read and written
   once and flushed to disk, as merge's atomic folder does).  The per-layer
   figure is the slope between the two layer counts; the 32-layer figure is
   extrapolated from it.  The memory bound is merge's peak RSS against the
   largest shard.
3. Checks the merged checkpoint: same keys, shapes and bf16 dtype as the base;
   adapted weights changed, every other tensor bit-identical.

Every command runs as a separate process, after one untimed warm-up run
(page cache, ``.pyc`` files); wall time is spawn to exit (interpreter start and
imports included) and peak RSS is ``ru_maxrss`` of that child alone
(``os.wait4``).  This process never imports torch (a child's ``ru_maxrss`` would
include its parent's), so generation and checks run as subprocesses.

Usage:
    python benchmarks/bench_export.py [--rounds 3] [--layers 2 4] [--shard-mb 1000] [--threads N] [--work DIR]
                                      [--json FILE]
    python benchmarks/bench_export.py make-base DIR --layers 4 [--shard-mb 1000]   # the base generator alone
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
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_convert import _cli_path, _machine, _versions, run_measured  # noqa: E402

LLAMA7B_BASE = {"vocab": 32000, "hidden": 4096, "intermediate": 11008, "heads": 32}
FULL_LAYERS = 32
MiB = 2**20

_CHECK = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
base, merged, adapter = (Path(p) for p in sys.argv[1:4])
cfg = json.loads((adapter / "adapter_config.json").read_text())
targets = set(cfg["target_modules"])
def tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
merged_t = dict(tensors(merged))
changed = same = 0
for key, b in tensors(base):
    m = merged_t.pop(key)
    assert m.dtype == b.dtype == torch.bfloat16 and m.shape == b.shape, key
    adapted = key.endswith(".weight") and key.split(".")[-2] in targets and ".layers." in key
    if adapted:
        assert not torch.equal(m, b), key
        changed += 1
    else:
        assert torch.equal(m, b), key
        same += 1
assert not merged_t, sorted(merged_t)[:3]
print(json.dumps({"changed": changed, "unchanged": same}))
"""


# -- the synthetic base checkpoint (runs in a subprocess: imports torch) ------------------------------


def base_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama2-7B-shaped ``LlamaForCausalLM`` with ``num_layers`` layers, in save order."""
    v, h, i = LLAMA7B_BASE["vocab"], LLAMA7B_BASE["hidden"], LLAMA7B_BASE["intermediate"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(num_layers):
        p = f"model.layers.{n}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{m}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_base(folder: Path, num_layers: int, shard_mb: int, seed: int = 0) -> Path:
    """Write a bf16 ``save_pretrained``-style sharded checkpoint (config, index, shards) into ``folder``."""
    import torch
    from safetensors.torch import save_file

    shapes = base_shapes(num_layers)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for n, keys in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    total = sum(2 * _numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "dtype": "bfloat16",
        "hidden_size": LLAMA7B_BASE["hidden"],
        "intermediate_size": LLAMA7B_BASE["intermediate"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": LLAMA7B_BASE["heads"],
        "num_key_value_heads": LLAMA7B_BASE["heads"],
        "vocab_size": LLAMA7B_BASE["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- measuring ---------------------------------------------------------------------------


def measure(cmd: list[str], out: Path, rounds: int, env: dict) -> dict:
    """One untimed warm-up, then ``rounds`` timed runs of ``cmd`` (``out`` removed before each)."""
    samples = []
    for i in range(rounds + 1):
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, cpu = run_measured(cmd, env)
        if i:
            samples.append((wall, rss, cpu))
    walls, rsss, cpus = zip(*samples)
    return {
        "wall_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "peak_rss_bytes": statistics.median(rsss),
        "cpu_s": statistics.median(cpus),
        "all": samples,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "make-base":
        parser = argparse.ArgumentParser(prog="bench_export.py make-base")
        parser.add_argument("folder", type=Path)
        parser.add_argument("--layers", type=int, default=4)
        parser.add_argument("--shard-mb", type=int, default=1000)
        args = parser.parse_args(argv[1:])
        make_base(args.folder, args.layers, args.shard_mb)
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per command (default 3)")
    parser.add_argument(
        "--layers", type=int, nargs=2, default=[2, 4], help="two layer counts for merge (default 2 4)"
    )
    parser.add_argument("--shard-mb", type=int, default=1000, help="largest shard of the synthetic base, MB")
    parser.add_argument(
        "--work", type=Path, help="folder for generated inputs (kept); default: a temporary one"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--threads",
        type=int,
        help="set OMP_NUM_THREADS/MKL_NUM_THREADS for the measured commands (default: torch's choice; "
        "1 is steadier on a loaded machine)",
    )
    args = parser.parse_args(argv)

    cli = _cli_path()
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="vblora-bench-export-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"export_lora": {}, "merge": {}}
    try:
        # -- export-lora on the 32-layer adapter, full and top-k forms
        full = work / "adapter-32-full"
        if not (full / "adapter_model.safetensors").is_file():
            print(f"generating the Llama2-7B-shaped adapter into {full} ...", flush=True)
            subprocess.run([sys.executable, str(HERE / "make_llama7b_adapter.py"), str(full)], check=True)
        topk = work / "adapter-32-topk"
        if not topk.exists():
            subprocess.run(
                [cli, "convert", str(full), str(topk), "--to", "topk"], check=True, stdout=subprocess.DEVNULL
            )
        for form, src in (("full", full), ("topk", topk)):
            out = work / f"lora-{form}"
            stats = measure([cli, "export-lora", str(src), str(out)], out, args.rounds, env)
            stats.update(src_bytes=_folder_bytes(src), out_bytes=_folder_bytes(out))
            results["export_lora"][form] = stats
            print(
                f"export-lora {form:4}: {stats['wall_s']:.2f} s (min {stats['wall_min_s']:.2f} s, CPU "
                f"{stats['cpu_s']:.2f} s), peak RSS {stats['peak_rss_bytes'] / MiB:.0f} MiB "
                f"({stats['src_bytes'] / 1e6:.0f} MB -> {stats['out_bytes'] / 1e6:.1f} MB)",
                flush=True,
            )

        # -- merge on synthetic bf16 bases of two layer counts
        for layers in args.layers:
            base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
            if not (base / "model.safetensors.index.json").is_file():
                print(f"generating the {layers}-layer bf16 base into {base} ...", flush=True)
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "make-base",
                        str(base),
                        "--layers",
                        str(layers),
                        "--shard-mb",
                        str(args.shard_mb),
                    ],
                    check=True,
                )
            if not (adapter / "adapter_model.safetensors").is_file():
                subprocess.run(
                    [
                        sys.executable,
                        str(HERE / "make_llama7b_adapter.py"),
                        str(adapter),
                        "--layers",
                        str(layers),
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            out, copy = work / f"merged-{layers}", work / f"copy-{layers}"
            stats = measure([cli, "merge", str(base), str(adapter), str(out)], out, args.rounds, env)
            floor = measure(
                ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(base), str(copy)], copy, args.rounds, env
            )
            shutil.rmtree(copy, ignore_errors=True)
            check = subprocess.run(
                [sys.executable, "-c", _CHECK, str(base), str(out), str(adapter)],
                check=True,
                capture_output=True,
                text=True,
            )
            shards = sorted(base.glob("*.safetensors"))
            stats.update(
                base_bytes=_folder_bytes(base),
                largest_shard_bytes=max(p.stat().st_size for p in shards),
                shards=len(shards),
                copy_wall_s=floor["wall_s"],
                check=json.loads(check.stdout),
            )
            results["merge"][layers] = stats
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"merge {layers} layers: {stats['wall_s']:.2f} s (min {stats['wall_min_s']:.2f} s, CPU "
                f"{stats['cpu_s']:.2f} s; cp+sync {floor['wall_s']:.2f} s), peak RSS "
                f"{stats['peak_rss_bytes'] / MiB:.0f} MiB, "
                f"largest shard {stats['largest_shard_bytes'] / MiB:.0f} "
                f"MiB, {stats['shards']} shards, {stats['base_bytes'] / 1e9:.2f} GB; check {stats['check']}",
                flush=True,
            )

        lo, hi = (results["merge"][n] for n in args.layers)
        span = args.layers[1] - args.layers[0]
        per_layer = (hi["wall_s"] - lo["wall_s"]) / span
        cpu_per_layer = (hi["cpu_s"] - lo["cpu_s"]) / span
        copy_per_layer = (hi["copy_wall_s"] - lo["copy_wall_s"]) / span
        fixed = lo["wall_s"] - per_layer * args.layers[0]
        results["per_layer"] = {
            "merge_s": per_layer,
            "merge_cpu_s": cpu_per_layer,
            "copy_s": copy_per_layer,
            "fixed_s": fixed,
            "merge_32_layers_extrapolated_s": fixed + per_layer * FULL_LAYERS,
        }
        print(
            f"merge per layer (404 MB bf16): {per_layer:.2f} s, CPU {cpu_per_layer:.2f} s "
            f"(cp+sync {copy_per_layer:.2f} s); "
            f"fixed {fixed:.2f} s; "
            f"32 layers extrapolated: {results['per_layer']['merge_32_layers_extrapolated_s']:.0f} s"
        )
        print(f"load average before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}")
        for n in args.layers:
            s = results["merge"][n]
            print(
                f"memory bound, {n} layers: peak RSS / largest shard = "
                f"{s['peak_rss_bytes'] / s['largest_shard_bytes']:.2f}"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "benchmark": "export-lora and merge, Llama2-7B shapes",
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "command": "python benchmarks/bench_export.py " + " ".join(argv),
                        "threads": args.threads,
                        "load_average_before_after": [load_before, os.getloadavg()],
                        "results": results,
                        "machine": _machine(),
                        "versions": _versions(),
                    },
                    indent=2,
                    default=str,
                )
            )
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
