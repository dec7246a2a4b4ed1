"""Serving many adapters from one model: mixed-adapter calls, each row routed to its adapter.

``VBLoRAModel.forward(..., adapter_names=[...])`` and ``generate(...,
adapter_names=[...])`` come here (PEFT LoRA's API: one adapter name per row,
``"__base__"`` for none).  :func:`routing` checks the names against the model
and the batch, has the factors of every adapter the batch names built into its
cache slot (:func:`~vblora_store.engine.building.prepare_factors`: one batched
composition per top-k adapter, checked against the version counters of its
three source tensors, so a warm cache costs a few dictionary look-ups per
adapter), and opens the model's
:class:`~vblora_store.engine.routing.BatchRoute` for the call; every adapter
layer then runs the whole batch in one :func:`~vblora_store.engine.batched.add_lora`,
with no loop over adapters.

A compiled model (``torch.compile``) routes every call, one adapter or many,
so its graph holds no Python cache logic; :func:`open_route` and
:func:`close_route` run outside the graph (``torch.compiler.disable``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..errors import AdapterNamesError
from .batched import load_kernels
from .building import check_slots, prepare_factors
from .routing import BASE_ADAPTER, check_adapter_names

__all__ = [
    "batch_rows",
    "sequence_length",
    "generate_multiples",
    "open_route",
    "close_route",
    "routing",
    "WrappedForward",
    "call_routed",
]

#: Keyword arguments that carry the batch, in the order they are looked at.
_BATCH_KWARGS = ("input_ids", "inputs", "inputs_embeds", "pixel_values", "input_values", "input_features")


def batch_rows(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[int]:
    """The batch size of a call: the leading size of its first tensor input (``None`` if it has none).

    Example:
        >>> batch_rows((torch.zeros(3, 5),), {}), batch_rows((), {"input_ids": torch.zeros(2, 4)})
        (3, 2)
    """
    candidates = [a for a in args if isinstance(a, torch.Tensor)]
    candidates += [kwargs[k] for k in _BATCH_KWARGS if isinstance(kwargs.get(k), torch.Tensor)]
    candidates += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return int(candidates[0].shape[0]) if candidates and candidates[0].dim() else None


def sequence_length(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[int]:
    """The sequence length of a language model's forward: ``input_ids`` or ``inputs_embeds``'s second size.

    Only token inputs count (a first positional argument of integer ids too): the
    length of another input (an image's channels) is no sequence of rows.

    Example:
        >>> sequence_length((), {"input_ids": torch.zeros(2, 5, dtype=torch.long)})
        5
        >>> sequence_length((torch.zeros(2, 3, 8, 8),), {}) is None
        True
    """
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point():
        return int(first.shape[1])
    return None


def generate_multiples(model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """How many times ``generate`` repeats each row: for beams and for returned sequences."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    multiples = {1}
    for name in ("num_beams", "num_return_sequences"):
        value = kwargs.get(name, getattr(config, name, 1))
        if isinstance(value, int) and value > 1:
            multiples.add(value)
    return tuple(sorted(multiples))


def _refuse_state(model, mixed: bool) -> None:
    if any(layer.merged for layer in model.factor_cache.layers):
        raise AdapterNamesError(
            "adapter_names cannot be used while an adapter is merged into the base weights; call "
            "unmerge_adapter() first."
        )
    if model.training and torch.is_grad_enabled() and mixed:
        raise AdapterNamesError(
            "adapter_names cannot be used in training mode with gradients on; call model.eval() (or run "
            "under torch.no_grad()) for mixed-adapter inference, and train one adapter at a time."
        )


@torch.compiler.disable
def open_route(
    model,
    adapter_names: Optional[Sequence[str]],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    multiples: Sequence[int] = (1,),
) -> None:
    """Route the call about to run: each row to its adapter's slot.

    With ``adapter_names=None`` (a compiled call) every row takes the active
    adapter, unless nothing would run it through the cache (no active adapter,
    merged, or training it), in which case no route is opened.

    Raises:
        AdapterNamesError: unknown names, a length other than the batch size,
            merged adapters, training mode with gradients on, or more adapters
            than ``max_cached_factors``.
    """
    rows = batch_rows(args, kwargs)
    if adapter_names is None:
        actives = model.active_adapters
        if len(actives) != 1 or rows is None or actives[0] in model._placeholders:
            return  # no adapter, or several (their layers add them up unrouted)
        active = actives[0]
        training = torch.is_grad_enabled() and model.vblora_vector_bank[active].requires_grad
        if training or any(layer.merged for layer in model.factor_cache.layers):
            return
        names = [active] * rows
    else:
        names = check_adapter_names(adapter_names, known=list(model.peft_config), rows=rows)
        _refuse_state(model, mixed=True)
    distinct = list(dict.fromkeys(name for name in names if name != BASE_ADAPTER))
    for name in distinct:
        if name in model._placeholders:
            raise AdapterNamesError(
                f"adapter {name!r} was added with low_cpu_mem_usage=True and has no weights yet; "
                "load_adapter() it first."
            )
    capacity = model.factor_cache.capacity
    if capacity is not None and len(distinct) > capacity:  # refused before the cache is touched
        raise AdapterNamesError(
            f"the batch needs the factors of {len(distinct)} adapters at once but max_cached_factors is "
            f"{capacity}; raise max_cached_factors or split the batch."
        )
    for layer in model.factor_cache.layers:
        check_slots(layer)
    slot_of = {BASE_ADAPTER: 0}
    for name in distinct:
        slot_of[name] = prepare_factors(model, name, keep=distinct)
    device = model.factor_cache.layers[0].factor_slots.a.device if model.factor_cache.layers else None
    if device is not None and device.type == "cuda":
        load_kernels()  # before the (compiled) layers need them
    slots = torch.tensor([slot_of[name] for name in names], dtype=torch.int64, device=device)
    keep = None
    if model.training:
        drop = [model.peft_config[n].vblora_dropout if n != BASE_ADAPTER else 0.0 for n in names]
        if any(drop):
            keep = torch.tensor([1.0 - p for p in drop], device=device)
    model._route.open(names=names, slots=slots, multiples=multiples, keep=keep, seq=sequence_length(args, kwargs))


@torch.compiler.disable
def close_route(model) -> None:
    """End the routed call: the layers go back to the active adapter."""
    model._route.clear()


@contextmanager
def routing(
    model, adapter_names: Sequence[str], args, kwargs, *, multiples: Sequence[int] = (1,)
) -> Iterator[None]:
    """:func:`open_route` for the ``with`` block, closed whatever happens in it.

    Meanwhile every forward of the wrapped model (each step of ``generate``)
    records its sequence length on the route, so a layer that sees the batch's
    tokens flattened, ``(rows·seq, hidden)`` as OPT's ``fc1``, is routed row by row.
    """
    route = model._route

    def record_length(module, call_args, call_kwargs) -> None:
        route.seq = sequence_length(call_args, call_kwargs)

    open_route(model, adapter_names, args, kwargs, multiples=multiples)
    hook = model.model.register_forward_pre_hook(record_length, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        close_route(model)


def _call_wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the wrapped model."""
    return self._forward(*args, **kwargs)


class WrappedForward:
    """``VBLoRAModel.forward``: calls the wrapped model and shows its signature.

    ``inspect.signature(model.forward)`` is then the wrapped model's, so
    transformers' Trainer keeps the dataset columns it names (it drops the
    others); on the class it is a plain ``(self, *args, **kwargs)`` function.
    """

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        if obj is None:
            return _call_wrapped

        @functools.wraps(obj.base_model.model.forward)
        def call(*args: Any, **kwargs: Any) -> Any:
            return obj._forward(*args, **kwargs)

        return call


def call_routed(tuner, call, args, kwargs, adapter_names, *, generating: bool = False) -> Any:
    """Run ``call`` (the wrapped model, or its ``generate``) with each row routed to its adapter.

    Without ``adapter_names`` the call runs as is, except in a compiled model,
    where every call is routed so that its graph holds no Python cache logic.
    ``generate`` repeats rows for beams and returned sequences: allowed multiples.
    """
    if torch.compiler.is_compiling():
        open_route(tuner, adapter_names, args, kwargs)
        out = call(*args, **kwargs)
        close_route(tuner)
        return out
    if adapter_names is None:
        return call(*args, **kwargs)
    multiples = generate_multiples(tuner.model, kwargs) if generating else (1,)
    with routing(tuner, adapter_names, args, kwargs, multiples=multiples):
        return call(*args, **kwargs)
