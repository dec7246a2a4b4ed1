"""Injecting an adapter: planned and checked before the model is touched, then carried out.

PEFT's rules: a task head is added to ``modules_to_save`` (``SEQ_CLS``, ...),
``fan_in_fan_out`` is corrected for ``Conv1D`` and ``Linear`` with a warning,
every target's sizes must divide by ``vector_length``, and a stored adapter's
modules must be exactly the model's targets.  :func:`plan_targets` checks all
of it; :func:`wrap_adapter` then wraps the planned layers and gives them the
adapter, fresh or from its files (PEFT's ``inject_adapter`` and
``_create_and_replace``).  :class:`~vblora_store.engine.tuner.VBLoRATuner`
calls both, and undoes a half-done injection.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..config import VBLoRAConfig
from ..errors import TargetingError
from ..factors import module_sides
from ..format.keys import BANK_KEY
from ..format.stored import StoredAdapter
from ..storage_forms import StorageForm
from .layer import VBLoRALinear
from .state import load_other_tensors
from .targeting import (
    CLASSIFIER_HEADS, check_fits, conv1d_class, find_targets, layer_features, resolve_target_modules,
)  # fmt: skip
from .topk_store import TopKSlice, TopKTensors
from .trainable import ModulesToSave

__all__ = ["prepared_config", "fan_in_fan_out", "plan_targets", "wrap_adapter", "add_modules_to_save"]

_WRAPPERS = (VBLoRALinear,)


def prepared_config(config: VBLoRAConfig, model: nn.Module) -> VBLoRAConfig:
    """``config`` itself, completed in place as PEFT's: the task head in ``modules_to_save``, and no
    ``target_modules`` replaced by the model type's defaults (which the saved config then names)."""
    if config.target_modules is None:
        config.target_modules = list(resolve_target_modules(model, config))
    heads = CLASSIFIER_HEADS.get(str(config.task_type), [])
    if heads:
        config.modules_to_save = list(config.modules_to_save or []) + [
            h for h in heads if h not in (config.modules_to_save or [])
        ]
    return config


