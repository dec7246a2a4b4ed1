"""Which modules an adapter wraps: PEFT's matching rules, reproduced exactly.

The rules (``peft.tuners.tuners_utils.check_target_module_exists``):

* ``exclude_modules`` wins: a list entry matches a name equal to it or ending
  in ``"." + entry``; a string must match the whole name as a regex.
* A module under a ``modules_to_save`` name is never adapted.
* ``target_modules`` as a string is a full regex match; as a list, an entry
  matches a name equal to it or ending in ``"." + entry``; ``"all-linear"``
  takes every ``Linear``/``Conv1D`` except the output embedding (or the
  classification head of a ``SEQ_CLS`` model); ``None`` takes PEFT's default
  targets for the model type.
* ``layers_to_transform`` (with optional ``layers_pattern``) keeps list matches
  whose layer index (the first number after ``<pattern>.``) is listed.

transformers is optional: ``Conv1D`` is looked up lazily and simply absent
when transformers is not installed.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from ..config import VBLoRAConfig
from ..errors import TargetingError

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "CLASSIFIER_HEADS",
    "conv1d_class",
    "adaptable_classes",
    "resolve_target_modules",
    "is_excluded",
    "is_targeted",
    "find_targets",
    "layer_features",
    "check_fits",
]

ALL_LINEAR = "all-linear"

# PEFT's TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING: the targets used when target_modules is None.
DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# Heads PEFT's task-specific models add to modules_to_save (PeftModelFor<Task>).
CLASSIFIER_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` class, or ``None`` when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def adaptable_classes() -> tuple[type, ...]:
    """The module classes the engine can wrap: ``nn.Linear`` and, if available, ``Conv1D``."""
    conv1d = conv1d_class()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _matches_name(entries: Union[list[str], str], name: str) -> bool:
    """A regex string must match the whole name; a list entry equals it or is a ``.``-suffix of it."""
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return name in entries or any(name.endswith(f".{entry}") for entry in entries)


def _output_head_names(model: nn.Module, config: VBLoRAConfig) -> set[str]:
    """The output layer ``all-linear`` leaves out, found the way PEFT finds it."""
    head = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in CLASSIFIER_HEADS["SEQ_CLS"] if hasattr(model, n)), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def resolve_target_modules(
    model: nn.Module, config: VBLoRAConfig, wrappers: tuple[type, ...] = ()
) -> Union[list[str], str]:
    """The concrete ``target_modules`` for ``model``: expands ``None`` and ``"all-linear"``.

    Args:
        model: The model to adapt.
        config: The adapter's config.
        wrappers: Engine wrapper classes; ``all-linear`` takes them, not the layers inside them.

    Returns:
        A regex string or a list of names, as PEFT would use them.

    Raises:
        TargetingError: ``target_modules`` is ``None`` and the model type has no default.

    Example:
        >>> resolve_target_modules(nn.Sequential(nn.Linear(4, 4)), VBLoRAConfig(target_modules="all-linear"))
        ['0']
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise TargetingError(
                f"target_modules is not set and model type {model_type!r} has no default targets; "
                "set target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
            )
        return DEFAULT_TARGET_MODULES[model_type]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        classes = adaptable_classes() + wrappers
        heads = _output_head_names(model, config)
        inside = [n + "." for n, m in model.named_modules() if isinstance(m, wrappers)]
        return sorted(
            n
            for n, m in model.named_modules()
            if n and isinstance(m, classes) and n not in heads and not any(n.startswith(p) for p in inside)
        )
    return targets


def is_excluded(config: VBLoRAConfig, name: str, modules_to_save: list[str]) -> bool:
    """Whether ``exclude_modules`` or ``modules_to_save`` rules ``name`` out."""
    if config.exclude_modules and _matches_name(config.exclude_modules, name):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _layer_index(config: VBLoRAConfig, name: str) -> Optional[int]:
    """The layer index in ``name``: the first number after ``<layers_pattern>.`` (any segment if unset)."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def is_targeted(config: VBLoRAConfig, targets: Union[list[str], str], name: str) -> bool:
    """Whether ``targets`` (from :func:`resolve_target_modules`) and the layer filter select ``name``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(config, name)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def find_targets(
    model: nn.Module,
    config: VBLoRAConfig,
    *,
    modules_to_save: list[str],
    skip: tuple[type, ...] = (),
) -> list[str]:
    """Names of the modules of ``model`` that the adapter wraps, in model order.

    Args:
        model: The model to adapt.
        config: The adapter's config.
        modules_to_save: Module names trained in full; never adapted.
        skip: Module classes whose children are engine internals (not matched).

    Returns:
        The matched module names.

    Raises:
        TargetingError: nothing matched, or a match is not a Linear/Conv1D.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> find_targets(net, VBLoRAConfig(target_modules=["0"]), modules_to_save=[])
        ['0']
    """
    targets = resolve_target_modules(model, config, skip)
    classes = adaptable_classes() + skip
    internal: list[str] = []
    found, excluded = [], 0
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in internal):
            continue
        if isinstance(module, skip):
            internal.append(name + ".")
        if is_excluded(config, name, modules_to_save):
            excluded += 1
        elif is_targeted(config, targets, name):
            if not isinstance(module, classes):
                raise TargetingError(
                    f"module {name!r} matches target_modules but is a {type(module).__name__}; VB-LoRA wraps "
                    "torch.nn.Linear and transformers' Conv1D only. Narrow target_modules to those layers."
                )
            found.append(name)
    if not found:
        why = " (every match was excluded by exclude_modules or modules_to_save)" if excluded else ""
        layers = ""
        if config.layers_to_transform is not None:
            layers = f" with layers_to_transform={config.layers_to_transform}"
            layers += f" layers_pattern={config.layers_pattern}"
        raise TargetingError(
            f"target_modules={targets!r}{layers} matched no module of {type(model).__name__}{why}; "
            "check the names with [n for n, _ in model.named_modules()]."
        )
    return found


def layer_features(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer.

    A ``Linear`` stores its weight ``(out, in)``, a ``Conv1D`` (``fan_in_fan_out``) ``(in, out)``.
    """
    rows, cols = base_layer.weight.shape  # Linear: (out, in); Conv1D: (in, out)
    return (rows, cols) if fan_in_fan_out else (cols, rows)


def check_fits(module: str, in_features: int, out_features: int, vector_length: int) -> None:
    """Raise :class:`TargetingError` naming ``module`` if a size is not a multiple of ``vector_length``."""
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size % vector_length:
            raise TargetingError(
                f"module {module!r}: {what}={size} is not divisible by vector_length={vector_length}; "
                "pick a vector_length dividing every targeted layer's sizes, or exclude this module "
                "(exclude_modules)."
            )
