"""Converting adapters between storage forms, and writing them in PEFT's layout.

``convert_tensors`` is the pure middle: it streams one stored adapter's
tensors, tensor by tensor, into the target form's state dict.  ``write_adapter``
and ``convert`` are the edges that touch the disk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import save_file

from ..choices import BankDtype, WeightsDtype
from ..config import VBLoRAConfig
from ..errors import UnsupportedConversionError
from ..storage_forms import StorageForm
from .atomic import atomic_folder, check_destination, plain_file_mode
from .keys import WEIGHTS_NAME, WEIGHTS_NAME_BIN
from ..sources import resolve_source
from .reading import read_adapters
from .stored import StoredAdapter

__all__ = ["convert_tensors", "write_adapter", "convert", "SAFETENSORS_METADATA"]

SAFETENSORS_METADATA = {"format": "pt"}


def convert_tensors(
    adapter: StoredAdapter,
    to: StorageForm,
    *,
    weights_dtype: Union[WeightsDtype, str] = WeightsDtype.FLOAT32,
    bank_dtype: Union[BankDtype, str] = BankDtype.FLOAT32,
) -> tuple[VBLoRAConfig, dict[str, torch.Tensor], dict[str, str]]:
    """The config, state dict and safetensors metadata of ``adapter`` in form ``to``.

    Every value read is checked.  Logits are read one tensor at a time, so
    memory holds one logits tensor plus the (small) result.

    Args:
        adapter: A stored adapter, any form.
        to: The target form.
        weights_dtype: How to store the top-k weights (forms whose codec takes the option).
        bank_dtype: How to store the bank (likewise).

    Returns:
        ``(config, tensors, metadata)`` ready for :func:`write_adapter`.

    Raises:
        UnsupportedConversionError: to full from top-k or packed (the logits are
            gone), or a precision option for a form that takes none.
        InvalidAdapterError: a stored value is bad (NaN, index out of range).
    """
    to = StorageForm(to)
    options = {"weights_dtype": WeightsDtype(weights_dtype), "bank_dtype": BankDtype(bank_dtype)}
    asked = {name for name, value in options.items() if value.value != "float32"}
    if asked - set(to.codec.options):
        takers = [form.value for form in StorageForm if asked <= set(form.codec.options)]
        raise UnsupportedConversionError(
            f"{adapter.folder}: --weights-dtype and --bank-dtype apply to the {' and '.join(takers)} forms only; "
            f"add --to {takers[0]}."
        )
    if not adapter.form.has_logits and to.has_logits:
        raise UnsupportedConversionError(
            f"{adapter.folder}: is in {adapter.form.value} form; the full logits were discarded when it was "
            "saved, so it cannot become full again. Convert the original full adapter instead."
        )
    out, metadata = to.codec.encode(adapter, **{k: v for k, v in options.items() if k in to.codec.options})
    config = dataclasses.replace(adapter.config, save_only_topk_weights=not to.has_logits)
    metadata = metadata or dict(SAFETENSORS_METADATA)
    return config, out, metadata


def write_adapter(
    folder: Union[str, Path],
    config: VBLoRAConfig,
    tensors: dict[str, torch.Tensor],
    metadata: Optional[dict[str, str]] = None,
    *,
    safe_serialization: bool = True,
) -> None:
    """Write ``adapter_config.json`` and the weights into ``folder`` as PEFT does.

    The weights are ``adapter_model.safetensors``, or with ``safe_serialization=False``
    ``adapter_model.bin`` (``torch.save``), PEFT's two choices.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    weights = folder / (WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME_BIN)
    if safe_serialization:
        save_file(tensors, str(weights), metadata=metadata or SAFETENSORS_METADATA)
    else:
        torch.save(tensors, str(weights))
    os.chmod(weights, plain_file_mode())  # safetensors writes 0600; every file gets the umask's mode


def convert(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    to: Union[StorageForm, str] = StorageForm.TOPK,
    force: bool = False,
    weights_dtype: Union[WeightsDtype, str] = WeightsDtype.FLOAT32,
    bank_dtype: Union[BankDtype, str] = BankDtype.FLOAT32,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    precision: Optional[Callable[[StoredAdapter], dict]] = None,
    before_commit: Optional[Callable[[list[StoredAdapter]], None]] = None,
) -> list[StoredAdapter]:
    """Convert every adapter of the folder ``src`` into ``dst``, atomically.

    The layout is kept: ``default`` at the root, other adapters in sub-folders.
    Nothing appears at ``dst`` unless every adapter converted; ``src`` is only read.

    Args:
        src: A PEFT adapter folder, or a Hub repo id (``namespace/name``).
        dst: The folder to create.
        to: Target form: a :class:`StorageForm` or its name (``"topk"``, ``"packed"``, ``"compressed"``, ``"full"``).
        force: Replace ``dst`` if it exists.
        weights_dtype: Packed and compressed forms: ``float32`` (lossless), ``float16``, ``bfloat16``,
            ``fixed16``, ``fixed8``.
        bank_dtype: Packed and compressed forms: ``float32`` (lossless), ``float16``, ``bfloat16``,
            ``float8_e4m3``, ``int8``, ``int4``.
        revision, subfolder: Of a repo id (or a sub-folder of a local ``src``).
        precision: Gives each adapter its ``weights_dtype`` and ``bank_dtype``
            (:func:`vblora_store.precision.convert` chooses them by measured error).
        before_commit: Called with the converted adapters, read back (each ``folder`` where it will
            be), before ``dst`` appears; if it raises, nothing is written (the command line prints its
            report here, so a report that cannot be printed leaves no destination behind).

    Returns:
        The adapters as read from ``src``.

    Example:
        >>> [a.form.value for a in convert("fixtures/tiny-llama-vblora", tmp / "packed", to="packed")]
        ['full']
        >>> sorted(p.name for p in (tmp / "packed").iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    src = resolve_source(src, revision=revision, subfolder=subfolder)
    check_destination(dst, force=force, sources=(src,))
    adapters = read_adapters(src)
    with atomic_folder(dst, force=force) as work:
        for adapter in adapters:
            chosen = dict(weights_dtype=weights_dtype, bank_dtype=bank_dtype)
            if precision is not None:
                chosen.update(precision(adapter))
            config, tensors, metadata = convert_tensors(adapter, to, **chosen)
            write_adapter(work if adapter.folder == src else work / adapter.name, config, tensors, metadata)
            del tensors
        if before_commit is not None:
            written = read_adapters(work)
            before_commit(
                [dataclasses.replace(a, folder=Path(dst) / a.folder.relative_to(work)) for a in written]
            )
    return adapters
