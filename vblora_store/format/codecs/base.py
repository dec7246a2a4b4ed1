"""What a storage form's codec does: detect, decode, encode, count, describe.

Reading (:mod:`vblora_store.format.reading`) asks each registered form's codec
whether a file is its own (:meth:`Codec.detect`), then lets it present the
file's tensors in PEFT's key names (:meth:`Codec.decode`: logits, or top-k
indices and weights).  Conversion asks the target's codec for the tensors of
that form (:meth:`Codec.encode`).  The accounting, the report and the model
card ask every codec what its form would store and how to describe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ...config import VBLoRAConfig
from ..keys import parse_key
from ..stored import Slots, StoredAdapter, TensorSpec
from .checks import check_expansion

__all__ = ["FormCounts", "Decoded", "Codec", "peft_kind"]


@dataclass(frozen=True)
class FormCounts:
    """What the size of every form depends on.

    Attributes:
        bank_params: ``N·L``.
        slots: Sub-vector slots ``S``: ``r·(in + out) / L`` summed over the modules.
        num_vectors: ``N``.
        topk: ``k``.
    """

    bank_params: int
    slots: int
    num_vectors: int
    topk: int


@dataclass(frozen=True)
class Decoded:
    """A file's tensors in PEFT's key names, as a codec presents them.

    Attributes:
        specs: Dtype and shape by PEFT key.
        reader: Reads one tensor by PEFT key.
        order: The module order the file declares (``None``: the keys' order).
        packing: The codec's description of how values are stored, or ``None``.
        slots: All indices and weights in one table, of which the top-k tensors are views
            (:class:`~vblora_store.format.stored.Slots`), or ``None``.
    """

    specs: dict[str, TensorSpec]
    reader: Callable[[str], torch.Tensor]
    order: Optional[list[str]] = None
    packing: Any = None
    slots: Optional[Slots] = None


def peft_kind(specs: dict[str, TensorSpec]) -> str:
    """``"topk"`` if any tensor is top-k indices or weights, else ``"logits"`` (PEFT's two layouts)."""
    for key in specs:
        parts = parse_key(key)
        if parts is not None and parts.part != "logits":
            return "topk"
    return "logits"


class Codec:
    """A storage form's reading, writing, counting and describing.

    Attributes:
        label: The form's name in prose and tables (``"top-k"``).
        report_label: How the text report introduces what the form stores.
        bytes_note: What the report says after the form's byte count.
        card_note: The model card's bullet for adapters in this form
            (``{repo_id}`` and ``{name}`` are filled in).
        options: The conversion options this form takes (``"weights_dtype"``, ...).
    """

    label: str = ""
    report_label: str = ""
    bytes_note: str = "bytes"
    card_note: str = ""
    options: tuple[str, ...] = ()

    def detect(self, specs: dict[str, TensorSpec], metadata: Optional[dict[str, str]]) -> bool:
        """Whether a weights file with this header (tensors, safetensors metadata) is in this form."""
        raise NotImplementedError

    def decode(
        self,
        specs: dict[str, TensorSpec],
        reader,
        metadata: Optional[dict[str, str]],
        config: VBLoRAConfig,
        path: Path,
    ) -> Decoded:
        """The file's tensors in PEFT's key names, once the file is shown to back what decoding allocates.

        Every codec decodes through here: :meth:`expanded_bytes` (from the header alone) is held to
        :func:`~.checks.check_expansion` before :meth:`decode_tensors` reads a byte.  Codecs override
        those two, never this.

        Raises:
            InvalidAdapterError: the file declares more than it can back, or its codec refuses it.
        """
        check_expansion(self.expanded_bytes(specs, metadata, config, path), path)
        return self.decode_tensors(specs, reader, metadata, config, path)

    def expanded_bytes(
        self,
        specs: dict[str, TensorSpec],
        metadata: Optional[dict[str, str]],
        config: VBLoRAConfig,
        path: Path,
    ) -> int:
        """Bytes :meth:`decode_tensors` allocates, from the header alone (default: the stored tensors').

        A codec that decodes into more than it stores (decompression, unpacking) counts it here,
        checking the metadata it counts from.
        """
        return sum(spec.nbytes for spec in specs.values())

    def decode_tensors(
        self,
        specs: dict[str, TensorSpec],
        reader,
        metadata: Optional[dict[str, str]],
        config: VBLoRAConfig,
        path: Path,
    ) -> Decoded:
        """The file's tensors in PEFT's key names (default: as stored); see :meth:`decode`."""
        return Decoded(specs, reader)

    def encode(
        self, adapter: StoredAdapter, **options: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, safetensors metadata)`` of ``adapter`` (any form) in this form; every value checked."""
        raise NotImplementedError

    def savable_params(self, counts: FormCounts, packing: Any = None) -> int:
        """Float32-equivalent parameters this form stores (PEFT's ``get_nb_savable_parameters`` idea)."""
        raise NotImplementedError

    def data_bytes(self, counts: FormCounts) -> int:
        """Bytes of tensor data (headers aside) this form stores, lossless, float32 bank and weights."""
        raise NotImplementedError

    def bytes_note_for(self, rounded_from: Optional[str] = None) -> str:
        """:attr:`bytes_note` for an adapter whose dtype ``rounded_from`` (``"float64"``) this form would
        round to float32 (``None``: none); a form that stores every dtype as it is ignores it."""
        return self.bytes_note

    def precision(self, packing: Any = None) -> str:
        """``"lossless"``, or what a lossy packing keeps (``"weights float16, bank int8"``)."""
        return "lossless"

    def stored_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """Bytes this form would store for the packed form's ``tensors`` (one bank or weights encoding).

        Forms whose :attr:`options` include the precision options implement it:
        :mod:`vblora_store.precision` orders its candidates by it.
        """
        raise NotImplementedError(f"{type(self).__name__} takes no precision options")
