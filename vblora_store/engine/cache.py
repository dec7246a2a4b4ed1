"""The factor cache: which adapters have their dense factors built, in which slot, least recently used first.

An adapter is held in its compact form (bank, top-k indices and weights, or
logits); running it needs its dense factors A ``(r, in)`` and B ``(out, r)`` in
every layer it adapts.  Those are built on demand into *slots*: slot ``s`` of
every layer's factor stacks (:mod:`vblora_store.engine.batched`) holds the
factors of one adapter, zeros where that adapter adapts nothing.  Slot 0 is
always zeros: the rows of a batch that use no adapter point at it.

The cache maps adapter names to slots.  With a ``capacity``, at most that many
adapters have factors built at once: asking for another evicts the least
recently used one that the current batch does not need; lowering it evicts
down to it and shrinks the stacks to match.  Without one, the stacks grow as
adapters are run.  Building or evicting one adapter writes its
own slot and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import AdapterNamesError, InvalidArgumentError

__all__ = ["CacheStats", "FactorCache"]


@dataclass
class CacheStats:
    """Counts since the cache was made: adapters found built, built, and evicted."""

    hits: int = 0
    builds: int = 0
    evictions: int = 0


class FactorCache:
    """Slots of built factors, shared by every layer of one model.

    Args:
        capacity: Most adapters with built factors at once (``None``: no bound).

    Example:
        >>> cache = FactorCache(capacity=2)
        >>> cache.assign("a"), cache.assign("b"), cache.assign("c")  # "c" evicts "a"
        (1, 2, 1)
        >>> cache.resident
        ['b', 'c']
    """

    def __init__(self, capacity: Optional[int] = None):
        self.layers: list = []  # every layer holding factor stacks (VBLoRALinear)
        self._capacity: Optional[int] = None
        self._slots: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self._free: list[int] = []
        self._next_slot = 1  # slot 0 stays zero
        self._built: dict[str, tuple] = {}  # adapter -> the source key its slot was built from
        self.stats = CacheStats()
        self.capacity = capacity

    # -- capacity ---------------------------------------------------------------------------

    @property
    def capacity(self) -> Optional[int]:
        """Most adapters with built factors at once; ``None`` for no bound."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(
                f"max_cached_factors must be a positive integer or None, got {value!r}; pass, say, 8."
            )
        self._capacity = value
        if value is not None:
            while len(self._slots) > value:
                self._evict(keep=())
            self._compact()

    def _compact(self) -> None:
        """Renumber the built adapters ``1..n`` (slot order kept); shrink every layer's stacks to ``n + 1``."""
        moves = {old: new for new, old in enumerate(sorted(self._slots.values()), start=1)}
        for layer in self.layers:
            layer.factor_slots.shrink(moves)
        self._slots = OrderedDict((adapter, moves[slot]) for adapter, slot in self._slots.items())
        self._free, self._next_slot = [], len(moves) + 1

    @property
    def resident(self) -> list[str]:
        """Adapters whose factors are built, least recently used first."""
        return list(self._slots)

    @property
    def num_slots(self) -> int:
        """Slots the stacks need: one per built adapter ever in use at once, plus the zero slot."""
        return self._next_slot

    # -- layers ---------------------------------------------------------------------------------

    def register(self, layer) -> None:
        """Start serving ``layer``: its stacks get as many slots as the cache uses."""
        if all(existing is not layer for existing in self.layers):
            self.layers.append(layer)
            layer.factor_slots.ensure(self._next_slot)

    def unregister(self, layer) -> None:
        """Stop serving ``layer`` (it was unwrapped)."""
        self.layers = [existing for existing in self.layers if existing is not layer]

    # -- slots -----------------------------------------------------------------------------------

    def slot_of(self, adapter: str) -> Optional[int]:
        """The slot of ``adapter`` if its factors have one, else ``None``."""
        return self._slots.get(adapter)

    def assign(self, adapter: str, *, keep: Iterable[str] = ()) -> int:
        """The slot of ``adapter``, given one if it has none, and mark it most recently used.

        A new slot is taken from those freed, or added, or, at capacity, from
        the least recently used adapter not in ``keep`` (the rest of the batch).
        Every layer's part of a newly given slot is cleared to zeros.

        Raises:
            AdapterNamesError: the cache is full of adapters in ``keep``.
        """
        slot = self._slots.get(adapter)
        if slot is not None:
            self._slots.move_to_end(adapter)
            return slot
        if self._free:
            slot = self._free.pop()
        elif self._capacity is None or len(self._slots) < self._capacity:
            slot = self._next_slot
            self._next_slot += 1
            for layer in self.layers:
                layer.factor_slots.ensure(self._next_slot)
        else:
            slot = self._evict(keep=set(keep) | {adapter})
            self._free.remove(slot)
        for layer in self.layers:
            layer.factor_slots.clear(slot)
        self._slots[adapter] = slot
        return slot

    def release(self, adapter: str) -> None:
        """Forget ``adapter``'s factors (deleted, or its layers changed); its slot is reused later."""
        slot = self._slots.pop(adapter, None)
        self._built.pop(adapter, None)
        if slot is not None:
            self._free.append(slot)

    def _evict(self, *, keep) -> int:
        for adapter in self._slots:
            if adapter not in keep:
                slot = self._slots[adapter]
                self.release(adapter)
                self.stats.evictions += 1
                return slot
        raise AdapterNamesError(
            f"the batch needs the factors of {len(keep)} adapters at once but max_cached_factors is "
            f"{self._capacity}; raise max_cached_factors or split the batch."
        )

    # -- freshness -------------------------------------------------------------------------------

    def is_built(self, adapter: str, key: tuple) -> bool:
        """Whether ``adapter``'s slot holds factors built from sources whose key is ``key``."""
        fresh = adapter in self._slots and self._built.get(adapter) == key
        if fresh:
            self.stats.hits += 1
        return fresh

    def mark_built(self, adapter: str, key: tuple) -> None:
        """Record that ``adapter``'s slot now holds factors built from sources of key ``key``."""
        self._built[adapter] = key
        self.stats.builds += 1

    def forget_built(self) -> None:
        """Make every adapter's factors be checked layer by layer on their next use (stacks moved or cast)."""
        self._built.clear()
