"""The Hugging Face Hub in three rooms: :mod:`.sources` (resolve and download), :mod:`.card`, :mod:`.publish`.

The engine and every reader of adapters depend on :mod:`.sources` alone; the
names here are imported on first use, so reading a local folder never loads
the card or the publisher.
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
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
