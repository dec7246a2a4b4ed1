"""Serving VB-LoRA adapters with vLLM: a plugin vLLM loads in each of its processes.

Installing vblora_store beside vLLM is all it takes: the ``vllm.general_plugins``
entry point ``vblora_store`` calls :func:`register` in every vLLM process (API
server, engine core, each worker).  From then on a VB-LoRA adapter folder, in
any form vblora_store reads, is served wherever vLLM takes a LoRA adapter
(``LoRARequest``, ``--lora-modules``, ``/v1/load_lora_adapter``), as the exact
rank-r LoRA adapter that ``vblora-store export-lora`` would write; the LoRA
tensors exist only in memory.  Names resolve from a store directory or the Hub
(:mod:`.resolver`).  vLLM is imported only inside this sub-package, and only
when vLLM itself calls in; the rest of vblora_store never imports it.

docs/vllm.md tells the whole story.
"""

from __future__ import annotations

from .compat import SUPPORTED_VLLM, check_vllm_version

__all__ = ["SUPPORTED_VLLM", "check_vllm_version", "register"]

_registered = False


def register() -> None:
    """The plugin: patch vLLM's LoRA loader and register the resolver, once per process.

    vLLM calls it in each of its processes (its plugins may be loaded more than
    once); a second call does nothing.

    Raises:
        UnsupportedVLLMError: the installed vLLM is outside :data:`SUPPORTED_VLLM`.

    Example:
        >>> register()  # doctest: +SKIP
    """
    global _registered
    if _registered:
        return
    check_vllm_version()
    from . import base_rows, early, loader, resolver

    loader.install()
    base_rows.install()
    early.install()
    resolver.install()
    _registered = True
