"""PEFT's module-level adapter functions for a ``VBLoRAModel``: injection and adapter state dicts.

``get_peft_model_state_dict(model)`` gives exactly the tensors
``save_pretrained`` writes for one adapter, under the same keys (PEFT's, with no
adapter name: ``base_model.model.lin0.vblora_logits_A``,
``base_model.vblora_vector_bank``), in the form its config names (full logits, or
top-k indices and weights with ``save_only_topk_weights``).
``set_peft_model_state_dict(model, state_dict)`` puts such a dict into an adapter
the model already holds, as PEFT does: a top-k dict becomes logits that are
``-inf`` outside the top k.  ``inject_adapter_in_model`` refuses VB-LoRA, as
PEFT does: the vector bank is state shared by every layer and lives on the tuner.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..errors import AdapterNotFoundError, InvalidArgumentError, UnsupportedConversionError
from ..format.keys import BANK_KEY, index_dtype, logits_key, parse_key
from ..topk import select_topk
from .layer import VBLoRALinear
from .model import VBLoRAModel
from .saving import embedding_tensors, saved_config
from .trainable import ModulesToSave
from .state import adapter_layers, adapter_state_dict, embedding_parameters, other_parameters

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]


def inject_adapter_in_model(
    peft_config: Any,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """PEFT's ``inject_adapter_in_model``, which refuses VB-LoRA: always raises, with PEFT's reason.

    VB-LoRA's layers share one vector bank, held by the tuner, so a bare model
    with the layers injected would have no bank; PEFT refuses it with a
    ``ValueError`` and so do we.  Use ``VBLoRAModel(model, config)`` instead.

    Args:
        peft_config: The adapter's config (ours or PEFT's ``VBLoRAConfig``).
        model: The model PEFT would inject the layers into; left untouched.
        adapter_name: PEFT's argument, unused.
        low_cpu_mem_usage: PEFT's argument, unused.
        state_dict: PEFT's argument, unused.

    Returns:
        Never returns.

    Raises:
        InvalidArgumentError: always (a ``ValueError``, as PEFT's).

    Example:
        >>> from vblora_store import VBLoRAConfig
        >>> inject_adapter_in_model(VBLoRAConfig(target_modules=["q_proj"]), base)
        Traceback (most recent call last):
        ...
        vblora_store.errors.InvalidArgumentError: inject_adapter_in_model: VB-LoRA keeps its vector bank ...
    """
    raise InvalidArgumentError(
        "inject_adapter_in_model: VB-LoRA keeps its vector bank on the tuner, shared state of every layer, "
        "so it cannot be injected into a bare model; use VBLoRAModel(model, config) (PEFT: get_peft_model) "
        "instead."
    )


def get_peft_model_state_dict(
    model: VBLoRAModel,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[bool, str] = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors as ``save_pretrained`` writes them, under PEFT's keys (PEFT's function).

    Args:
        model: The ``VBLoRAModel``.
        state_dict: Take the values from this state dict of ``model`` (its own
            keys, as ``model.state_dict()`` names them) instead of the live model.
        adapter_name: The adapter.
        unwrap_compiled: Unwrap a ``torch.compile``-d model first.
        save_embedding_layers: Add the embedding layers (``True``), or only when
            the vocabulary was resized (``"auto"``), as ``save_pretrained`` does.

    Returns:
        PEFT's key -> tensor, in the form the adapter's config names
        (``save_only_topk_weights``: indices and weights).

    Raises:
        AdapterNotFoundError: no adapter of that name.
        UnsupportedConversionError: the full form of an adapter held in top-k
            form, or ``state_dict`` for one (its logits are gone).

    Example:
        >>> sd = get_peft_model_state_dict(model)
        >>> sorted(sd)[:2]
        ['base_model.model.model.layers.0.mlp.down_proj.vblora_logits_A', 'base_model.model.model.layers.0.mlp.down_proj.vblora_logits_B']
    """
    model = _peft_model(model, unwrap_compiled)
    tuner = model.base_model
    config = _config(model, adapter_name)
    topk = bool(config.save_only_topk_weights)
    saved = saved_config(tuner.model, config, topk=topk)
    out = adapter_state_dict(tuner.model, tuner.vblora_vector_bank[adapter_name], adapter_name, saved, topk=topk)
    if state_dict is not None:
        out = _values_from(model, state_dict, adapter_name, out, topk=topk, num_vectors=config.num_vectors)
    for key, param in embedding_tensors(tuner.model, config, save_embedding_layers).items():
        out[key] = param.detach()
    return out


def set_peft_model_state_dict(
    model: VBLoRAModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Put PEFT-keyed tensors (as :func:`get_peft_model_state_dict` gives them) into an adapter of ``model``.

    As PEFT does, the values go into the adapter's existing parameters through
    ``model.load_state_dict(strict=False)``; top-k indices and weights become
    logits that are ``-inf`` outside the top k (the adapter then runs exactly as
    the top-k adapter, and cannot be trained).

    Args:
        model: The ``VBLoRAModel`` holding ``adapter_name`` (made with
            ``VBLoRAModel(model, config)`` or ``add_adapter``).
        peft_model_state_dict: PEFT's key -> tensor.
        adapter_name: The adapter to fill.
        ignore_mismatched_sizes: Skip tensors whose shape differs from the
            model's (with a warning) instead of raising.
        low_cpu_mem_usage: Assign the tensors instead of copying them (fills an
            adapter allocated on the ``meta`` device).

    Returns:
        ``load_state_dict``'s ``(missing_keys, unexpected_keys)``, in the model's
        keys; a key with no place in the adapter is unexpected.

    Raises:
        AdapterNotFoundError: no adapter of that name.
        UnsupportedConversionError: the adapter is held in top-k form (it has
            no logits to set).

    Example:
        >>> sd = get_peft_model_state_dict(model)
        >>> set_peft_model_state_dict(model, sd).unexpected_keys
        []
    """
    model = _peft_model(model, unwrap_compiled=True)
    config = _config(model, adapter_name)
    places = _model_keys(model, adapter_name)
    num_vectors = config.num_vectors
    remapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    own = model.state_dict()
    for key, value in peft_model_state_dict.items():
        parts = parse_key(key)
        if parts is not None and parts.part == "weights":
            continue  # read with its indices
        if parts is not None and parts.part == "indices":
            weights_key = key.replace("_topk_indices", "_topk_weights")
            if weights_key not in peft_model_state_dict:
                raise InvalidArgumentError(
                    f"the state dict holds {key!r} but not {weights_key!r}; top-k indices need their weights "
                    "(pass the state dict get_peft_model_state_dict gave, whole)."
                )
            weights = peft_model_state_dict[weights_key]
            key, value = logits_key(parts.module, parts.side), _logits_from_topk(value, weights, num_vectors)
        if key in places or key in own:  # PEFT's keys of other tensors (a bias the adapter trains) are the model's
            remapped[places.get(key, key)] = value
        else:
            unexpected.append(key)
    loadable, mismatched = {}, []
    for key, value in remapped.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape) and ignore_mismatched_sizes:
            mismatched.append(f"- {key}: found shape {list(value.shape)} in the checkpoint and "
                              f"{list(own[key].shape)} in the model instantiated")  # fmt: skip
            continue
        loadable[key] = value
    result = model.load_state_dict(loadable, strict=False, assign=low_cpu_mem_usage)
    if mismatched:
        warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the model checkpoint "
                      "and are being ignored because you passed `ignore_mismatched_sizes=True`: "
                      + "\n".join(mismatched))  # fmt: skip
    for layer in model.base_model.adapted_layers():
        layer.clear_cache()
    return _IncompatibleKeys(result.missing_keys, result.unexpected_keys + unexpected)


def get_base_model_state_dict(model: VBLoRAModel) -> dict[str, torch.Tensor]:
    """The wrapped model's own state dict, under the keys it had before any adapter (PEFT's function).

    Adapter tensors are left out and the wrappers' infixes dropped
    (``lin0.base_layer.weight`` -> ``lin0.weight``; a ``modules_to_save`` head's
    original module, not its copies).

    Args:
        model: The ``VBLoRAModel``.

    Returns:
        Original key -> tensor.

    Example:
        >>> "model.layers.0.self_attn.q_proj.weight" in get_base_model_state_dict(model)
        True
    """
    model = _peft_model(model, unwrap_compiled=True)
    own = model.base_model.model.state_dict()
    return {original: own[key] for original, key in _original_keys(model).items()}


def set_base_model_state_dict(
    model: VBLoRAModel, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load a state dict keyed as the model was before any adapter into the wrapped model (PEFT's function).

    Args:
        model: The ``VBLoRAModel``.
        state_dict: Original key -> tensor (as :func:`get_base_model_state_dict` gives).
        strict: Raise on a missing or unexpected key (nothing is loaded then).

    Returns:
        ``(missing_keys, unexpected_keys)``, in the original keys.

    Raises:
        RuntimeError: ``strict`` and keys missing or unexpected (as torch's and PEFT's).

    Example:
        >>> set_base_model_state_dict(model, get_base_model_state_dict(model)).missing_keys
        []
    """
    model = _peft_model(model, unwrap_compiled=True)
    places = _original_keys(model)
    unexpected = [key for key in state_dict if key not in places]
    missing = [key for key in places if key not in state_dict]
    if strict and (missing or unexpected):
        problems = [f"{what} key(s) in state_dict: {keys}"
                    for what, keys in (("Missing", missing), ("Unexpected", unexpected)) if keys]  # fmt: skip
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(problems))
    loadable = {places[key]: value for key, value in state_dict.items() if key in places}
    model.base_model.model.load_state_dict(loadable, strict=False)
    return _IncompatibleKeys(missing, unexpected)


