"""Adapters by name: a LoRA resolver over a local store directory and the Hugging Face Hub.

With ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, vLLM's OpenAI server asks its
resolvers for a ``model`` it does not know yet, loads what they return and
serves it.  Ours answers from two places, configured by environment variables
read here and nowhere else (:meth:`Settings.from_env`):

``VBLORA_VLLM_STORE``
    A directory of adapters, one folder per name: ``model="team/support-v2"``
    is ``$VBLORA_VLLM_STORE/team/support-v2``.  A name never leads outside it.
``VBLORA_VLLM_HUB``
    ``1`` to also take names shaped as Hub repo ids, ``namespace/name``,
    optionally pinned as ``namespace/name@revision``; the adapter files
    (only they) are fetched through :func:`vblora_store.sources.resolve_source`
    into huggingface_hub's cache (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``).

The store is asked first.  A name neither knows is left to vLLM's other
resolvers (and, if none knows it, a 404).  The adapter found is loaded by
:mod:`.loader`: only the compact form is ever on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import CONFIG_NAME
from ..errors import HubError, HubNotFoundError
from ..sources import is_repo_id, resolve_source

__all__ = ["STORE_ENV", "HUB_ENV", "RESOLVER_NAME", "Settings", "VBLoRAResolver", "install"]

STORE_ENV = "VBLORA_VLLM_STORE"
HUB_ENV = "VBLORA_VLLM_HUB"
RESOLVER_NAME = "vblora_store"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Where the resolver looks: a store directory (or none), and whether the Hub is asked."""

    store: Optional[Path] = None
    hub: bool = False

    @classmethod
    def from_env(cls, environ: Optional[dict] = None) -> "Settings":
        """Read :data:`STORE_ENV` and :data:`HUB_ENV`.

        Example:
            >>> Settings.from_env({"VBLORA_VLLM_STORE": "/srv/adapters", "VBLORA_VLLM_HUB": "1"})
            Settings(store=PosixPath('/srv/adapters'), hub=True)
        """
        environ = os.environ if environ is None else environ
        store = environ.get(STORE_ENV) or None
        hub = environ.get(HUB_ENV, "0").strip().lower() in ("1", "true", "yes")
        return cls(store=Path(store) if store else None, hub=hub)

    @property
    def active(self) -> bool:
        return self.store is not None or self.hub


class VBLoRAResolver:
    """vLLM's ``LoRAResolver`` for adapters named by store folder or Hub repo id."""

    def __init__(self, settings: Settings):
        self.settings = settings

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        """The ``LoRARequest`` of ``lora_name``, or ``None`` if neither the store nor the Hub has it."""
        folder = await asyncio.to_thread(self.find, lora_name)
        if folder is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))  # vLLM sets the id

    def find(self, lora_name: str) -> Optional[Path]:
        """The local adapter folder of ``lora_name``: the store's, else the Hub's (downloaded); or ``None``.

        Example:
            >>> VBLoRAResolver(Settings(store=Path("fixtures"))).find("tiny-llama-vblora").name
            'tiny-llama-vblora'
            >>> VBLoRAResolver(Settings(store=Path("fixtures"))).find("../README.md") is None
            True
        """
        if self.settings.store is not None:
            folder = _in_store(self.settings.store, lora_name)
            if folder is not None:
                return folder
        if self.settings.hub:
            repo_id, _, revision = lora_name.partition("@")
            if is_repo_id(repo_id):
                try:
                    return resolve_source(repo_id, revision=revision or None, nested=False)
                except HubNotFoundError:
                    return None
                except HubError as e:  # cannot reach or may not read the Hub: say so, and answer "unknown"
                    _log.warning("%s", e)
        return None


def _in_store(store: Path, name: str) -> Optional[Path]:
    """``store/name`` if it is an adapter folder inside the store (never a path leading out of it)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    folder = store / name
    try:
        inside = folder.resolve().is_relative_to(store.resolve())
    except OSError:
        return None
    return folder if inside and (folder / CONFIG_NAME).is_file() else None


def install(settings: Optional[Settings] = None) -> None:
    """Register the resolver with vLLM if a store or the Hub is configured."""
    settings = Settings.from_env() if settings is None else settings
    if not settings.active:
        return
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    LoRAResolver.register(VBLoRAResolver)  # an ABC's virtual subclass: isinstance checks pass
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, VBLoRAResolver(settings))
