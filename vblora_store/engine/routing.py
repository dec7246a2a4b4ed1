"""Routing one call: which adapter, and so which factor slot, each row of the batch uses.

``VBLoRAModel`` opens a :class:`BatchRoute` for a call with
``adapter_names=[...]`` (PEFT's API for mixed-adapter batches: one name per
row, ``"__base__"`` for none) and for every call of a compiled model; every
adapter layer and ``modules_to_save`` wrapper of the model reads the same one.
A layer sees its input batch first: ``rows`` inputs, or ``rows * m`` where
``m`` is one of ``multiples`` (``generate`` repeats each row for beams or
returned sequences, consecutively), or, in a model that flattens its tokens
before a layer (OPT's ``fc1`` and ``fc2`` see ``(batch·seq, hidden)``),
``rows * m * seq`` where ``seq`` is the sequence length of the forward in
flight: the batch's rows flattened in order, each row's tokens consecutive.
Any other leading size is refused, so a layer that does not keep the batch
first can never mix rows up silently.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import AdapterNameError, AdapterNamesError

__all__ = ["BASE_ADAPTER", "BatchRoute", "check_adapter_names", "check_new_name"]

#: The name that runs a row without any adapter (PEFT's); reserved, so no adapter may take it.
BASE_ADAPTER = "__base__"


def check_new_name(name: str) -> str:
    """``name`` if an adapter may take it: a non-empty string with no ``.``, not ``"__base__"``.

    Raises:
        AdapterNameError: it may not (a ``ValueError``).

    Example:
        >>> check_new_name("fr")
        'fr'
        >>> check_new_name("__base__")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vblora_store.errors.AdapterNameError: adapter name '__base__' is reserved: ...
    """
    if name == BASE_ADAPTER:
        raise AdapterNameError(
            f"adapter name {BASE_ADAPTER!r} is reserved: adapter_names=[{BASE_ADAPTER!r}] runs a row without "
            "any adapter; pick another name."
        )
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter name {name!r} is empty or has a '.'; pick a plain name.")
    return name


def check_adapter_names(adapter_names, *, known: Sequence[str], rows: Optional[int]) -> list[str]:
    """Validate ``adapter_names`` against the model's adapters and the batch.

    Args:
        adapter_names: One adapter name per row (``"__base__"`` for none).
        known: The adapters the model holds.
        rows: The batch size of the inputs, if it could be read.

    Returns:
        The names as a list.

    Raises:
        AdapterNamesError: not a list of strings, an unknown name, or a length
            other than the batch size.

    Example:
        >>> check_adapter_names(("a", "__base__"), known=["a"], rows=2)
        ['a', '__base__']
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise AdapterNamesError(
            f"adapter_names must be a list with one adapter name per row of the batch, got "
            f"{type(adapter_names).__name__}; pass e.g. adapter_names=['a', 'b', '{BASE_ADAPTER}']."
        )
    names = list(adapter_names)
    if not all(isinstance(name, str) for name in names):
        raise AdapterNamesError("adapter_names must hold strings only (adapter names, or '__base__').")
    unknown = sorted(set(names) - set(known) - {BASE_ADAPTER})
    if unknown:
        raise AdapterNamesError(
            f"adapter_names names adapters this model does not hold: {', '.join(map(repr, unknown))}; "
            f"it holds {sorted(known)} (and '{BASE_ADAPTER}' runs a row without adapter). Load them first."
        )
    if rows is not None and len(names) != rows:
        raise AdapterNamesError(
            f"adapter_names has {len(names)} names but the batch has {rows} rows; give exactly one name per row."
        )
    return names


class BatchRoute:
    """The rows of the call in flight; empty (``rows is None``) between calls.

    Attributes:
        rows: The batch size.
        slots: ``(rows,)`` int64, each row's factor slot (0: no adapter).
        names: Each row's adapter name (``modules_to_save`` wrappers route by name).
        multiples: Leading sizes a layer may see, as multiples of ``rows``.
        seq: The sequence length of the forward in flight (``None``: unknown), set by the model's
            forward pre-hook; a layer may also see ``rows * m * seq`` rows (tokens flattened in order).
        keep: ``(rows,)`` float, each row's keep probability for dropout (training mode only), or ``None``.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """End the call: layers go back to the active adapter."""
        self.rows: Optional[int] = None
        self.slots: Optional[torch.Tensor] = None
        self.names: Optional[list[str]] = None
        self.multiples: tuple[int, ...] = (1,)
        self.seq: Optional[int] = None
        self.keep: Optional[torch.Tensor] = None
        self._placed: dict = {}

    def open(
        self,
        *,
        names: list[str],
        slots: torch.Tensor,
        multiples: Sequence[int] = (1,),
        keep: Optional[torch.Tensor] = None,
        seq: Optional[int] = None,
    ) -> None:
        """Start a call whose rows use ``names`` (and so ``slots``), of sequence length ``seq`` if known."""
        self.clear()
        self.rows, self.names, self.slots = len(names), names, slots
        self.multiples = tuple(sorted(set(multiples) | {1}))
        self.keep = keep
        self.seq = seq

    def _multiple(self, leading: int, module: str) -> int:
        """How many consecutive input rows of a layer belong to each row of the batch."""
        per_row, rest = divmod(leading, self.rows) if self.rows else (0, 1)
        seq = self.seq
        flattened = bool(seq) and per_row % seq == 0 and per_row // seq in self.multiples
        if rest == 0 and (per_row in self.multiples or flattened):
            return per_row
        raise AdapterNamesError(
            f"module {module!r} received an input of {leading} rows in a batch of {self.rows} "
            f"(adapter_names, sequence length {seq}); mixed-adapter batches need every adapted module to see "
            "the batch dimension first, or the batch's tokens flattened in order. Run such a model one "
            "adapter at a time (set_adapter)."
        )

    def slots_for(self, leading: int, device: torch.device, module: str) -> torch.Tensor:
        """``(leading,)`` slot of each input row of a layer on ``device``.

        Raises:
            AdapterNamesError: ``leading`` is not the batch size or an allowed multiple of it.
        """
        m = self._multiple(leading, module)
        if torch.compiler.is_compiling():
            slots = self.slots if m == 1 else self.slots.repeat_interleave(m)
            return slots.to(device)
        placed = self._placed.get((m, device))
        if placed is None:
            slots = self.slots if m == 1 else self.slots.repeat_interleave(m)  # (rows,) -> (rows·m,)
            placed = self._placed[(m, device)] = slots.to(device)
        return placed

    def keep_for(self, leading: int, module: str) -> Optional[torch.Tensor]:
        """``(leading,)`` keep probability of each input row for dropout, or ``None`` when nothing drops."""
        if self.keep is None:
            return None
        m = self._multiple(leading, module)
        return self.keep if m == 1 else self.keep.repeat_interleave(m)

    def names_for(self, leading: int, module: str) -> list[str]:
        """Each input row's adapter name (``modules_to_save`` wrappers)."""
        m = self._multiple(leading, module)
        return [name for name in self.names for _ in range(m)]
