"""One layer's factor stacks: the built factors of the adapters it serves, one slot each.

::

    a      (slots, R, in)    A of the adapter in each slot, rank zero-padded to R
    bt     (slots, R, out)   B transposed, likewise
    ranks  (slots,) int32    the rank each slot holds (0: it adds nothing)

Slot numbers are the model's (:mod:`.cache`); slot 0 is always zeros.  Each
slot remembers the key of the sources it was built from, so a stale slot is
rebuilt.  The stacks are buffers (moved and cast with the model, never saved);
growing them (more slots, a larger rank) reallocates, which changes their shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["FactorSlots", "source_key"]


class FactorSlots(nn.Module):
    """The factor stacks of one layer.

    Args:
        in_features: The layer's input size.
        out_features: Its output size.
        like: A tensor whose device the stacks take (the base weight), and its
            dtype when it is floating.

    Example:
        >>> slots = FactorSlots(3, 2, like=torch.zeros(1))
        >>> slots.ensure(2); slots.store(1, torch.ones(1, 3), torch.ones(1, 2), key="k")
        >>> slots.a.shape, slots.ranks.tolist(), slots.key(1)
        (torch.Size([2, 1, 3]), [0, 1], 'k')
    """

    def __init__(self, in_features: int, out_features: int, *, like: torch.Tensor):
        super().__init__()
        dtype = like.dtype if like.dtype.is_floating_point else torch.get_default_dtype()
        with torch.inference_mode(False):
            self.register_buffer("a", like.new_zeros((0, 1, in_features), dtype=dtype), persistent=False)
            self.register_buffer("bt", like.new_zeros((0, 1, out_features), dtype=dtype), persistent=False)
            self.register_buffer("ranks", like.new_zeros((0,), dtype=torch.int32), persistent=False)
        self._keys: list[Optional[object]] = []
        self._held: list[int] = []  # each slot's rank, on the host
        self._ptr = self.a.data_ptr()

    @property
    def nbytes(self) -> int:
        """Bytes the stacks take."""
        return sum(t.numel() * t.element_size() for t in (self.a, self.bt, self.ranks))

    def key(self, slot: int) -> Optional[object]:
        """The key ``slot`` was built with (``None``: empty or stale)."""
        return self._keys[slot]

    def check(self) -> bool:
        """Forget every slot if the stacks were moved or cast from outside; ``True`` if they were.

        Stacks moved or cast under ``torch.inference_mode()`` are copied into
        ordinary tensors, so they can be written again.
        """
        if self.a.data_ptr() == self._ptr:
            return False
        if self.a.is_inference():
            with torch.inference_mode(False):
                self.a, self.bt, self.ranks = self.a.clone(), self.bt.clone(), self.ranks.clone()
        self._ptr = self.a.data_ptr()
        self._keys = [None] * self.a.shape[0]
        self._held = [int(r) for r in self.ranks.tolist()]
        return True

    def ensure(self, count: int) -> None:
        """Hold at least ``count`` slots (doubling, so growth is amortised)."""
        if count > self.a.shape[0]:
            self._resize(max(count, 2 * self.a.shape[0]), self.a.shape[1])

    def _resize(self, slots: int, rank: int) -> None:
        """Reallocate to ``(slots, rank, ...)``, keeping what the stacks hold."""
        with torch.inference_mode(False), torch.no_grad():
            a = self.a.new_zeros((slots, rank, self.a.shape[2]))
            bt = self.bt.new_zeros((slots, rank, self.bt.shape[2]))
            ranks = self.ranks.new_zeros((slots,))
            n, r = self.a.shape[0], min(rank, self.a.shape[1])
            a[:n, :r], bt[:n, :r], ranks[:n] = self.a[:, :r], self.bt[:, :r], self.ranks
        self.a, self.bt, self.ranks = a, bt, ranks
        self._keys += [None] * (slots - len(self._keys))
        self._held += [0] * (slots - len(self._held))
        self._ptr = a.data_ptr()

    def shrink(self, moves: dict[int, int]) -> None:
        """Keep only the slots in ``moves`` (old slot -> new one), reallocated to ``len(moves) + 1`` slots."""
        old, new = list(moves), list(moves.values())
        with torch.inference_mode(False), torch.no_grad():
            a = self.a.new_zeros((len(moves) + 1, *self.a.shape[1:]))
            bt = self.bt.new_zeros((len(moves) + 1, *self.bt.shape[1:]))
            ranks = self.ranks.new_zeros((len(moves) + 1,))
            a[new], bt[new], ranks[new] = self.a[old], self.bt[old], self.ranks[old]
        self.a, self.bt, self.ranks = a, bt, ranks
        keys, held = [None] * (len(moves) + 1), [0] * (len(moves) + 1)
        for source, target in moves.items():
            keys[target], held[target] = self._keys[source], self._held[source]
        self._keys, self._held, self._ptr = keys, held, a.data_ptr()

    def store(self, slot: int, a: torch.Tensor, bt: torch.Tensor, key: object) -> None:
        """Write A ``(r, in)`` and B transposed ``(r, out)`` into ``slot`` (cast to the stacks' dtype)."""
        r = a.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            if r > self.a.shape[1]:
                self._resize(self.a.shape[0], r)
            self.a[slot].zero_()
            self.bt[slot].zero_()
            self.a[slot, :r] = a
            self.bt[slot, :r] = bt
            self.ranks[slot] = r
        self._held[slot] = r
        self._keys[slot] = key

    def clear(self, slot: int) -> None:
        """Zero ``slot`` (its adapter was evicted or deleted, or it goes to another)."""
        if slot < len(self._keys) and (self._held[slot] or self._keys[slot] is not None):
            with torch.inference_mode(False), torch.no_grad():
                self.a[slot].zero_()
                self.bt[slot].zero_()
                self.ranks[slot] = 0
            self._held[slot] = 0
            self._keys[slot] = None

    def forget(self) -> None:
        """Mark every slot stale (rebuilt on its next use)."""
        self._keys = [None] * len(self._keys)

    def views(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(rank, in)`` and B transposed ``(rank, out)`` of ``slot``, as views."""
        return self.a[slot, :rank], self.bt[slot, :rank]


def source_key(tensors: tuple[torch.Tensor, ...]) -> tuple:
    """Identifies the values of ``tensors``: changes on any in-place edit, move or cast.

    Tensors created under ``torch.inference_mode()`` have no version counter;
    for them only a move or cast is seen (call ``clear_cache()`` after editing one).
    """
    return tuple((t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version) for t in tensors)
