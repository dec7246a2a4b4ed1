"""Factors built once, into slots: each adapter's A and B kept current in its slot of every layer.

Outside training, the dense factors a layer composes for an adapter
(:meth:`~vblora_store.engine.layer.VBLoRALinear.build_factors`) are built once
into the adapter's slot of the layer's factor stacks (:mod:`.slots`; the
model's :mod:`.cache` gives each adapter one slot, the same in every layer)
and reused.  A slot remembers the key of the tensors it was built from (their
version counters and data pointers: :func:`~.slots.source_key`), so an
optimizer step, a ``load_state_dict``, a move, a cast or any in-place edit
rebuilds it on its next use.  :func:`slot_factors` serves one layer's call;
:func:`prepare_factors` builds an adapter in every layer before a routed call,
a top-k adapter's sub-vectors composed for all its modules in one gather.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..topk import subvector_factors
from .slots import source_key

__all__ = ["slot_key", "check_slots", "refresh_slot", "slot_factors", "prepare_factors"]


def slot_key(layer, adapter: str) -> tuple:
    """The key ``adapter``'s slot of ``layer`` (a ``VBLoRALinear``) holds when it is current."""
    return (adapter, layer.source_key(adapter))


def check_slots(layer) -> None:
    """Forget every built slot if ``layer``'s stacks were moved or cast from outside (``model.to(...)``)."""
    if layer.factor_slots.check():
        layer._cache.forget_built()


def refresh_slot(layer, adapter: str, slot: int) -> None:
    """Build ``adapter``'s factors into ``slot`` of ``layer`` unless the slot already holds them, current."""
    check_slots(layer)
    key = slot_key(layer, adapter)
    if layer.factor_slots.key(slot) == key:
        return
    with torch.inference_mode(False), torch.no_grad():
        a, b = layer.build_factors(adapter)
        layer.factor_slots.store(slot, a, b.T, key)


def slot_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of A ``(r, in)`` and B transposed ``(r, out)`` in ``adapter``'s slot of ``layer``.

    The adapter is given a slot if it has none, and its factors are built there if missing or stale.
    """
    slot = layer._cache.assign(adapter, keep=(adapter,))
    refresh_slot(layer, adapter, slot)
    return layer.factor_slots.views(slot, layer.r[adapter])


def _adapter_key(model, adapter: str) -> tuple:
    """Changes whenever a tensor that ``adapter``'s factors are built from changes.

    Three tensors for a top-k adapter (bank, indices, weights); the bank and
    every layer's logits for a full one.
    """
    bank = model.vblora_vector_bank[adapter]
    if adapter in model.vblora_topk:
        held = model.vblora_topk[adapter]
        return source_key((bank, held.indices, held.weights))
    layers = [layer for layer in model.factor_cache.layers if adapter in layer.r]
    return tuple(layer.source_key(adapter) for layer in layers)


def prepare_factors(model, adapter: str, *, keep: Sequence[str] = ()) -> int:
    """The cache slot of ``adapter``, its factors built there in every layer if missing or stale.

    A top-k adapter's sub-vectors are composed for all its modules at once
    (one gather over the bank), then cut into each layer's A and B.

    Args:
        model: The ``VBLoRATuner`` (or the ``VBLoRAModel`` around it).
        adapter: One of its adapters.
        keep: The other adapters of the batch, never evicted to make room.

    Returns:
        The slot.
    """
    cache = model.factor_cache
    slot = cache.assign(adapter, keep=keep)
    key = _adapter_key(model, adapter)
    if cache.is_built(adapter, key):
        return slot
    layers = [layer for layer in cache.layers if adapter in layer.r]
    if adapter in model.vblora_topk:
        held, bank = model.vblora_topk[adapter], model.vblora_vector_bank[adapter]
        with torch.inference_mode(False), torch.no_grad():
            subvectors = held.subvectors(bank)  # (S, L), every slot of every module
            for layer in layers:
                where = layer.topk_slices[adapter]
                a, b = subvector_factors(
                    subvectors[where.a_slots], subvectors[where.b_slots], layer.r[adapter]
                )
                layer.factor_slots.store(slot, a, b.T, slot_key(layer, adapter))
    else:
        for layer in layers:
            refresh_slot(layer, adapter, slot)
    cache.mark_built(adapter, key)
    return slot
