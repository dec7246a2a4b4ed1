"""The Hugging Face Hub in three rooms: :mod:`vblora_store.sources` (resolve and download), :mod:`.card`, :mod:`.publish`.

The engine and every reader of adapters depend on the sources alone (a room
below the format layer); the card and the publisher sit above it.  The one
exception is ``VBLoRAModel.push_to_hub``: it imports
:func:`.publish.push_model` (save, then :func:`.publish.push`) when it is
called, never at import.  The names here are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ADAPTER_FILES", "is_repo_id", "model_card", "push", "resolve_source"]

_HOMES = {
    "ADAPTER_FILES": "sources",
    "is_repo_id": "sources",
    "resolve_source": "sources",
    "model_card": "card",
    "push": "publish",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vblora_store.hub' has no attribute {name!r}")
    home = _HOMES[name]
    module = importlib.import_module("vblora_store.sources" if home == "sources" else f"{__name__}.{home}")
    return getattr(module, name)
