"""PEFT's ``convert_to_lora`` for a ``VBLoRAModel``: each layer's update as LoRA factors of a chosen rank.

VB-LoRA's update of a layer is ``ΔW = B @ A``, rank r.  Its singular value
decomposition comes from the factors alone, never the ``(out, in)`` matrix:
with ``B = Qb Rb`` and ``Aᵀ = Qa Ra`` (reduced QR), ``ΔW = Qb (Rb Raᵀ) Qaᵀ``,
so the SVD of the small ``Rb Raᵀ`` gives ``ΔW``'s.  As PEFT's, an integer rank
keeps that many singular directions (exact from r on; beyond r the extra
directions are zero), and a float in (0, 1] keeps the fewest whose squared
singular values reach that share of the total.  ``vblora-store export-lora``
does the same exactly at rank r from the files, with no model.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from ..errors import InvalidArgumentError
from ..export import lora_config, lora_key
from .functions import _config, _peft_model
from .model import VBLoRAModel
from .state import adapter_layers, other_parameters

__all__ = ["convert_to_lora"]


def convert_to_lora(
    model: VBLoRAModel, rank: Union[int, float], adapter_name: str = "default"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One adapter of ``model`` as a PEFT LoRA adapter of rank ``rank`` (PEFT's ``convert_to_lora``).

    Args:
        model: The ``VBLoRAModel``.
        rank: An ``int``: the LoRA rank of every layer.  A ``float`` in (0, 1]:
            each layer keeps the fewest singular directions whose squared
            singular values reach that share of the total (``rank_pattern``).
        adapter_name: The adapter to convert.

    Returns:
        ``(config, state_dict)``: PEFT's ``LoraConfig`` fields as a dictionary
        (``LoraConfig(**config)`` minus ``peft_type``, or ``adapter_config.json``),
        and the LoRA tensors under PEFT's keys (``...lora_A.weight`` ``(rank, in)``,
        ``...lora_B.weight`` ``(out, rank)``, float32), with the adapter's
        ``modules_to_save`` copies.

    Raises:
        InvalidArgumentError: a rank that is not a positive int or a float in
            (0, 1], one above a layer's smaller dimension, or an adapter that
            trains biases (LoRA conversion keeps none, as PEFT's refuses).

    Example:
        >>> config, tensors = convert_to_lora(model, rank=2)
        >>> config["r"], tuple(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape)
        (2, (2, 64))
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0 or (
        isinstance(rank, float) and rank > 1
    ):
        raise InvalidArgumentError(
            f"rank must be a positive int or a float in (0, 1] (a share of the singular values' energy), "
            f"got {rank!r}."
        )
    model = _peft_model(model, unwrap_compiled=True)
    config = _config(model, adapter_name)
    if config.bias != "none":
        raise InvalidArgumentError(
            f"adapter {adapter_name!r} sets bias={config.bias!r}; LoRA conversion keeps no bias (as PEFT's): "
            "convert an adapter trained with bias='none', or export it with vblora-store export-lora."
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in adapter_layers(model.base_model.model, adapter_name):
            a, b = layer.build_factors(adapter_name)
            lora_a, lora_b = _truncated(a.float(), b.float(), rank, name)
            tensors[lora_key(name, "A")], tensors[lora_key(name, "B")] = lora_a, lora_b
            ranks[name] = lora_a.shape[0]
        for key, param in other_parameters(model.base_model.model, adapter_name, config).items():
            tensors[key] = param.detach().clone()
    lora = lora_config(config, list(ranks))
    if isinstance(rank, int):
        lora.update(r=rank, lora_alpha=rank)
    else:  # each layer its own rank, scaling 1
        lora.update(r=1, lora_alpha=1, rank_pattern=dict(ranks), alpha_pattern=dict(ranks))
    return lora, tensors


def _truncated(
    a: torch.Tensor, b: torch.Tensor, rank: Union[int, float], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA A ``(k, in)`` and B ``(out, k)`` of ``B @ A`` keeping its ``k`` largest singular directions."""
    q_b, r_b = torch.linalg.qr(b)  # (out, r) -> (out, m), (m, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, r) -> (in, n), (n, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (m, n) -> (m, p), (p,), (p, n)
    left = (q_b @ u) * s  # (out, p), singular values folded into B as PEFT folds them
    right = vh @ q_a.T  # (p, in)
    if isinstance(rank, int):
        k = rank
    else:
        energy = torch.cumsum(s**2, dim=0)
        k = int(torch.searchsorted(energy, rank * energy[-1]).item()) + 1
    limit = min(b.shape[0], a.shape[1])
    if k > limit:
        raise InvalidArgumentError(
            f"module {name!r}: rank {k} is larger than the layer allows ({limit}); choose a lower rank."
        )
    p = s.shape[0]
    if k > p:  # beyond B @ A's rank the directions are zero
        right = torch.cat([right, right.new_zeros(k - p, right.shape[1])])  # (p, in) -> (k, in)
        left = torch.cat([left, left.new_zeros(left.shape[0], k - p)], dim=1)  # (out, p) -> (out, k)
    return right[:k].contiguous(), left[:, :k].contiguous()
