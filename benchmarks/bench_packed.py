"""Sizes and errors of every storage form on the Llama2-7B-shaped adapter.

Writes the full adapter (``make_llama7b_adapter.py``), converts it to PEFT's
top-k form and to the packed form at each precision, and prints, per form: the
weights file's bytes, the ratio to PEFT's top-k file, the float32-equivalent
count, and the max relative ΔW error against the full adapter (``verify``).
Sizes are deterministic; nothing here is timed.

Usage:
    python benchmarks/bench_packed.py [--adapter DIR] [--json FILE]
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

from vblora_store.accounting import account  # noqa: E402
from vblora_store.format import convert, read_adapters  # noqa: E402
from vblora_store.verify import verify_adapters  # noqa: E402

# (label, convert options, target in bytes from the issue, or None)
VARIANTS = [
    ("top-k (PEFT)", {"to": "topk"}, None),
    ("packed, lossless", {"to": "packed"}, 2_380_000),
    ("packed, weights fp16", {"to": "packed", "weights_dtype": "float16"}, None),
    (
        "packed, bank+weights fp16",
        {"to": "packed", "weights_dtype": "float16", "bank_dtype": "float16"},
        1_260_000,
    ),
    (
        "packed, bank+weights bf16",
        {"to": "packed", "weights_dtype": "bfloat16", "bank_dtype": "bfloat16"},
        None,
    ),
    ("packed, bank int8, weights fp32", {"to": "packed", "bank_dtype": "int8"}, None),
    (
        "packed, bank int8, weights fp16",
        {"to": "packed", "weights_dtype": "float16", "bank_dtype": "int8"},
        750_000,
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="full adapter folder to reuse or create (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    try:
        full_dir = Path(args.adapter) if args.adapter else work / "full"
        if not (full_dir / "adapter_model.safetensors").is_file():
            make_llama7b_adapter(full_dir)
        full = read_adapters(full_dir)[0]
        rows = []
        topk_bytes = None
        for label, options, target in VARIANTS:
            out = work / label.replace(" ", "_").replace(",", "").replace("+", "_")
            convert(full_dir, out, **options)
            adapter = read_adapters(out)[0]
            size = adapter.file_bytes
            topk_bytes = topk_bytes or size
            error = verify_adapters(full, adapter).max_rel_error
            rows.append(
                {
                    "form": label,
                    "file_bytes": size,
                    "vs_peft_topk": round(size / topk_bytes, 4),
                    "vblora_params": account(adapter).vblora_params,
                    "max_rel_error": error,
                    "target_bytes": target,
                    "meets_target": None if target is None else size <= target,
                }
            )
            print(f"{label:<34} {size:>11,} bytes  {size / topk_bytes:6.3f}x top-k  "
                  f"max rel ΔW error {error:.2e}" + ("" if target is None else f"  target <= {target:,}: "
                  f"{'met' if size <= target else 'MISSED'}"), flush=True)  # fmt: skip
            shutil.rmtree(out)
        print(f"full form: {full.file_bytes:,} bytes")
        if args.json:
            Path(args.json).write_text(json.dumps({"full_bytes": full.file_bytes, "forms": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
