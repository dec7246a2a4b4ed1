"""Forward latency and memory of the engine beside PEFT's VB-LoRA and a PEFT LoRA of the same rank.

A benchmark, not a test.  One Llama-shaped model with random weights; one
VB-LoRA adapter made by PEFT and saved in top-k form; the base and three
adapted models, each on its own copy of the base:

* ``engine``: ``VBLoRAModel.from_pretrained`` of the top-k file (unmerged);
* ``peft-vblora``: ``PeftModel.from_pretrained`` of the same file;
* ``peft-lora``: ``get_peft_model`` with a ``LoraConfig`` of the same rank and targets;
* ``base``: the model without adapter, for scale.

Each measurement alternates the four models call by call (rotating which goes
first), so drifts in machine load hit all alike; medians and ratios are
reported.  Decode is one position, batch 1 (no KV cache); prefill is one
sequence of ``--prefill`` tokens.  Memory "added at load" counts the bytes of
every tensor a model holds beyond the base (for the engine including the
cached factors after a first forward), and on CUDA also the change in
``torch.cuda.memory_allocated`` over loading plus one forward.

    python benchmarks/bench_engine.py --device cpu --threads 1 --prefill-reps 6 --decode-reps 200
    python3 benchmarks/bench_engine.py --device cuda --dtype bf16 --hidden 4096 --intermediate 11008 \
        --layers 32 --heads 32 --prefill-reps 60

The figures and the exact commands behind them are in docs/benchmarks.md ("Engine").
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--num-vectors", type=int, default=2048)
    p.add_argument("--vector-length", type=int, default=256)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--targets", default=ALL_LINEAR, help="comma-separated module names")
    p.add_argument("--prefill", type=int, default=512, help="prefill length in tokens")
    p.add_argument("--decode-reps", type=int, default=300)
    p.add_argument("--prefill-reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        vocab_size=args.vocab, max_position_embeddings=max(2048, args.prefill),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    return model.eval()


def build_models(base: torch.nn.Module, args: argparse.Namespace, folder: Path) -> dict[str, dict]:
    """The base and the three adapted models, each with the bytes and device memory its adapter added."""
    import peft

    from vblora_store.engine import VBLoRAModel

    targets = args.targets.split(",")
    vb = peft.VBLoRAConfig(
        r=args.r, num_vectors=args.num_vectors, vector_length=args.vector_length, topk=args.topk,
        target_modules=targets, save_only_topk_weights=True,
    )  # fmt: skip
    peft.get_peft_model(copy.deepcopy(base), vb).save_pretrained(folder)
    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, init_lora_weights=False)
    loaders = {
        "engine": lambda m: VBLoRAModel.from_pretrained(m, folder),
        "peft-vblora": lambda m: peft.PeftModel.from_pretrained(m, folder),
        "peft-lora": lambda m: peft.get_peft_model(m, lora),
    }
    base_bytes = _tensor_bytes(base)
    probe = torch.ones(1, 1, dtype=torch.long, device=args.device)
    with torch.inference_mode():
        base(
            input_ids=probe
        )  # library workspaces (cuBLAS: 32 MiB) are allocated here, not charged to a model
    models = {"base": {"model": copy.deepcopy(base), "added_bytes": 0, "added_device_bytes": 0}}
    for name, load in loaders.items():
        copy_of_base = copy.deepcopy(base)
        gc.collect()
        before = torch.cuda.memory_allocated() if args.device.startswith("cuda") else None
        model = load(copy_of_base).eval()
        with torch.inference_mode():
            model(input_ids=probe)  # the engine builds and caches its factors here
        _sync(args.device)
        after = torch.cuda.memory_allocated() if before is not None else None
        models[name] = {
            "model": model,
            "added_bytes": _tensor_bytes(model)
            - base_bytes,  # the engine's factor stacks are buffers: counted
            "added_device_bytes": None if before is None else after - before,
        }
    return models


def _tensor_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(models: dict[str, torch.nn.Module], ids: torch.Tensor, reps: int, warmup: int, device: str):
    """Seconds per call of each model, the models alternating call by call."""
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(warmup + reps):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                _sync(device)
                start = time.perf_counter()
                models[name](input_ids=ids)
                _sync(device)
                if i >= warmup:
                    samples[name].append(time.perf_counter() - start)
    return {n: statistics.median(s) for n, s in samples.items()}


def ratios(results: dict) -> dict[str, float]:
    """The figures the targets are stated in."""
    out = {}
    for phase in ("decode_ms", "prefill_ms"):
        t = results[phase]
        out[f"{phase}: engine / peft-lora"] = t["engine"] / t["peft-lora"]
        out[f"{phase}: peft-vblora / engine"] = t["peft-vblora"] / t["engine"]
        out[f"{phase}: adapter cost (minus base) engine / peft-lora"] = (t["engine"] - t["base"]) / (
            t["peft-lora"] - t["base"]
        )
    added = results["added_bytes"]
    out["added bytes: engine / peft-lora"] = added["engine"] / added["peft-lora"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    base = build_base(args)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_models(base, args, Path(tmp) / "topk-adapter")
    del base
    models = {name: entry["model"] for name, entry in built.items()}
    gen = torch.Generator().manual_seed(0)
    decode_ids = torch.randint(0, args.vocab, (1, 1), generator=gen).to(args.device)
    prefill_ids = torch.randint(0, args.vocab, (1, args.prefill), generator=gen).to(args.device)
    with torch.inference_mode():  # same function: the engine against PEFT's VB-LoRA on the prefill input
        ours, theirs = (models[n](input_ids=prefill_ids).logits.float() for n in ("engine", "peft-vblora"))
    agreement = {
        "max_abs_diff": (ours - theirs).abs().max().item(),
        "rel_norm_diff": ((ours - theirs).norm() / theirs.norm()).item(),
    }
    del ours, theirs
    results = {
        "engine_vs_peft_vblora_logits": agreement,
        "decode_ms": interleaved(models, decode_ids, args.decode_reps, args.warmup, args.device),
        "prefill_ms": interleaved(models, prefill_ids, args.prefill_reps, min(args.warmup, 2), args.device),
    }
    for phase in ("decode_ms", "prefill_ms"):
        results[phase] = {n: round(s * 1e3, 4) for n, s in results[phase].items()}
    results["added_bytes"] = {n: e["added_bytes"] for n, e in built.items()}
    if args.device.startswith("cuda"):
        results["added_device_bytes"] = {n: e["added_device_bytes"] for n, e in built.items()}
    results["ratios"] = ratios(results)
    results["args"] = vars(args)
    results["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results["torch"] = torch.__version__
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
