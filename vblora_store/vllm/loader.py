"""Worker side: vLLM's LoRA loader reads a VB-LoRA folder as its exact rank-r LoRA adapter, in memory.

vLLM loads an adapter in ``WorkerLoRAManager._load_adapter``: ``PEFTHelper.from_local_dir``
reads the LoRA config, ``LoRAModel.from_local_checkpoint`` the LoRA tensors.  For
a folder whose ``adapter_config.json`` says ``VBLORA``, :func:`install` makes
that one call read the folder through vblora_store's reader (any form, any
precision, every stored value checked), refuse what vLLM cannot serve
(:func:`refusal`), and hand vLLM the config and tensors of
:mod:`vblora_store.export` (``lora_config``, ``lora_tensors``): the very
adapter ``vblora-store export-lora`` writes, never written to disk.  vLLM's own
steps (its config checks, ``from_lora_tensors``, packing q/k/v into qkv,
sharding for tensor parallelism) then run unchanged.  Every other adapter goes
through vLLM's loader untouched.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from ..config import CONFIG_NAME, PEFT_TYPE
from ..errors import AdapterNotFoundError, ServingRefusedError, VBLoRAStoreError
from ..export import lora_config, lora_tensors
from ..format import StoredAdapter, read_adapter

__all__ = [
    "MAX_LORA_RANKS", "SERVED_MODULES_TO_SAVE", "ServedModules", "is_vblora_folder", "refusal", "expand",
    "check_modules", "install",
]  # fmt: skip

#: The values vLLM accepts for ``max_lora_rank``.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The ``modules_to_save`` vLLM serves (a classification head), as its PEFTHelper checks.
SERVED_MODULES_TO_SAVE = ("classifier", "score")
_FIX_ELSEWHERE = "serve it with vblora_store's engine (VBLoRAModel) or PEFT instead"

#: The adapter being loaded by this worker thread: (folder, LoRA config, LoRA tensors).
_EXPANDED: ContextVar[Optional[tuple[str, dict, dict]]] = ContextVar("vblora_expanded", default=None)


def is_vblora_folder(path: Any) -> bool:
    """Whether ``path`` is a local folder whose ``adapter_config.json`` declares a VB-LoRA adapter.

    A missing or unparsable config is not ours: vLLM's loader reports it as it always does.

    Example:
        >>> is_vblora_folder("fixtures/tiny-llama-vblora"), is_vblora_folder("fixtures")
        (True, False)
    """
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("peft_type", "")).upper() == PEFT_TYPE


def refusal(name: str, problem: str) -> ServingRefusedError:
    """The one-line refusal of adapter ``name``; every refusal of the plugin starts the same way.

    The server turns a failed load whose message holds this start into a 400
    (:mod:`.early`).

    Example:
        >>> str(refusal("a", "trains biases; serve it elsewhere."))
        "VB-LoRA adapter 'a': trains biases; serve it elsewhere."
    """
    return ServingRefusedError(f"VB-LoRA adapter {name!r}: {problem}")


def expand(adapter: StoredAdapter, *, name: str, max_lora_rank: int) -> tuple[dict, dict]:
    """Check ``adapter`` against what vLLM's LoRA layers serve; return its LoRA config and tensors.

    Args:
        adapter: A stored VB-LoRA adapter, any form.
        name: The adapter's name in vLLM, for messages.
        max_lora_rank: The engine's ``max_lora_rank``.

    Returns:
        ``(config, tensors)``: the PEFT LoRA config dictionary and the LoRA
        tensors (float32 A ``(r, in)`` and B ``(out, r)`` per module) of
        :mod:`vblora_store.export`.

    Raises:
        ServingRefusedError: biases, ``modules_to_save`` vLLM does not serve,
            a rank above ``max_lora_rank``, or a bad stored value.

    Example:
        >>> config, tensors = expand(read_adapter("fixtures/tiny-llama-vblora"), name="a", max_lora_rank=8)
        >>> config["r"], config["lora_alpha"], len(tensors)
        (4, 4, 28)
    """
    config = adapter.config
    if config.bias != "none" or any(key.endswith(".bias") for key in adapter.other_keys):
        raise refusal(
            name,
            f"trains biases (bias={config.bias!r}), which vLLM's LoRA layers cannot add; {_FIX_ELSEWHERE}.",
        )
    unserved = sorted(set(config.modules_to_save or ()) - set(SERVED_MODULES_TO_SAVE))
    if unserved:
        raise refusal(
            name,
            f"saves whole modules {unserved} (modules_to_save), and vLLM serves only a classification head "
            f"({', '.join(SERVED_MODULES_TO_SAVE)}); {_FIX_ELSEWHERE}.",
        )
    if config.r > max_lora_rank:
        fits = [rank for rank in MAX_LORA_RANKS if rank >= config.r]
        fix = (
            f"start vLLM with max_lora_rank={fits[0]} (--max-lora-rank {fits[0]})" if fits else _FIX_ELSEWHERE
        )
        raise refusal(
            name, f"has rank r={config.r}, above the engine's max_lora_rank={max_lora_rank}; {fix}."
        )
    try:
        tensors = dict(lora_tensors(adapter))
    except VBLoRAStoreError as e:
        raise refusal(name, str(e)) from e
    return lora_config(config, list(adapter.modules)), tensors


def check_modules(adapter: StoredAdapter, *, name: str, served: "ServedModules") -> None:
    """Refuse an adapter on modules the engine puts no LoRA layer on, or whose shapes differ from the model's.

    A module kind (``q_proj``, ``down_proj``) that no layer of the engine wraps would be loaded and
    silently never applied (vLLM's ``--lora-target-modules`` narrows what it wraps): refused.  Modules
    absent from this worker (another pipeline stage's layers) are not.

    Example:
        >>> a = read_adapter("fixtures/tiny-llama-vblora")
        >>> kinds, down = {m.rsplit(".", 1)[-1] for m in a.modules}, "model.layers.0.mlp.down_proj"
        >>> check_modules(a, name="a", served=ServedModules({down: (128, 64)}, kinds))
        >>> check_modules(a, name="a", served=ServedModules({down: (256, 64)}, kinds))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vblora_store.errors.ServingRefusedError: VB-LoRA adapter 'a': model.layers.0.mlp.down_proj is ...
        >>> renamed = ServedModules({"lm." + down: (256, 64)}, kinds, lambda m: "lm." + m)  # vLLM's names
        >>> check_modules(a, name="a", served=renamed)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vblora_store.errors.ServingRefusedError: VB-LoRA adapter 'a': model.layers.0.mlp.down_proj is ...
    """
    unwrapped = sorted({module.rsplit(".", 1)[-1] for module in adapter.modules} - served.kinds)
    if unwrapped:
        raise refusal(
            name,
            f"adapts {unwrapped}, on which this engine puts no LoRA layer (it does on "
            f"{sorted(served.kinds)}); add them to --lora-target-modules (or leave it unset), or "
            f"{_FIX_ELSEWHERE}.",
        )
    for module, shape in adapter.modules.items():
        in_out = served.shapes.get(served.rename(module))
        if in_out is not None and in_out != (shape.in_features, shape.out_features):
            raise refusal(
                name,
                f"{module} is (in {shape.in_features}, out {shape.out_features}) in the adapter but "
                f"(in {in_out[0]}, out {in_out[1]}) in the served model; serve the base model it was "
                f"trained on ({adapter.config.base_model_name_or_path or 'see its adapter_config.json'}).",
            )


def _same_name(module: str) -> str:
    return module


class ServedModules(NamedTuple):
    """What an engine's worker puts LoRA layers on: full ``(in, out)`` by vLLM's module name, module kinds,
    and the model's renaming of an adapter's (Hugging Face) module name into vLLM's."""

    shapes: dict[str, tuple[int, int]]
    kinds: set[str]
    rename: Callable[[str], str] = _same_name


def _served_modules(manager: Any) -> ServedModules:
    """The modules vLLM wrapped with a LoRA layer, by the adapter's module names; computed once per manager.

    A packed module (``qkv_proj``) stands for its parts (``q_proj``, ``k_proj``,
    ``v_proj``), each with its share of the output.  Sizes are the full,
    unsharded ones (vLLM slices the LoRA tensors for tensor parallelism itself);
    a layer without plain linear sizes (the LM head) counts by kind only.
    """
    served = getattr(manager, "_vblora_served", None)
    if served is not None:
        return served
    shapes, kinds = {}, set()
    for module_name, module in manager.modules.items():
        parts = manager.packed_modules.get(module_name) or [module_name]
        kinds.update(part.rsplit(".", 1)[-1] for part in parts)
        base = getattr(module, "base_layer", None)
        in_size, out_size = getattr(base, "input_size", None), getattr(base, "output_size", None)
        if not isinstance(in_size, int) or not isinstance(out_size, int):
            continue
        sizes = getattr(base, "output_sizes", None) if len(parts) > 1 else [out_size]
        if isinstance(sizes, (list, tuple)) and len(sizes) == len(parts):
            shapes.update({part: (in_size, size) for part, size in zip(parts, sizes)})
    # Models whose vLLM names differ from Hugging Face's (Qwen2-VL's language_model.*) rename the adapter's
    # modules when vLLM loads it; look the adapter's shapes up under the same names.
    mapper = getattr(getattr(manager, "model", None), "hf_to_vllm_mapper", None)
    rename = _same_name
    if mapper is not None and hasattr(mapper, "get_rename_mapper"):
        renamer = mapper.get_rename_mapper()
        rename = lambda module: renamer._map_name(module) or module  # noqa: E731
    manager._vblora_served = served = ServedModules(shapes, kinds, rename)
    return served


def _read_and_expand(path: Any, name: str, served: ServedModules, *, max_lora_rank: int) -> tuple[dict, dict]:
    """Read the folder with vblora_store's reader, refuse what the engine cannot serve, expand it."""
    try:
        adapter = read_adapter(path)
    except AdapterNotFoundError:
        raise  # vLLM answers "not found" (404) to a FileNotFoundError
    except VBLoRAStoreError as e:
        raise refusal(name, str(e)) from e
    check_modules(adapter, name=name, served=served)
    return expand(adapter, name=name, max_lora_rank=max_lora_rank)


def _on_one_thread(work: Callable[[], Any]) -> Any:
    """``work()`` on this process's expansion thread (torch ops single-threaded); its result or error.

    Expanding is many small tensor operations.  On vLLM's CPU workers torch's
    OpenMP threads are bound to cores, and small operations spread over them
    run several times slower than on one thread (more so when other processes
    share the cores: benchmarks/bench_vllm.py).  torch's thread count is
    per-thread (OpenMP's and MKL's settings of the calling thread), so a thread
    of our own asks for one without touching the worker's; vLLM replaces
    ``torch.set_num_threads`` in its workers, hence ``torch._C``'s own.  The
    thread lives as long as the process: a fresh thread per load took a fresh
    malloc arena, whose pages fault in again on every load (about half as slow
    again at Llama2-7B shape).  One per process, made again after a fork.
    """
    global _EXPANDER
    with _EXPANDER_LOCK:
        if _EXPANDER is None or _EXPANDER[0] != os.getpid():
            import torch

            pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="vblora-expand", initializer=torch._C.set_num_threads,
                initargs=(1,),
            )  # fmt: skip
            _EXPANDER = (os.getpid(), pool)
        pool = _EXPANDER[1]
    return pool.submit(work).result()


#: The expansion thread of this process: ``(pid, executor)``.
_EXPANDER: Optional[tuple[int, ThreadPoolExecutor]] = None
_EXPANDER_LOCK = threading.Lock()


def install() -> None:
    """Wrap vLLM's worker-side adapter loading so VB-LoRA folders load as their LoRA adapter."""
    from vllm.lora import lora_model, peft_helper, worker_manager

    manager_cls = worker_manager.WorkerLoRAManager
    load_adapter = manager_cls._load_adapter
    from_local_dir = peft_helper.PEFTHelper.__dict__["from_local_dir"].__func__
    from_local_checkpoint = lora_model.LoRAModel.__dict__["from_local_checkpoint"].__func__

    def _load_adapter(self, lora_request):
        path = worker_manager.get_adapter_absolute_path(lora_request.lora_path)
        if not is_vblora_folder(path):
            return load_adapter(self, lora_request)
        name, served = lora_request.lora_name, _served_modules(self._adapter_manager)
        config, tensors = _on_one_thread(
            lambda: _read_and_expand(path, name, served, max_lora_rank=self.lora_config.max_lora_rank)
        )
        token = _EXPANDED.set((str(path), config, tensors))
        try:
            return load_adapter(self, lora_request)
        finally:
            _EXPANDED.reset(token)

    def _from_local_dir(cls, lora_path, max_position_embeddings, *args, **kwargs):
        expanded = _EXPANDED.get()
        if expanded is None or expanded[0] != str(lora_path):
            return from_local_dir(cls, lora_path, max_position_embeddings, *args, **kwargs)
        return cls.from_dict({**expanded[1], "vllm_max_position_embeddings": max_position_embeddings})

    def _from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        expanded = _EXPANDED.get()
        if expanded is None or expanded[0] != str(lora_dir):
            return from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        from vllm.lora.utils import get_lora_id

        kwargs.pop("moe_ep_spec", None)  # VB-LoRA adapts linear layers only: no expert weights to skip
        lora_id = kwargs.pop("lora_model_id", None) or get_lora_id()
        return cls.from_lora_tensors(lora_id, expanded[2], peft_helper, **kwargs)

    manager_cls._load_adapter = _load_adapter
    peft_helper.PEFTHelper.from_local_dir = classmethod(_from_local_dir)
    lora_model.LoRAModel.from_local_checkpoint = classmethod(_from_local_checkpoint)
