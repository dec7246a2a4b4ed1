"""Planning an adapter's injection: which layers, checked, before the model is touched.

PEFT's rules: a task head is added to ``modules_to_save`` (``SEQ_CLS``, ...),
``fan_in_fan_out`` is corrected for ``Conv1D`` and ``Linear`` with a warning,
every target's sizes must divide by ``vector_length``, and a stored adapter's
modules must be exactly the model's targets.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from torch import nn

from ..config import VBLoRAConfig
from ..errors import TargetingError
from ..format.stored import StoredAdapter
from .layer import VBLoRALinear
from .targeting import CLASSIFIER_HEADS, check_fits, conv1d_class, find_targets, layer_features

__all__ = ["prepared_config", "fan_in_fan_out", "plan_targets"]

_WRAPPERS = (VBLoRALinear,)


def prepared_config(config: VBLoRAConfig) -> VBLoRAConfig:
    """A copy of ``config`` with the task head PEFT adds to ``modules_to_save``."""
    config = dataclasses.replace(config)
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
