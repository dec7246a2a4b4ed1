"""Exact LoRA export: a VB-LoRA adapter as a PEFT LoRA adapter of the same rank.

VB-LoRA's update of a module is ``ΔW = B @ A`` with A ``(r, in)`` and B
``(out, r)`` built from the bank, and no scaling.  A PEFT LoRA adapter applies
``ΔW = (lora_alpha / r) * lora_B.weight @ lora_A.weight``, so with
``lora_alpha = r``, ``lora_A.weight = A`` and ``lora_B.weight = B`` it does
exactly what the VB-LoRA adapter does: no SVD, no base model.

:func:`lora_config` and :func:`lora_tensors` are the pure middle (config in,
dictionary out; stored tensors in, LoRA tensors out); :func:`export_lora` is the
edge that reads folders and writes one.  PEFT's LoRA key names live here, in
:func:`lora_key`, and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors.torch import save_file

from .config import CONFIG_NAME, VBLoRAConfig
from .format.atomic import atomic_folder, check_destination
from .format.conversion import SAFETENSORS_METADATA
from .format.keys import MODEL_PREFIX, WEIGHTS_NAME
from .format import StoredAdapter, read_adapters
from .factors import module_factors
from .sources import resolve_source

__all__ = ["LORA_PEFT_TYPE", "lora_key", "lora_config", "lora_tensors", "export_lora"]

LORA_PEFT_TYPE = "LORA"
#: VB-LoRA's bias modes and the LoRA modes that train (and save) the same biases.
_LORA_BIAS = {"none": "none", "all": "all", "vblora_only": "lora_only"}
#: Modules of one shape composed together: a Llama2-7B adapter's 32 layers in one go, a few MB at a time.
_GROUP = 32


def lora_key(module: str, side: str) -> str:
    """PEFT's LoRA weights key of one module side (``side`` is ``"A"`` or ``"B"``).

    Example:
        >>> lora_key("model.layers.0.self_attn.q_proj", "A")
        'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return f"{MODEL_PREFIX}{module}.lora_{side}.weight"


def lora_config(config: VBLoRAConfig, modules: list[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` of the LoRA adapter equivalent to a VB-LoRA one.

    Args:
        config: The VB-LoRA adapter's config.
        modules: The modules it adapts (full names, as in the weights file).

    Returns:
        A PEFT ``LoraConfig`` dictionary: same ``r``, ``lora_alpha = r`` (scaling
        1), ``target_modules`` = exactly ``modules`` (full names match nothing
        else, so ``layers_to_transform`` is not needed), ``fan_in_fan_out``,
        ``modules_to_save`` and ``bias`` kept (``vblora_only`` becomes
        ``lora_only``: the same biases).

    Example:
        >>> cfg = VBLoRAConfig(r=4, vector_length=16, target_modules=["q_proj"])
        >>> d = lora_config(cfg, ["model.layers.0.self_attn.q_proj"])
        >>> d["peft_type"], d["r"], d["lora_alpha"], d["target_modules"]
        ('LORA', 4, 4, ['model.layers.0.self_attn.q_proj'])
    """
    return {
        "peft_type": LORA_PEFT_TYPE,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "auto_mapping": config.auto_mapping,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.r,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": config.vblora_dropout,
        "target_modules": sorted(modules),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": _LORA_BIAS[config.bias],
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": True,
    }


def lora_tensors(adapter: StoredAdapter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the LoRA adapter's tensors ``(key, tensor)``, one module at a time.

    A full adapter's factors are built as PEFT's forward builds them (top-k of
    the logits, softmax), in float32 as PEFT computes; a top-k or packed
    adapter's from its stored indices and weights.  Every other stored tensor
    (``modules_to_save`` copies, trained biases) is yielded unchanged: PEFT's
    LoRA names them exactly as VB-LoRA does.

    Args:
        adapter: A stored VB-LoRA adapter, any form.

    Returns:
        An iterator over ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
        ``(out, r)`` of each module, then the other tensors.

    Example:
        >>> from vblora_store import read_adapter
        >>> tensors = dict(lora_tensors(read_adapter("fixtures/tiny-llama-vblora")))
        >>> len(tensors), tuple(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape)
        (28, (4, 64))
    """
    for module, a, b in module_factors(adapter, dtype=torch.float32, group=_GROUP):
        yield lora_key(module, "A"), a.contiguous()
        yield lora_key(module, "B"), b.contiguous()
    for key in adapter.other_keys:
        yield key, adapter.checked_tensor(key)


def export_lora(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    force: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> list[StoredAdapter]:
    """Write every adapter of the folder ``src`` as a PEFT LoRA adapter into ``dst``, atomically.

    The layout is kept (``default`` at the root, other adapters in
    sub-folders).  Every stored value is checked as it is read (finite,
    indices in range); nothing appears at ``dst`` unless every adapter exported.

    Args:
        src: A PEFT VB-LoRA adapter folder, any form (full, top-k, packed), or a Hub repo id.
        dst: The folder to create.
        force: Replace ``dst`` if it exists.
        revision, subfolder: Of a repo id (or a sub-folder of a local ``src``).

    Returns:
        The adapters as read from ``src``.

    Raises:
        AdapterNotFoundError, InvalidConfigError, InvalidAdapterError: ``src``
            is not a readable VB-LoRA adapter.
        DestinationExistsError: ``dst`` exists and ``force`` is false.

    Example:
        >>> [a.name for a in export_lora("fixtures/tiny-llama-vblora", tmp / "lora")]
        ['default']
        >>> import json; json.loads((tmp / "lora" / "adapter_config.json").read_text())["peft_type"]
        'LORA'
    """
    src = resolve_source(src, revision=revision, subfolder=subfolder)
    check_destination(dst, force=force, sources=(src,))
    adapters = read_adapters(src)
    with atomic_folder(dst, force=force) as work:
        for adapter in adapters:
            folder = work if adapter.folder == src else work / adapter.name
            folder.mkdir(parents=True, exist_ok=True)
            config = lora_config(adapter.config, list(adapter.modules))
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            save_file(dict(lora_tensors(adapter)), str(folder / WEIGHTS_NAME), metadata=SAFETENSORS_METADATA)
    return adapters
