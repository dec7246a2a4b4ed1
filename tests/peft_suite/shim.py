"""Points PEFT's public entry points at vblora_store, before PEFT's test modules import them.

PEFT's tests write ``from peft import get_peft_model, PeftModel, VBLoRAConfig, ...``;
:func:`install` replaces those names on the ``peft`` module so that every VB-LoRA
config, model and file goes to vblora_store, and anything else (the other PEFT
methods some parametrizations name) still goes to PEFT. Only names a PEFT user
would import are replaced; PEFT's internals are left as they are.
"""

from __future__ import annotations

import json
import os
from typing import Any

import peft
import torch

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel, functions, lora_conversion

_REAL = {name: getattr(peft, name) for name in (
    "get_peft_model", "PeftModel", "inject_adapter_in_model", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "get_base_model_state_dict", "set_base_model_state_dict", "convert_to_lora")}  # fmt: skip
_REAL_CONFIG = peft.VBLoRAConfig


def _is_vblora_config(config: Any) -> bool:
    return isinstance(config, (VBLoRAConfig, _REAL_CONFIG)) or str(getattr(config, "peft_type", "")).endswith("VBLORA")


def _is_ours(model: Any) -> bool:
    return isinstance(model, VBLoRAModel) or functions.holds_vblora_store_adapters(model)


def _saved_vblora(model_id: Any, kwargs: dict) -> bool:
    if kwargs.get("config") is not None:
        return _is_vblora_config(kwargs["config"])
    folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            return json.load(f).get("peft_type") == "VBLORA"
    except (OSError, ValueError):
        return True  # not a local adapter: ours says what is wrong with it


def get_peft_model(model: torch.nn.Module, peft_config: Any, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Any = None, low_cpu_mem_usage: bool = False) -> Any:
    """PEFT's ``get_peft_model``: a ``VBLoRAModel`` for a VB-LoRA config, PEFT's model for any other."""
    if not _is_vblora_config(peft_config):
        return _REAL["get_peft_model"](model, peft_config, adapter_name, mixed, autocast_adapter_dtype, revision,
                                       low_cpu_mem_usage)  # fmt: skip
    if mixed:
        raise TypeError("get_peft_model(mixed=True): vblora_store has no mixed-method model")
    if revision is not None:
        peft_config.revision = revision
    return VBLoRAModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                       autocast_adapter_dtype=autocast_adapter_dtype)  # fmt: skip


class _PeftModelType(type):
    """``isinstance(m, PeftModel)`` holds for ours and PEFT's; calling it builds the one that fits the config."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, (VBLoRAModel, _REAL["PeftModel"]))

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, (VBLoRAModel, _REAL["PeftModel"]))

    def __call__(cls, model: torch.nn.Module, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        target = VBLoRAModel if _is_vblora_config(peft_config) else _REAL["PeftModel"]
        return target(model, peft_config, *args, **kwargs)


class PeftModel(metaclass=_PeftModelType):
    """PEFT's ``PeftModel`` name: ``from_pretrained`` of a VB-LoRA adapter gives a ``VBLoRAModel``."""

    @staticmethod
    def from_pretrained(model: torch.nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        target = VBLoRAModel if _saved_vblora(model_id, kwargs) else _REAL["PeftModel"]
        return target.from_pretrained(model, model_id, *args, **kwargs)


def convert_to_lora(model: Any, rank: Any, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: Any = None) -> Any:
    """PEFT's ``convert_to_lora``: ours returns the config as a dictionary; PEFT's callers get a ``LoraConfig``."""
    if not _is_ours(model):
        return _REAL["convert_to_lora"](model, rank, adapter_name, progressbar, compile_kwargs)
    # progressbar and compile_kwargs are PEFT's speed and display options; they change nothing in the result
    config, state_dict = lora_conversion.convert_to_lora(model, rank, adapter_name)
    return peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}), state_dict


def _dispatch(name: str, ours: Any, is_ours: Any) -> Any:
    def call(first: Any, *args: Any, **kwargs: Any) -> Any:
        return (ours if is_ours(first, args) else _REAL[name])(first, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call



def install() -> None:
    """Replace PEFT's public names with ours (VB-LoRA) or dispatchers (VB-LoRA to us, the rest to PEFT)."""
    replacements = {
        "VBLoRAConfig": VBLoRAConfig,
        "get_peft_model": get_peft_model,
        "PeftModel": PeftModel,
        "inject_adapter_in_model": _dispatch(
            "inject_adapter_in_model", functions.inject_adapter_in_model, lambda cfg, _: _is_vblora_config(cfg)),
        "get_peft_model_state_dict": _dispatch(
            "get_peft_model_state_dict", functions.get_peft_model_state_dict, lambda m, _: _is_ours(m)),
        "set_peft_model_state_dict": _dispatch(
            "set_peft_model_state_dict", functions.set_peft_model_state_dict, lambda m, _: _is_ours(m)),
        "convert_to_lora": convert_to_lora,
        "get_base_model_state_dict": _dispatch(
            "get_base_model_state_dict", functions.get_base_model_state_dict, lambda m, _: _is_ours(m)),
        "set_base_model_state_dict": _dispatch(
            "set_base_model_state_dict", functions.set_base_model_state_dict, lambda m, _: _is_ours(m)),
    }  # fmt: skip
    for name, value in replacements.items():
        setattr(peft, name, value)
