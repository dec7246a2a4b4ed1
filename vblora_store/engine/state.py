"""The live model <-> PEFT's adapter state dict: which tensor is saved under which key.

One mapping serves saving, loading and parameter accounting, so the three
cannot disagree.  Keys are PEFT's (``format/keys.py``); module names are those
of the wrapped model, so ``base_model.model.<module>`` prefixes them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..format.codecs.base import FormCounts
from ..storage_forms import StorageForm
from ..config import VBLoRAConfig
from ..errors import InvalidAdapterError, UnsupportedConversionError
from ..format.keys import BANK_KEY, MODEL_PREFIX, index_dtype, indices_key, logits_key, weights_key
from ..format.stored import StoredAdapter
from ..topk import select_topk
from .layer import VBLoRALinear
from .trainable import ModulesToSave

__all__ = [
    "adapter_layers",
    "other_parameters",
    "adapter_state_dict",
    "embedding_parameters",
    "load_other_tensors",
    "savable_parameter_counts",
]


def adapter_layers(model: nn.Module, adapter: str) -> Iterator[tuple[str, VBLoRALinear]]:
    """``(module name, layer)`` for every layer of ``model`` that holds ``adapter``."""
    for name, module in model.named_modules():
        if isinstance(module, VBLoRALinear) and adapter in module.r:
            yield name, module


def other_parameters(model: nn.Module, adapter: str, config: VBLoRAConfig) -> dict[str, nn.Parameter]:
    """The adapter's savable tensors other than bank and logits, by PEFT key.

    These are its ``modules_to_save`` copies (saved under the original
    module's key, e.g. ``base_model.model.score.weight``) and the biases its
    ``bias`` mode trains: every bias for ``"all"``, the wrapped layers' for
    ``"vblora_only"`` (``<module>.base_layer.bias``).
    """
    out: dict[str, nn.Parameter] = {}
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for name, wrapper in wrappers:
        if adapter in wrapper.modules_to_save:
            for pname, param in wrapper.modules_to_save[adapter].named_parameters():
                out[f"{MODEL_PREFIX}{name}.{pname}"] = param
    if config.bias == "all":
        inside = tuple(f"{n}." for n, _ in wrappers)
        for pname, param in model.named_parameters():
            if (pname == "bias" or pname.endswith(".bias")) and not pname.startswith(inside):
                out[MODEL_PREFIX + pname] = param
    elif config.bias == "vblora_only":
        for name, layer in adapter_layers(model, adapter):
            if layer.base_layer.bias is not None:
                out[f"{MODEL_PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    return out


def adapter_state_dict(
    model: nn.Module, bank: torch.Tensor, adapter: str, config: VBLoRAConfig, *, topk: bool
) -> dict[str, torch.Tensor]:
    """The adapter's tensors exactly as PEFT saves them (CPU, contiguous).

    Args:
        model: The wrapped model.
        bank: The adapter's ``(N, L)`` vector bank.
        adapter: The adapter's name.
        config: Its config.
        topk: Save indices and weights instead of logits.

    Raises:
        UnsupportedConversionError: full form asked of an adapter held in top-k form.
    """
    out: dict[str, torch.Tensor] = {}
    dtype = index_dtype(config.num_vectors)
    for name, layer in adapter_layers(model, adapter):
        if layer.is_topk(adapter):
            if not topk:
                raise UnsupportedConversionError(
                    f"adapter {adapter!r} was loaded in top-k form; its full logits are gone, so it can "
                    "only be saved with save_only_topk_weights=True."
                )
            held, where = layer._topk_store[adapter], layer.topk_slices[adapter]
            for side, slots, shape in (
                ("A", where.a_slots, where.a_shape),
                ("B", where.b_slots, where.b_shape),
            ):
                out[indices_key(name, side)] = held.indices[slots].reshape(
                    *shape, -1
                )  # (n, k) -> (rows, cols, k)
                out[weights_key(name, side)] = held.weights[slots].reshape(
                    *shape, -1
                )  # (n, k-1) -> (rows, cols, k-1)
            continue
        for side, logits in (("A", layer.vblora_logits_A[adapter]), ("B", layer.vblora_logits_B[adapter])):
            if topk:
                indices, weights = select_topk(logits.detach(), config.topk, dtype)
                out[indices_key(name, side)] = indices
                out[weights_key(name, side)] = weights
            else:
                out[logits_key(name, side)] = logits
    out[BANK_KEY] = bank
    out.update(other_parameters(model, adapter, config))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The input and output embeddings' parameters by PEFT key (``save_embedding_layers``)."""
    out: dict[str, nn.Parameter] = {}
    if not hasattr(model, "get_input_embeddings"):
        return out
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    for name, module in model.named_modules():
        if name and any(module is layer for layer in layers if layer is not None):
            for pname, param in module.named_parameters():
                out[f"{MODEL_PREFIX}{name}.{pname}"] = param
    return out


def load_other_tensors(model: nn.Module, stored: StoredAdapter, adapter: str) -> None:
    """Copy the stored ``modules_to_save`` copies, biases and embedding layers into the model.

    Embedding layers (saved with PEFT's ``save_embedding_layers``) are copied
    into the base model's embeddings, as PEFT loads them.

    Raises:
        InvalidAdapterError: the file holds a tensor this model has no place
            for, or one of another shape.
    """
    targets = {**embedding_parameters(model), **other_parameters(model, adapter, stored.config)}
    for key in stored.other_keys:
        param = targets.get(key)
        value = stored.checked_tensor(key)
        if param is None or tuple(param.shape) != tuple(value.shape):
            where = "no such parameter" if param is None else f"the model's is {list(param.shape)}"
            raise InvalidAdapterError(
                f"{stored.weights_path}: tensor {key!r} {list(value.shape)} does not fit this model "
                f"({where}); the adapter was saved from another model or with other modules_to_save or "
                "bias settings."
            )
        with torch.no_grad():
            param.copy_(value)


def savable_parameter_counts(
    model: nn.Module, bank: torch.Tensor, adapter: str, config: VBLoRAConfig
) -> tuple[int, int]:
    """PEFT's ``get_nb_savable_parameters`` for one adapter: ``(vblora_params, other_params)``.

    The formulas are the storage forms' codecs' (:mod:`vblora_store.format.codecs`), applied to the live model.
    """
    sub_vectors = 0  # one per (r, in/L) position of A and (out/L, r) position of B
    for _, layer in adapter_layers(model, adapter):
        length, r = config.vector_length, layer.r[adapter]
        sub_vectors += r * layer.in_features // length + layer.out_features // length * r
    counts = FormCounts(bank.numel(), sub_vectors, config.num_vectors, config.topk)
    form = StorageForm.TOPK if config.save_only_topk_weights else StorageForm.FULL
    vblora = form.codec.savable_params(counts)
    other = sum(p.numel() for p in other_parameters(model, adapter, config).values())
    return vblora, other
