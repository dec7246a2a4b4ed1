"""Converting adapters between storage forms, and writing them in PEFT's layout.

``convert_tensors`` is the pure middle: it streams one stored adapter's
tensors, tensor by tensor, into the target form's state dict.  ``write_adapter``
and ``convert`` are the edges that touch the disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from ..config import VBLoRAConfig
from ..errors import UnsupportedConversionError
from ..topk import select_topk
from .atomic import atomic_folder, check_destination
from .keys import WEIGHTS_NAME, StorageForm, index_dtype, indices_key, parse_key, weights_key
from .peft import StoredAdapter, check_tensor_values, read_adapters

__all__ = ["convert_tensors", "write_adapter", "convert", "SAFETENSORS_METADATA"]

SAFETENSORS_METADATA = {"format": "pt"}


def convert_tensors(adapter: StoredAdapter, to: StorageForm) -> tuple[VBLoRAConfig, dict[str, torch.Tensor]]:
    """The config and state dict of ``adapter`` in form ``to``, checking every value read.

    Logits are read one tensor at a time, so memory holds one logits tensor
    plus the (small) result.

    Args:
        adapter: A stored adapter.
        to: The target form.

    Returns:
        ``(config, tensors)`` ready for :func:`write_adapter`.

    Raises:
        UnsupportedConversionError: top-k to full (the logits are gone).
        InvalidAdapterError: a stored value is bad (NaN, index out of range).
    """
    if adapter.form is StorageForm.TOPK and to is StorageForm.FULL:
        raise UnsupportedConversionError(
            f"{adapter.folder}: is in top-k form; the full logits were discarded when it was saved, so it "
            "cannot become full again. Convert the original full adapter instead."
        )
    k, idx_dtype = adapter.config.topk, index_dtype(adapter.config.num_vectors)
    out: dict[str, torch.Tensor] = {}
    for key in adapter.specs:
        value = adapter.tensor(key)
        check_tensor_values(adapter, key, value)
        parts = parse_key(key)
        if to is StorageForm.TOPK and parts is not None and parts.part == "logits":
            indices, weights = select_topk(value, k, idx_dtype)
            out[indices_key(parts.module, parts.side)] = indices
            out[weights_key(parts.module, parts.side)] = weights
            del value
        else:
            out[key] = value
    config = dataclasses.replace(adapter.config, save_only_topk_weights=to is StorageForm.TOPK)
    return config, out


def write_adapter(folder: Union[str, Path], config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder`` as PEFT does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=SAFETENSORS_METADATA)


def convert(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    to: Union[StorageForm, str] = StorageForm.TOPK,
    force: bool = False,
) -> list[StoredAdapter]:
    """Convert every adapter of the folder ``src`` into ``dst``, atomically.

    The layout is kept: ``default`` at the root, other adapters in sub-folders.
    Nothing appears at ``dst`` unless every adapter converted; ``src`` is only read.

    Args:
        src: A PEFT adapter folder.
        dst: The folder to create.
        to: Target form (``"topk"`` or ``"full"``).
        force: Replace ``dst`` if it exists.

    Returns:
        The adapters as read from ``src``.

    Example:
        >>> convert("fixtures/tiny-llama-vblora", "/tmp/topk", to="topk")  # doctest: +SKIP
    """
    to = StorageForm(to)
    src = Path(src)
    check_destination(dst, force=force, sources=(src,))
    adapters = read_adapters(src)
    with atomic_folder(dst, force=force) as work:
        for adapter in adapters:
            config, tensors = convert_tensors(adapter, to)
            write_adapter(work if adapter.folder == src else work / adapter.name, config, tensors)
            del tensors
    return adapters
