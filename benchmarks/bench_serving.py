"""Serving many adapters from one model: mixed-adapter decode beside PEFT LoRA, memory per resident adapter.

A benchmark, not a test.  One Llama-shaped model with random weights and
``--adapters`` synthetic top-k VB-LoRA adapters written to disk in PEFT's
layout (random bank, indices and softmax weights of the right shapes), loaded
by the engine; PEFT LoRA adapters of the same rank and targets for the
comparison.  Sections (each optional):

* ``--check``: the Triton kernel against the torch reference on random
  inputs (every dtype, odd sizes, empty slots), and a mixed batch of the
  model against each row run alone with its adapter (fp32, TF32 off).
* decode: one position per row (no KV cache), batch ``--batches``, with
  ``--distinct`` distinct adapters in the batch, every case interleaved call by
  call and timed with CUDA events (or the wall clock on CPU); medians and
  ratios.  Cases: ``base``; ``engine-1`` (one active adapter);
  ``engine-mixed-D`` (``adapter_names`` over D adapters); ``peft-lora-1`` and
  ``peft-lora-mixed-D`` (PEFT's LoRA, same rank and targets).
* ``--compile MODE[,MODE]``: the base model and the engine compiled
  (``torch.compile(model, mode=...)``), beside eager, interleaved.
* ``--pool N``: N adapters resident at once; memory per adapter against its
  top-k file; one mixed batch drawing on any of them, checked row by row.

    python3 benchmarks/bench_serving.py --device cuda --check --compile default,reduce-overhead
    python benchmarks/bench_serving.py --device cpu --hidden 1024 --intermediate 2816 --layers 4 \\
        --heads 16 --batches 8 --distinct 1,8 --adapters 8 --reps 40

Figures and the commands behind them: docs/benchmarks.md ("Serving many adapters").
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vblora_store.config import VBLoRAConfig  # noqa: E402
from vblora_store.engine import VBLoRAModel  # noqa: E402
from vblora_store.format import write_adapter  # noqa: E402
from vblora_store.format.keys import BANK_KEY, index_dtype, indices_key, weights_key  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--num-vectors", type=int, default=2048)
    p.add_argument("--vector-length", type=int, default=256)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--adapters", type=int, default=64, help="adapters loaded for the decode cases")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--distinct", default="1,16,64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--no-peft", action="store_true", help="leave PEFT LoRA out")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--check", action="store_true")
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes")
    p.add_argument("--compile-batch", type=int, default=64)
    p.add_argument("--pool", type=int, default=0, help="resident adapters for the pool section")
    p.add_argument("--pool-layers", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    return p.parse_args()


# -- models and adapters ------------------------------------------------------------------------


def llama(args, layers: int):
    """A Llama-shaped model with random weights, built on the device in the benchmark's dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def write_topk_adapter(folder: Path, model, args, seed: int) -> None:
    """A synthetic top-k adapter of ``model``'s shape: random bank, indices and top-k softmax weights."""
    g = torch.Generator().manual_seed(seed)
    n, length, r, k = args.num_vectors, args.vector_length, args.r, args.topk
    tensors = {BANK_KEY: torch.empty(n, length).uniform_(-0.5, 0.5, generator=g)}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = module.weight.shape
        for side, shape in (("A", (r, in_f // length)), ("B", (out_f // length, r))):
            first = torch.randint(0, n, (*shape, 1), generator=g)
            steps = torch.randint(1, max(2, n // k), (*shape, k - 1), generator=g)  # k distinct indices
            idx = torch.cat([first, first + steps.cumsum(-1)], -1) % n
            weights = torch.softmax(torch.randn(*shape, k, generator=g), -1).sort(-1, descending=True).values
            tensors[indices_key(name, side)] = idx.to(index_dtype(n))
            tensors[weights_key(name, side)] = weights[..., :-1].contiguous()
    config = VBLoRAConfig(
        r=r, num_vectors=n, vector_length=length, topk=k, target_modules=TARGETS, save_only_topk_weights=True
    )
    write_adapter(folder, config, tensors)


def engine_with(base, folders: list[Path], **kwargs) -> VBLoRAModel:
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0", **kwargs)
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, f"a{i}")
    return model.eval()


def peft_lora_with(base, count: int, r: int):
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
        for i in range(1, count):
            model.add_adapter(f"a{i}", config)
    return model.eval()


# -- timing -------------------------------------------------------------------------------------------


class Timer:
    """Times one call: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def interleaved(cases: dict, reps: int, timer: Timer, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each case, calls alternating between cases, rotating the order."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            times[name].append(timer(cases[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def names_for(batch: int, distinct: int) -> list[str]:
    return [f"a{i % distinct}" for i in range(batch)]


# -- sections ------------------------------------------------------------------------------------------


def check_kernel(device: str) -> dict:
    """Largest relative error of the Triton kernel against the reference, by dtype."""
    from vblora_store.engine.batched import add_lora_reference
    from vblora_store.engine.triton_kernels import add_lora_kernel

    g = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, tokens, n_in, n_out, rank, slots in [
            (1, 1, 4096, 4096, 4, 2), (64, 1, 4096, 11008, 4, 65), (16, 1, 11008, 4096, 8, 17),
            (7, 3, 1000, 333, 3, 5), (33, 4, 64, 4160, 16, 9), (5, 2, 8, 8, 1, 3),
        ]:  # fmt: skip
            stack_a = torch.randn(slots, rank, n_in, generator=g) / n_in**0.5
            stack_bt = torch.randn(slots, rank, n_out, generator=g)
            ranks = torch.randint(0, rank + 1, (slots,), generator=g, dtype=torch.int32)
            ranks[0] = 0
            for s in range(slots):
                stack_a[s, ranks[s] :], stack_bt[s, ranks[s] :] = 0, 0
            row_slots = torch.randint(0, slots, (rows,), generator=g)
            x = torch.randn(rows, tokens, n_in, generator=g)
            result = torch.randn(rows, tokens, n_out, generator=g)
            on = lambda t: t.to(device)  # noqa: E731
            ref = add_lora_reference(
                x.double(), result.double(), stack_a.double(), stack_bt.double(), row_slots
            )
            got = add_lora_kernel(
                on(x.to(dtype)), on(result.to(dtype)), on(stack_a.to(dtype)), on(stack_bt.to(dtype)),
                on(ranks), on(row_slots),
            ).double().cpu()  # fmt: skip
            error = float((got - ref).norm() / ref.norm())
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), error)
    return worst


def check_rows(args) -> float:
    """Largest |mixed - alone| over the rows of one mixed batch, fp32, TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    small = argparse.Namespace(**{**vars(args), "dtype": "fp32"})
    base = llama(small, 2)
    tmp = Path(tempfile.mkdtemp())
    paths = []
    for i in range(3):
        write_topk_adapter(tmp / f"a{i}", base, small, seed=100 + i)
        paths.append(tmp / f"a{i}")
    model = engine_with(base, paths)
    names = ["a0", "a1", "__base__", "a2", "a1", "a0"]
    ids = torch.randint(1, args.vocab, (len(names), 5), device=args.device)
    worst = 0.0
    with torch.inference_mode():
        with model.disable_adapter():  # how far the base model itself moves between batch sizes
            batched = model(input_ids=ids).logits
            base_worst = max(float((batched[i : i + 1] - model(input_ids=ids[i : i + 1]).logits).abs().max())
                             for i in range(len(names)))  # fmt: skip
        print("base model, batch vs rows alone, fp32, max abs error:", base_worst)
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            worst = max(worst, float((mixed[row : row + 1] - alone).abs().max()))
        if args.compile:
            mode = args.compile.split(",")[-1]
            compiled, compiled_base = torch.compile(model, mode=mode), torch.compile(base, mode=mode)
            for _ in range(3):
                again = compiled(input_ids=ids, adapter_names=names).logits
                base_again = compiled_base(input_ids=ids).logits
            with model.disable_adapter():
                base_eager = model(input_ids=ids).logits
            print("fp32 compiled mixed vs eager mixed, max abs error:", float((again - mixed).abs().max()))
            print(
                "fp32 compiled base vs eager base, max abs error:",
                float((base_again - base_eager).abs().max()),
            )
    return worst


def kernel_in_eager(engine, ids, names):
    """A mixed eager call through the Triton kernels instead of the torch reference."""
    from vblora_store.engine import batched

    saved, batched.KERNEL_IN_EAGER = batched.KERNEL_IN_EAGER, True
    try:
        return engine(input_ids=ids, adapter_names=names)
    finally:
        batched.KERNEL_IN_EAGER = saved


def decode(args, base, engine, lora, timer: Timer) -> dict:
    results = {}
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(1, args.vocab, (batch, 1), device=args.device)
        cases = {"base": lambda: base(input_ids=ids), "engine-1": lambda: engine(input_ids=ids)}
        if lora is not None:
            cases["peft-lora-1"] = lambda: lora(input_ids=ids)
        for distinct in map(int, args.distinct.split(",")):
            if distinct > min(batch, args.adapters):
                continue
            names = names_for(batch, distinct)
            cases[f"engine-mixed-{distinct}"] = lambda names=names: engine(input_ids=ids, adapter_names=names)
            if args.device.startswith("cuda"):
                cases[f"engine-mixed-{distinct} kernel"] = lambda names=names: kernel_in_eager(
                    engine, ids, names
                )
            if lora is not None:
                cases[f"peft-lora-mixed-{distinct}"] = lambda names=names: lora(
                    input_ids=ids, adapter_names=names
                )
        with torch.inference_mode():
            medians = interleaved(cases, args.reps, timer)
        results[f"batch-{batch}"] = medians
        report(f"decode, batch {batch} (median ms over {args.reps})", medians, "engine-1")
    return results


def compiled(args, base, engine, timer: Timer) -> dict:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    batch = args.compile_batch
    ids = torch.randint(1, args.vocab, (batch, 1), device=args.device)
    names = names_for(batch, min(batch, args.adapters))
    results = {}
    for mode in [m for m in args.compile.split(",") if m]:
        torch._dynamo.reset()
        cbase, cengine = torch.compile(base, mode=mode), torch.compile(engine, mode=mode)
        cases = {
            "base": lambda: base(input_ids=ids),
            "engine-1": lambda: engine(input_ids=ids),
            f"engine-mixed-{len(set(names))}": lambda: engine(input_ids=ids, adapter_names=names),
            "compiled base": lambda: cbase(input_ids=ids),
            "compiled engine-1": lambda: cengine(input_ids=ids),
            f"compiled engine-mixed-{len(set(names))}": lambda: cengine(input_ids=ids, adapter_names=names),
        }
        t0 = time.perf_counter()
        with torch.inference_mode():
            for name in [n for n in cases if n.startswith("compiled")]:
                for _ in range(3):
                    cases[name]()
            warm = time.perf_counter() - t0
            with torch.no_grad():
                mixed_eager = engine(input_ids=ids, adapter_names=names).logits.float()
                mixed_compiled = cengine(input_ids=ids, adapter_names=names).logits.float()
                base_eager = base(input_ids=ids).logits.float()
                base_compiled = cbase(input_ids=ids).logits.float()
            agreement = float((mixed_compiled - mixed_eager).norm() / mixed_eager.norm())
            base_agreement = float((base_compiled - base_eager).norm() / base_eager.norm())
            medians = interleaved(cases, args.reps, timer)
        results[mode] = {
            "medians": medians, "compile_s": warm, "rel_diff_vs_eager": agreement, "base_rel_diff_vs_eager": base_agreement,
        }  # fmt: skip
        report(
            f"compiled ({mode}), batch {batch}; compile {warm:.0f} s; compiled vs eager rel diff: engine "
            f"{agreement:.1e}, base {base_agreement:.1e}",
            medians,
            "compiled base",
        )
    return results


def pool(args, timer: Timer) -> dict:
    """``--pool`` adapters resident at once: memory per adapter, one mixed batch over any of them."""
    base = llama(args, args.pool_layers)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    folders = []
    for i in range(args.pool):
        write_topk_adapter(tmp / f"p{i}", base, args, seed=i)
        folders.append(tmp / f"p{i}")
    written = time.perf_counter() - t0
    file_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    allocated = torch.cuda.memory_allocated if args.device.startswith("cuda") else (lambda: 0)
    model = VBLoRAModel.from_pretrained(base, folders[0], adapter_name="p0", max_cached_factors=64).eval()
    sync()
    before = allocated()
    t0 = time.perf_counter()
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, f"p{i}")
    sync()
    loaded = time.perf_counter() - t0
    per_adapter = (allocated() - before) / max(1, args.pool - 1)
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.vblora_topk["p1"].buffers())
    tensor_bytes += model.vblora_vector_bank["p1"].numel() * model.vblora_vector_bank["p1"].element_size()
    rng = random.Random(0)
    names = [f"p{rng.randrange(args.pool)}" for _ in range(64)]
    ids = torch.randint(1, args.vocab, (64, 1), device=args.device)
    with torch.inference_mode():
        cold = timer(lambda: model(input_ids=ids, adapter_names=names))
        warm = timer(lambda: model(input_ids=ids, adapter_names=names))
        torch.backends.cuda.matmul.allow_tf32 = False
        model.float()  # the row check in fp32: bf16 through 32 random layers amplifies any rounding
        mixed = model(input_ids=ids, adapter_names=names).logits.float()
        worst = 0.0
        for row in (0, 17, 63):
            model.set_adapter(names[row])
            alone = model(input_ids=ids[row : row + 1]).logits.float()
            worst = max(worst, float((mixed[row] - alone[0]).norm() / alone[0].norm()))
    out = {
        "adapters": args.pool, "layers": args.pool_layers, "topk_file_bytes": file_bytes,
        "allocated_bytes_per_adapter": per_adapter, "tensor_bytes_per_adapter": tensor_bytes,
        "allocated_to_file": per_adapter / file_bytes, "tensors_to_file": tensor_bytes / file_bytes,
        "write_s": written, "load_s": loaded, "cold_batch_ms": cold, "warm_batch_ms": warm,
        "max_rel_row_error": worst, "distinct_in_batch": len(set(names)),
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    return out


def report(title: str, medians: dict[str, float], reference: str) -> None:
    print(f"\n{title}")
    for name, ms in medians.items():
        print(f"  {name:<28} {ms:9.3f} ms   {ms / medians[reference]:6.2f}x {reference}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(args.device)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    tmp = Path(tempfile.mkdtemp())
    if args.check:
        if args.device.startswith("cuda"):
            results["kernel_rel_error"] = check_kernel(args.device)
            print("kernel vs reference, max relative error:", results["kernel_rel_error"])
        results["mixed_rows_max_abs_error_fp32"] = check_rows(args)
        print("mixed batch vs rows alone, fp32, max abs error:", results["mixed_rows_max_abs_error_fp32"])
    if (not args.no_decode or args.compile) and args.adapters:
        base = llama(args, args.layers)
        folders = []
        for i in range(args.adapters):
            write_topk_adapter(tmp / f"a{i}", base, args, seed=i)
            folders.append(tmp / f"a{i}")
        engine = engine_with(base, folders)
        file_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
        results["topk_file_bytes"] = file_bytes
        lora = None if args.no_peft else peft_lora_with(base, args.adapters, args.r)
        if not args.no_decode:
            results["decode"] = decode(args, base, engine, lora, timer)
            stacks = sum(layer.factor_slots.nbytes for layer in engine.factor_cache.layers)
            results["factor_stack_bytes"] = stacks
            results["factor_slots"] = engine.factor_cache.num_slots
            print(
                f"factor stacks: {stacks:,} bytes for {engine.factor_cache.num_slots} slots; top-k file {file_bytes:,} bytes"
            )
        del lora
        if args.compile:
            results["compile"] = compiled(args, base, engine, timer)
    if args.pool:
        results["pool"] = pool(args, timer)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