def fan_in_fan_out(config: VBLoRAConfig, base: nn.Module, name: str) -> bool:
    """PEFT's correction: False for a Linear, True for a Conv1D, warning if the config disagrees."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not config.fan_in_fan_out:
            warnings.warn(f"{name}: fan_in_fan_out is False but the target is Conv1D; setting it to True.")
            config.fan_in_fan_out = True
    elif config.fan_in_fan_out:
        warnings.warn(f"{name}: fan_in_fan_out is True but the target is nn.Linear; setting it to False.")
        config.fan_in_fan_out = False
    return config.fan_in_fan_out


def plan_targets(
    model: nn.Module, config: VBLoRAConfig, stored: Optional[StoredAdapter]
) -> list[tuple[str, nn.Module, bool]]:
    """``(name, base layer, fan_in_fan_out)`` of every target, all checked; the model is not touched."""
    names = find_targets(model, config, modules_to_save=list(config.modules_to_save or []), skip=_WRAPPERS)
    if stored is not None and set(names) != set(stored.modules):
        missing = sorted(set(stored.modules) - set(names))[:3]
        extra = sorted(set(names) - set(stored.modules))[:3]
        raise TargetingError(
            f"{stored.folder}: the adapter's modules do not match this model's targets (in the file "
            f"only: {missing}; targeted but absent from the file: {extra}); load it on the model it "
            "was trained on."
        )
    plan = []
    for name in names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, VBLoRALinear) else module
        fan = fan_in_fan_out(config, base, name)
        check_fits(name, *layer_features(base, fan), config.vector_length)
        plan.append((name, base, fan))
    return plan


def wrap_adapter(
    tuner,
    adapter: str,
    config: VBLoRAConfig,
    stored: Optional[StoredAdapter],
    plan,
    *,
    meta: bool,
    autocast: bool,
) -> None:
    """Give ``adapter`` to every planned layer of ``tuner`` (a ``VBLoRATuner``), then its bank and copies.

    Each planned layer is wrapped (or its wrapper reused) and gets the adapter:
    fresh, drawn from the random generator in PEFT's order (the bank redrawn
    for every module, the last draw kept; each module's logits after it), or
    from ``stored`` through the checked reads, a top-k adapter's indices and
    weights into one flat :class:`TopKTensors`.  Then the bank, the
    ``modules_to_save`` copies and the other stored tensors (biases).  The
    tuner removes what was added if this fails half-way.
    """

    def dtype_beside(like: torch.Tensor) -> torch.dtype:
        """PEFT's dtype rule: the layer's dtype, and with ``autocast_adapter_dtype`` half precision as float32."""
        half = like.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if autocast and half else like.dtype

    def widen(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return value.to(dtype_beside(like)) if value.is_floating_point() else value

    tuner.peft_config[adapter] = config
    tuner.storage_form[adapter] = StorageForm.FULL if stored is None else stored.form
    n, length, bound = config.num_vectors, config.vector_length, config.init_vector_bank_bound
    bank = torch.zeros(n, length, device="meta" if meta else "cpu")
    topk_indices, topk_weights, start = [], [], 0
    for name, base, fan in plan:
        module = tuner.model.get_submodule(name)
        if not isinstance(module, VBLoRALinear):
            module = VBLoRALinear(
                base, tuner.vblora_vector_bank, name=name, fan_in_fan_out=fan,
                topk_store=tuner.vblora_topk, cache=tuner.factor_cache, route=tuner._route,
            )  # fmt: skip
            tuner._set_child(name, module)
        target = base.weight.device  # beside its layer, wherever the file was read (PEFT's torch_device)
        if stored is None:
            if not meta:
                bank.uniform_(-bound, bound)  # PEFT redraws the bank per module; the last draw is kept
            module.add_full(adapter, config, device="meta" if meta else target, dtype=dtype_beside(base.weight))
        elif stored.form.has_logits:
            sides = module_sides(stored, name)  # the one door: checked reads
            module.add_full(adapter, config, *[widen(sides[side][0], base.weight).to(target) for side in "AB"])
        else:
            sides = module_sides(stored, name)
            (a_idx, a_w), (b_idx, b_w) = [(i, widen(w, base.weight)) for i, w in (sides["A"], sides["B"])]
            where = TopKSlice(start, tuple(a_idx.shape[:2]), tuple(b_idx.shape[:2]))
            # Sizes spelled out: with topk=1 the weights hold no element, and reshape(-1, 0) is ambiguous.
            for part in (a_idx, b_idx):
                rows, cols, k = part.shape
                topk_indices.append(part.reshape(rows * cols, k))  # (rows, cols, k) -> (slots, k)
            for part in (a_w, b_w):
                rows, cols, k_less = part.shape
                topk_weights.append(part.reshape(rows * cols, k_less))  # (rows, cols, k-1) -> (slots, k-1)
            start = where.b_slots.stop
            module.add_topk(adapter, config, where)
        if name not in tuner.targeted_module_names:
            tuner.targeted_module_names.append(name)
    first = plan[0][1].weight
    device = first.device
    if stored is not None:
        bank = widen(stored.checked_tensor(BANK_KEY), first)
    if topk_indices:
        tuner.vblora_topk[adapter] = TopKTensors(
            torch.cat(topk_indices).to(device), torch.cat(topk_weights).to(device)
        )
    if stored is None:
        bank = bank.to(dtype_beside(first))  # drawn in float32, as PEFT draws it, then cast
    tuner.vblora_vector_bank[adapter] = nn.Parameter(bank if meta else bank.to(device))
    add_modules_to_save(tuner, adapter, list(config.modules_to_save or []))
    if stored is not None:
        load_other_tensors(tuner.model, stored, adapter)


def add_modules_to_save(tuner, adapter: str, names: list[str]) -> None:
    """Give ``adapter`` its own trainable copy of each module that ``names`` match (``modules_to_save``)."""
    # PEFT's rule (``_set_trainable``): a plain suffix match, so "norm" also takes "input_layernorm".
    for key, module in list(tuner.model.named_modules()):
        if not key or not any(key.endswith(n) for n in names):
            continue
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, name=key, route=tuner._route)
            tuner._set_child(key, module)
        module.add_adapter(adapter)
