"""One adapter's top-k form, flat: the resident form of a top-k or packed adapter on the model.

All sub-vector slots of every module of the adapter sit in two tensors, module
by module, side A ``(r, in/L)`` then side B ``(out/L, r)``, each row-major (the
packed form's order), so a thousand resident adapters are a few thousand
tensors and their bytes are the file's tensors, no more.  Each layer keeps a
:class:`TopKSlice`: where its slots lie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..topk import complete_weights, compose

__all__ = ["TopKTensors", "TopKSlice"]


class TopKTensors(nn.Module):
    """One adapter's top-k form for all its modules, as two flat buffers.

    Args:
        indices: ``(S, k)`` bank rows of every slot, in PEFT's index dtype.
        weights: ``(S, k - 1)`` their first k-1 softmax weights.

    Example:
        >>> held = TopKTensors(torch.tensor([[0, 1]]), torch.tensor([[0.75]]))
        >>> held.subvectors(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
        [[0.75, 0.25]]
    """

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices)
        self.register_buffer("weights", weights)

    def subvectors(self, bank: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """``(stop - start, L)`` sub-vectors of slots ``start:stop``, composed in at least float32."""
        compute = torch.promote_types(bank.dtype, torch.float32)
        indices = self.indices[start:stop]  # (n, k)
        weights = complete_weights(self.weights[start:stop].to(compute))  # (n, k-1) -> (n, k)
        return compose(indices, weights, bank.to(device=indices.device, dtype=compute))


@dataclass(frozen=True)
class TopKSlice:
    """Where one module's slots lie in its adapter's :class:`TopKTensors`.

    Example:
        >>> where = TopKSlice(10, (2, 3), (4, 2))  # A: 2x3 slots from 10, then B: 4x2
        >>> where.a_slots, where.b_slots
        (slice(10, 16, None), slice(16, 24, None))
    """

    start: int  # first slot of side A; side B follows it
    a_shape: tuple[int, int]  # (r, in/L)
    b_shape: tuple[int, int]  # (out/L, r)

    @property
    def a_slots(self) -> slice:
        return slice(self.start, self.start + self.a_shape[0] * self.a_shape[1])

    @property
    def b_slots(self) -> slice:
        stop_a = self.a_slots.stop
        return slice(stop_a, stop_a + self.b_shape[0] * self.b_shape[1])