def _original_keys(model: VBLoRAModel) -> dict[str, str]:
    """Original key -> the wrapped model's key, for every tensor that is not an adapter's."""
    inner = model.base_model.model
    out: dict[str, str] = {}
    for key in inner.state_dict():
        current: Any = inner
        kept: list[str] = []
        for part in key.split("."):
            inside = {VBLoRALinear: "base_layer", ModulesToSave: "original_module"}.get(type(current))
            if inside is not None:
                if part != inside:
                    break  # an adapter's tensor (logits, copies, factor stacks)
                current = getattr(current, inside)
                continue
            kept.append(part)
            current = getattr(current, part, None) if isinstance(current, nn.Module) else None
        else:
            out[".".join(kept)] = key
    return out


def holds_vblora_store_adapters(model: Any) -> bool:
    """Whether ``model`` (or what it wraps) is a ``VBLoRAModel`` or holds its layers."""
    model = getattr(model, "_orig_mod", model)
    return isinstance(model, VBLoRAModel) or (
        isinstance(model, nn.Module) and any(isinstance(m, VBLoRALinear) for m in model.modules())
    )


def _peft_model(model: Any, unwrap_compiled: bool) -> VBLoRAModel:
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    while not isinstance(model, VBLoRAModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DistributedDataParallel or FullyShardedDataParallel around it, as PEFT accepts
    if not isinstance(model, VBLoRAModel):
        raise InvalidArgumentError(
            f"expected a VBLoRAModel, got {type(model).__name__}; pass the model VBLoRAModel(...) or "
            "VBLoRAModel.from_pretrained(...) returned (unwrap_compiled=True for a compiled one)."
        )
    return model


def _config(model: Any, adapter_name: str) -> Any:
    configs = _peft_model(model, unwrap_compiled=True).peft_config
    if adapter_name not in configs:
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; this model holds {sorted(configs)}.")
    return configs[adapter_name]


def _model_keys(model: VBLoRAModel, adapter: str) -> dict[str, str]:
    """PEFT's key (full form) -> the model's own state-dict key, for every tensor of ``adapter``."""
    tuner = model.base_model
    params: dict[str, torch.Tensor] = {BANK_KEY: tuner.vblora_vector_bank[adapter]}
    for name, layer in adapter_layers(tuner.model, adapter):
        if layer.is_topk(adapter):
            raise UnsupportedConversionError(
                f"adapter {adapter!r} is held in top-k form, with no logits to set; load the state dict into an "
                "adapter made with VBLoRAModel(...) or add_adapter, or load its folder with load_adapter."
            )
        params[logits_key(name, "A")] = layer.vblora_logits_A[adapter]
        params[logits_key(name, "B")] = layer.vblora_logits_B[adapter]
    params.update(other_parameters(tuner.model, adapter, tuner.peft_config[adapter]))
    params.update(embedding_parameters(tuner.model))
    own = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
    return {peft_key: own[id(t)] for peft_key, t in params.items() if id(t) in own}


def _values_from(
    model: VBLoRAModel, state_dict: dict, adapter: str, live: dict, *, topk: bool, num_vectors: int
) -> dict[str, torch.Tensor]:
    """``live``'s keys with the values of ``state_dict`` (keyed as the model's own state dict)."""
    places = _model_keys(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for key in live:
        parts = parse_key(key)
        if topk and parts is not None:
            if parts.part == "indices":
                logits = state_dict[places[logits_key(parts.module, parts.side)]]
                indices, weights = select_topk(logits.detach(), model.peft_config[adapter].topk,
                                               index_dtype(num_vectors))  # fmt: skip
                out[key], out[key.replace("_topk_indices", "_topk_weights")] = indices, weights
            continue
        out[key] = state_dict[places[key]]
    return out


def _logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """PEFT's reading of a top-k pair: logits ``log(w)`` at the indices, ``-inf`` elsewhere."""
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)  # (..., k-1) -> (..., k)
    logits = torch.full((*full.shape[:-1], num_vectors), float("-inf"), dtype=full.dtype, device=full.device)
    return logits.scatter(-1, indices.long(), torch.log(full))
