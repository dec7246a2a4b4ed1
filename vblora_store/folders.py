"""PEFT's folder layout: which files make an adapter, and which adapters a folder holds.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``); the adapter named ``default`` sits at the root and
every other adapter in a sub-folder named after it.  Files and names only: no
tensor is read here, so the Hub's downloader and the format layer share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .config import CONFIG_NAME
from .errors import AdapterNotFoundError, read_error

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_NAME_BIN",
    "ADAPTER_FILES",
    "is_within",
    "find_adapter_folders",
]

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
#: The files of one adapter: all a repo id source downloads, at its root and in each sub-folder.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_BIN)


def is_within(target: Path, folder: Path) -> bool:
    """Whether the resolved ``target`` is ``folder`` or lies under it."""
    return target == folder or folder in target.parents


def find_adapter_folders(path: Union[str, Path]) -> list[tuple[str, Path]]:
    """The ``(adapter_name, folder)`` pairs PEFT's layout puts under ``path``.

    The root is ``default``; each immediate sub-folder with an
    ``adapter_config.json`` is the adapter of that name.  Hidden sub-folders,
    and sub-folders that are symbolic links leading outside ``path``, are skipped.

    Raises:
        AdapterNotFoundError: ``path`` is missing or holds no adapter.
        ReadError: a folder cannot be listed (permission denied).
    """
    root = Path(path)
    if not root.exists():
        raise AdapterNotFoundError(f"{root}: no such file or folder; check the path.")
    if not root.is_dir():
        raise AdapterNotFoundError(f"{root}: not a folder; pass the adapter folder that holds {CONFIG_NAME}.")
    found, where = [], root
    try:
        if (root / CONFIG_NAME).is_file():
            found.append(("default", root))
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            where = sub
            if sub.is_symlink() and not is_within(sub.resolve(), root.resolve()):
                continue
            if (sub / CONFIG_NAME).is_file():
                found.append((sub.name, sub))
    except OSError as e:  # a folder the system will not let us list (permission denied)
        raise read_error(where, e) from e
    if not found:
        raise AdapterNotFoundError(
            f"{root}: no {CONFIG_NAME} here or in its sub-folders; point at a folder written by "
            "PEFT's save_pretrained."
        )
    return found
