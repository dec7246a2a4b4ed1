"""Sizes and errors of every storage form and precision on the Llama2-7B-shaped adapter.

Writes the full adapter (``make_llama7b_adapter.py``), converts it to PEFT's
top-k form, to the packed and compressed forms at each precision, with
``max_error`` at a few bounds, and to a rank-r LoRA (``export_lora``), and
prints, per form: the weights file's bytes, the ratio to PEFT's top-k file, and
the max relative ΔW error against the full adapter (``verify``).  Sizes are
deterministic (the compressed ones for a given zstd version); nothing is timed.

Usage:
    python benchmarks/bench_storage.py [--adapter DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_llama7b_adapter import make_llama7b_adapter  # noqa: E402

from vblora_store import convert, export_lora  # noqa: E402
from vblora_store.format import read_adapters  # noqa: E402
from vblora_store.verify import verify_adapters  # noqa: E402


def _precision(bank: str, weights: str) -> dict:
    return {"bank_dtype": bank, "weights_dtype": weights}


# (label, convert options, target in bytes from the issues, or None)
VARIANTS = [
    ("top-k (PEFT)", {"to": "topk"}, None),
    ("packed, lossless", {"to": "packed"}, 2_380_000),
    ("compressed, lossless", {"to": "compressed"}, 1_950_000),
    ("packed, bank + weights fp16", {"to": "packed", **_precision("float16", "float16")}, 1_260_000),
    ("packed, bank + weights bf16", {"to": "packed", **_precision("bfloat16", "bfloat16")}, None),
    ("compressed, bank + weights fp16", {"to": "compressed", **_precision("float16", "float16")}, None),
    (
        "packed, bank fp8 e4m3, weights fixed16",
        {"to": "packed", **_precision("float8_e4m3", "fixed16")},
        None,
    ),
    ("packed, bank int8, weights fp16", {"to": "packed", **_precision("int8", "float16")}, 750_000),
    ("packed, bank int8, weights fixed8", {"to": "packed", **_precision("int8", "fixed8")}, None),
    ("compressed, bank int8, weights fixed8", {"to": "compressed", **_precision("int8", "fixed8")}, None),
    ("packed, bank int4, weights fixed8", {"to": "packed", **_precision("int4", "fixed8")}, None),
    ("compressed, bank int4, weights fixed8", {"to": "compressed", **_precision("int4", "fixed8")}, None),
    ("compressed, --max-error 0", {"to": "compressed", "max_error": 0.0}, None),
    ("compressed, --max-error 1e-3", {"to": "compressed", "max_error": 1e-3}, None),
    ("compressed, --max-error 1e-2", {"to": "compressed", "max_error": 1e-2}, None),
]


def _row(label, adapter, topk_bytes, error, target):
    size = adapter.file_bytes
    return {
        "form": label,
        "file_bytes": size,
        "vs_peft_topk": round(size / topk_bytes, 4),
        "precision": adapter.form.codec.precision(adapter.packing),
        "max_rel_error": error,
        "target_bytes": target,
        "meets_target": None if target is None else size <= target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="full adapter folder to reuse or create (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        full_dir = Path(args.adapter) if args.adapter else work / "full"
        if not (full_dir / "adapter_model.safetensors").is_file():
            make_llama7b_adapter(full_dir)
        full = read_adapters(full_dir)[0]
        rows, topk_bytes = [], None
        for label, options, target in VARIANTS:
            out = work / "out"
            convert(full_dir, out, force=True, **options)
            adapter = read_adapters(out)[0]
            topk_bytes = topk_bytes or adapter.file_bytes
            row = _row(label, adapter, topk_bytes, verify_adapters(full, adapter).max_rel_error, target)
            rows.append(row)
            print(f"{label:<40} {row['file_bytes']:>11,} B  {row['vs_peft_topk']:6.3f}x top-k  "
                  f"{row['precision']:<28} max rel ΔW error {row['max_rel_error']:.2e}"
                  + ("" if target is None else f"  target <= {target:,}: {'met' if row['meets_target'] else 'MISSED'}"),
                  flush=True)  # fmt: skip
        export_lora(full_dir, work / "lora", force=True)
        lora_bytes = (work / "lora" / "adapter_model.safetensors").stat().st_size
        print(
            f"full form (PEFT): {full.file_bytes:,} B; rank-{full.config.r} LoRA (export_lora, fp32): {lora_bytes:,} B"
        )
        if args.json:
            figures = {"full_bytes": full.file_bytes, "lora_bytes": lora_bytes, "forms": rows}
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
