"""A stored adapter's modules, read through one door: the stored sides, the top-k selection, the factors.

Every consumer of a stored adapter's modules comes here, so each reads
through the checked reads and a full adapter is always reduced to its top-k
as PEFT's forward reduces it:

* :func:`module_sides`: each side's tensors as stored (logits, or top-k
  indices and weights); the engine loads these;
* :func:`module_topk`: indices and *complete* weights ``(..., k)`` of both
  sides (a full adapter's top-k of its logits and their softmax); bank usage;
* :func:`module_factors`: the dense factors A ``(r, in)`` and B ``(out, r)``;
  verify, export and merge.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from .format.keys import BANK_KEY, indices_key, logits_key, weights_key
from .format.stored import StoredAdapter
from .topk import complete_weights, compose, lora_factors, mix_weights, subvector_factors

__all__ = ["ModuleTopK", "module_sides", "module_topk", "module_factors"]

SIDES = ("A", "B")
#: Rows (sub-vectors) composed at once from a slot table: 1 MB of float32 sub-vectors at L=256, in the cache.
_RUN_ROWS = 1024


class ModuleTopK(NamedTuple):
    """Both sides of one module as top-k selections: ``(r, in/L, k)`` for A, ``(out/L, r, k)`` for B."""

    a_indices: torch.Tensor
    a_weights: torch.Tensor  # complete: summing to one
    b_indices: torch.Tensor
    b_weights: torch.Tensor


def module_sides(adapter: StoredAdapter, module: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each side's stored tensors, values checked: ``(logits,)`` or ``(indices, weights)`` by side.

    Raises:
        InvalidAdapterError: a stored value is bad (NaN, an index outside the bank).
    """
    if adapter.form.has_logits:
        return {side: (adapter.checked_tensor(logits_key(module, side)),) for side in SIDES}
    return {
        side: (
            adapter.checked_tensor(indices_key(module, side)),
            adapter.checked_tensor(weights_key(module, side)),
        )
        for side in SIDES
    }


def module_topk(adapter: StoredAdapter, module: str, *, dtype: torch.dtype = torch.float32) -> ModuleTopK:
    """Both sides of ``module`` as indices and complete weights, in ``dtype``.

    A full adapter's are the top-k of its logits and their softmax, as PEFT's
    forward computes them; a top-k adapter's last weight is recovered as ``1 - sum``.
    """
    parts = []
    k = adapter.config.topk
    for stored in module_sides(adapter, module).values():
        if len(stored) == 1:
            parts += mix_weights(stored[0].to(dtype), k)  # (..., N) -> (..., k) twice
        else:
            parts += [stored[0], complete_weights(stored[1].to(dtype))]  # (..., k-1) -> (..., k)
    return ModuleTopK(*parts)


def module_factors(
    adapter: StoredAdapter,
    modules: Optional[list[str]] = None,
    *,
    dtype: torch.dtype = torch.float64,
    group: int = 1,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(module, A (r, in), B (out, r))`` for the modules of ``adapter``, composed in ``dtype``.

    Args:
        adapter: Any stored form.
        modules: Module names, in the order wanted; all of the adapter's by default.
        dtype: The dtype to compute in.
        group: How many modules of one shape to compose at once: 1 reads and
            builds one module at a time (least memory); more makes a few large
            tensor operations of many small ones, which is what a whole
            adapter's export wants (the values are the same).  A packed or
            compressed adapter, whose indices and weights are one table, is
            then composed a run of consecutive modules at a time instead.

    Returns:
        An iterator in the order of ``modules``; the stored values are checked as they are read.

    Raises:
        InvalidAdapterError: a stored value is bad (NaN, index out of range).

    Example:
        >>> from vblora_store.format import read_adapter
        >>> name, a, b = next(module_factors(read_adapter("fixtures/tiny-llama-vblora")))
        >>> name, tuple(a.shape), tuple(b.shape)
        ('model.layers.0.mlp.down_proj', (4, 128), (64, 4))
    """
    bank = adapter.checked_tensor(BANK_KEY).to(dtype)
    order = list(adapter.modules) if modules is None else modules
    if group > 1 and adapter.slots is not None:
        built = _slot_factors(adapter, set(order), bank)
        for module in order:
            yield (module, *built.pop(module))
        return
    if group <= 1:
        for module in order:
            yield (module, *lora_factors(*module_topk(adapter, module, dtype=dtype), bank))
        return
    by_shape: dict[tuple[int, int], list[str]] = {}
    for module in order:
        shape = adapter.modules[module]
        by_shape.setdefault((shape.in_features, shape.out_features), []).append(module)
    built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for members in by_shape.values():
        for start in range(0, len(members), group):
            chunk = members[start : start + group]
            parts = zip(*(module_topk(adapter, module, dtype=dtype) for module in chunk))
            stacked = ModuleTopK(*(torch.stack(part) for part in parts))  # each (..., k) -> (G, ..., k)
            sub_a = compose(stacked.a_indices, stacked.a_weights, bank)  # (G, r, in/L, k) -> (G, r, in/L, L)
            sub_b = compose(stacked.b_indices, stacked.b_weights, bank)  # (G, out/L, r, k) -> (.., L)
            r = sub_a.shape[1]
            built.update({m: subvector_factors(sub_a[i], sub_b[i], r) for i, m in enumerate(chunk)})
    for module in order:
        yield (module, *built.pop(module))


def _slot_factors(
    adapter: StoredAdapter, wanted: set[str], bank: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors of the ``wanted`` modules of an adapter with a slot table, a run of modules at a time.

    The table's rows are laid out module by module (:class:`~.format.stored.Slots`), so a run of
    consecutive modules is composed by one gather and one weighted sum into a buffer that stays
    in the cache (about :data:`_RUN_ROWS` rows), then copied into each module's own A and B.
    Every value is computed as :func:`~.topk.compose` computes it; the table is checked once, whole.
    """
    slots = adapter.checked_slots()
    r, length = adapter.config.r, adapter.config.vector_length
    indices = slots.indices
    weights = complete_weights(slots.weights.to(bank.dtype))  # (S, k-1) -> (S, k)
    rows = [r * (shape.in_features + shape.out_features) // length for shape in adapter.modules.values()]
    names = list(adapter.modules)
    built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start, row = 0, 0
    while start < len(names):
        stop, count = start + 1, rows[start]
        while stop < len(names) and count + rows[stop] <= _RUN_ROWS:
            count, stop = count + rows[stop], stop + 1
        if any(name in wanted for name in names[start:stop]):
            run = compose(indices[row : row + count], weights[row : row + count], bank)  # (count, L)
            offset = row
            for name in names[start:stop]:
                shape = adapter.modules[name]
                size_a, size_b = r * shape.in_features // length, r * shape.out_features // length
                if name in wanted:
                    part = run[offset - row : offset - row + size_a + size_b]  # this module's (rows, L)
                    a, b = subvector_factors(part[:size_a], part[size_a:], r)
                    built[name] = (a.clone(), b)  # A is a view of the run; B a transposed copy already
                offset += size_a + size_b
        start, row = stop, row + count
    return built
