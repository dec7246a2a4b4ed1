"""``get_layer_status`` and ``get_model_status``: PEFT's view of which adapter is where, and in what state.

The fields and their meaning are PEFT's (``peft.peft_model.TunerLayerStatus``
and ``TunerModelStatus``), so code that inspects a PEFT model reads these the
same way; ``module_type`` names this package's classes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from .layer import VBLoRALinear
from .trainable import ModulesToSave

__all__ = ["LayerStatus", "ModelStatus", "layer_status", "model_status"]

Irregular = Literal["irregular"]


@dataclass
class LayerStatus:
    """One adapter layer or ``modules_to_save`` wrapper (PEFT's ``TunerLayerStatus``)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: None = None


@dataclass
class ModelStatus:
    """The whole model (PEFT's ``TunerModelStatus``); ``"irregular"`` where layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: None = None


def _agreement(values: list) -> Union[bool, Irregular]:
    return True if all(values) else False if not any(values) else "irregular"


def _adapter_tensors(module: nn.Module) -> dict[str, list]:
    """The parameters (and, for top-k adapters, the bank's stand-ins) of each adapter in ``module``."""
    found: dict[str, list] = defaultdict(list)
    if isinstance(module, VBLoRALinear):
        for holder in (module.vblora_logits_A, module.vblora_logits_B):
            for adapter, param in holder.items():
                found[adapter].append(param)
        for adapter in module.topk_slices:
            found[adapter] += list(module._topk_store[adapter].buffers())
    else:
        for adapter, copy in module.modules_to_save.items():
            found[adapter] += list(copy.parameters())
    return found


def layer_status(tuner: nn.Module) -> list[LayerStatus]:
    """The status of every adapter layer and wrapper of ``tuner`` (a ``VBLoRATuner``), in model order.

    Raises:
        ValueError: the model holds no adapter layer (as PEFT).
    """
    out = []
    for name, module in tuner.named_modules():
        if not isinstance(module, (VBLoRALinear, ModulesToSave)):
            continue
        tensors = _adapter_tensors(module)
        available = module.adapters if isinstance(module, VBLoRALinear) else list(module.modules_to_save)
        out.append(
            LayerStatus(
                name=name,
                module_type=type(module).__name__,
                enabled=not module.disable_adapters,
                active_adapters=[a for a in module.active_adapters if a in available],
                merged_adapters=list(getattr(module, "merged_adapters", [])),
                requires_grad={
                    adapter: _agreement([t.requires_grad for t in ts])
                    for adapter, ts in tensors.items()
                    if ts
                },
                available_adapters=sorted(available),
                devices={adapter: sorted({t.device.type for t in ts}) for adapter, ts in tensors.items()},
            )
        )
    if not out:
        raise ValueError("No adapter layers found in the model; add or load an adapter first.")
    return out


def model_status(model: nn.Module, tuner: nn.Module) -> ModelStatus:
    """The status of ``model`` (a ``VBLoRAModel``) as a whole."""
    layers = layer_status(tuner)
    trainable, total = model.get_nb_trainable_parameters()

    def one(values: list):
        distinct = {tuple(v) if isinstance(v, list) else v for v in values}
        if len(distinct) == 1:
            value = distinct.pop()
            return list(value) if isinstance(value, tuple) else value
        return "irregular"

    requires_grad: dict[str, list] = defaultdict(list)
    devices: dict[str, set] = defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            requires_grad[adapter].append(value)
        for adapter, types in status.devices.items():
            devices[adapter].update(types)
    merged = sorted({a for s in layers for a in s.merged_adapters})
    merged_ok = all(set(s.merged_adapters) == set(merged) & set(s.available_adapters) for s in layers)
    return ModelStatus(
        base_model_type=type(tuner.model).__name__,
        adapter_model_type=type(tuner).__name__,
        peft_types={adapter: "VBLORA" for adapter in tuner.peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=one([s.enabled for s in layers]),
        active_adapters=one([s.active_adapters for s in layers if s.active_adapters]) if layers else [],
        merged_adapters=merged if merged_ok else "irregular",
        requires_grad={a: (v[0] if len(set(v)) == 1 else "irregular") for a, v in requires_grad.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(v) for a, v in devices.items()},
    )
