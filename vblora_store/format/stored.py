"""A stored adapter: what the file holds, validated, presented in PEFT's key names; and the value checks.

:class:`StoredAdapter` is built by :mod:`.reading` only once the file's header
has been checked against the config, and does not change after.  Whatever
the storage form, ``specs`` and ``tensor()`` speak PEFT's key names (a packed
adapter presents the top-k tensors it decodes to; ``stored_specs`` lists what
the file holds).  Every value a result is computed from is read through
:meth:`StoredAdapter.checked_tensor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError

from ..config import VBLoRAConfig
from ..dtypes import name_of
from ..errors import InvalidAdapterError
from ..storage_forms import StorageForm
from .keys import BANK_KEY, indices_key, parse_key, weights_key

__all__ = ["ModuleShape", "TensorSpec", "Slots", "StoredAdapter", "check_tensor_values"]


@dataclass(frozen=True)
class ModuleShape:
    """One adapted module: its name (without ``base_model.model.``) and features."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's dtype and shape, known from the file header alone."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def describe(self) -> str:
        """``"float32 [4, 2, 30]"``, as messages name a tensor."""
        return f"{name_of(self.dtype)} {list(self.shape)}"


@dataclass(frozen=True)
class Slots:
    """Every sub-vector slot's top-k selection, all modules in one table (a decoding codec's own layout).

    Slots run module by module in the order of ``StoredAdapter.modules``, side A ``(r, in/L)`` then
    side B ``(out/L, r)``, each row-major: the packed form's layout (docs/format.md).  Each PEFT
    indices or weights tensor of the adapter is a view of one run of rows here.

    Attributes:
        indices: ``(S, k)`` bank indices, PEFT's index dtype.
        weights: ``(S, k - 1)`` top-k weights as PEFT stores them (the last one dropped).
    """

    indices: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class StoredAdapter:
    """One adapter as stored on disk: config, form, modules and lazy tensors.

    Build it with :func:`~vblora_store.format.read_adapter` or
    :func:`~vblora_store.format.read_adapters`.

    Attributes:
        folder: The folder holding the adapter's two files.
        name: The adapter name (``default`` at a folder's root).
        config: The parsed ``adapter_config.json``.
        weights_path: The weights file.
        form: Its :class:`~vblora_store.storage_forms.StorageForm` (``form.codec`` reads and writes it).
        modules: Adapted modules in file order, by name.
        specs: Dtype and shape of every tensor, in PEFT's key names, by key.
        stored_specs: What the file itself holds (``specs`` but for a decoding codec).
        packing: The form's own description of how it stores values (a packed
            form's :class:`~vblora_store.format.codecs.packed.Packing`), or ``None``.
        slots: Every module's indices and weights in one table, where the form decodes to one
            (packed, compressed), else ``None``: what lets a whole adapter be composed in a few
            large operations rather than a few per tensor.
    """

    folder: Path
    name: str
    config: VBLoRAConfig
    weights_path: Path
    form: StorageForm
    modules: dict[str, ModuleShape]
    specs: dict[str, TensorSpec]
    stored_specs: dict[str, TensorSpec]
    packing: Optional[Any] = None
    reader: Callable[[str], torch.Tensor] = field(default=None, repr=False, compare=False)
    slots: Optional[Slots] = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"StoredAdapter({str(self.folder)!r}, name={self.name!r}, form={self.form.value})"

    @property
    def file_bytes(self) -> int:
        """Size of the weights file in bytes."""
        return self.weights_path.stat().st_size

    @property
    def other_keys(self) -> list[str]:
        """Keys of tensors that are neither the bank nor logits-family (modules_to_save, biases)."""
        return [k for k in self.specs if k != BANK_KEY and parse_key(k) is None]

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor (PEFT's key name).

        Raises:
            InvalidAdapterError: the file cannot back the tensor its header declares.
        """
        try:
            return self.reader(key)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise InvalidAdapterError(
                f"{self.weights_path}: tensor {key!r} cannot be read ({e}); the file is damaged, fetch it again."
            ) from e

    def checked_tensor(self, key: str) -> torch.Tensor:
        """Read one tensor and check its values (see :func:`check_tensor_values`).

        Everything that computes from an adapter reads through this: a NaN, or an
        index outside the bank (which would silently select another vector), is
        refused rather than used.

        Raises:
            InvalidAdapterError: naming the file and the tensor.
        """
        value = self.tensor(key)
        check_tensor_values(self, key, value)
        return value

    def checked_slots(self) -> Slots:
        """:attr:`slots`, their values checked at once by the rules :meth:`checked_tensor` applies per tensor.

        A bad value is then looked up tensor by tensor, so the error names the
        tensor that holds it, exactly as reading it alone would.

        Raises:
            ValueError: the adapter's form keeps no slot table (``slots`` is ``None``).
            InvalidAdapterError: naming the file and the first bad tensor.
        """
        if self.slots is None:
            raise ValueError(f"{self.weights_path}: its {self.form.value} form keeps no slot table")
        n = self.config.num_vectors
        indices, weights = self.slots.indices, self.slots.weights
        if _value_problem(indices, "indices", n) or _value_problem(weights, "weights", n):
            for module in self.modules:
                for side in ("A", "B"):
                    self.checked_tensor(indices_key(module, side))
                    self.checked_tensor(weights_key(module, side))
            raise InvalidAdapterError(  # the table and the tensors are the same values: not reached
                f"{self.weights_path}: its top-k table holds a bad value; the file is damaged, "
                "fetch it again."
            )
        return self.slots

    def check_values(self) -> None:
        """Read every tensor once and check its values: finite floats, indices in ``[0, N)``.

        Raises:
            InvalidAdapterError: naming the file and the first bad tensor.
        """
        for key in self.specs:
            self.checked_tensor(key)


def _non_finite(value: torch.Tensor, *, logits_k: Optional[int]) -> Optional[str]:
    """What is wrong with the non-finite values of a floating ``value``, or ``None`` if nothing is.

    ``aminmax`` propagates NaN and its bounds are finite only if every value is,
    so the common case is one pass with no temporary the size of ``value``
    (about 4x faster than ``torch.isfinite(value).all()`` on logits tensors).
    Logits (``logits_k`` is the adapter's k) may hold ``-inf``: PEFT writes it
    for every logit outside the top-k when it saves a top-k-loaded adapter in
    full form; each row must keep at least k finite logits.
    """
    if value.numel() == 0:
        return None
    low, high = torch.aminmax(value)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return None
    if bool(torch.isnan(low) | torch.isnan(high)):
        return "holds NaN values"
    if bool(high == float("inf")):
        return "holds +inf values"
    if logits_k is None:
        return "holds -inf values"
    fewest = int(torch.isfinite(value).sum(-1).min())  # only for PEFT's -inf logits
    if fewest < logits_k:
        return f"has a row with {fewest} finite logits, fewer than topk={logits_k}"
    return None


def check_tensor_values(adapter: StoredAdapter, key: str, value: torch.Tensor) -> None:
    """Raise :class:`InvalidAdapterError` if ``value`` (stored as ``key``) holds bad values.

    Floats must be finite, except PEFT's ``-inf`` logits (at least k finite per
    row); top-k weights a sub-simplex; indices in ``[0, N)``.
    """
    parts = parse_key(key)
    config = adapter.config
    part = None if parts is None else parts.part
    problem = _value_problem(value, part, config.num_vectors, topk=config.topk)
    if problem is not None:
        raise InvalidAdapterError(f"{adapter.weights_path}: tensor {key!r} {problem}")


def _value_problem(
    value: torch.Tensor, part: Optional[str], num_vectors: int, *, topk: int = 0
) -> Optional[str]:
    """What is wrong with the values of a tensor of kind ``part`` (``"indices"``, ``"weights"``,
    ``"logits"``, ``None`` for any other), as the end of a message, or ``None``: the rules, once."""
    if value.is_floating_point():
        problem = _non_finite(value, logits_k=topk if part == "logits" else None)
        if problem is not None:
            return f"{problem}; the adapter is broken, retrain or restore it."
        if part == "weights":
            if bool((value < 0).any()) or bool((value.sum(-1) > 1 + 1e-3).any()):
                return (
                    "is not a set of top-k softmax weights (negative, or summing above 1); "
                    "the file is damaged."
                )
    if part == "indices":
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_vectors):
            return (
                f"holds indices outside [0, {num_vectors}); the file does not match num_vectors in its "
                "config; restore the file or its config from the source."
            )
    return None
