"""Typed errors of vblora_store.

Every error raised on bad input derives from :class:`VBLoRAStoreError`, and also
from the built-in exception a caller would expect (``FileNotFoundError``,
``ValueError``, ...), so ``except ValueError`` keeps working.  Messages name the
file or key, say what is wrong, and say what to do next.  The command line maps
every ``VBLoRAStoreError`` to exit code 2 and prints its message alone.
"""

from __future__ import annotations

__all__ = [
    "VBLoRAStoreError",
    "AdapterNotFoundError",
    "InvalidAdapterError",
    "InvalidConfigError",
    "UnsupportedConversionError",
    "DestinationExistsError",
    "TargetingError",
    "AdapterStateError",
    "AdapterNamesError",
    "CheckpointNotFoundError",
    "InvalidCheckpointError",
    "UnsafePathError",
]


class VBLoRAStoreError(Exception):
    """Base class of every error vblora_store raises on bad input or misuse."""


class AdapterNotFoundError(VBLoRAStoreError, FileNotFoundError):
    """A path holds no adapter, or a file the adapter needs is missing."""


class InvalidAdapterError(VBLoRAStoreError, ValueError):
    """Adapter files exist but their tensors are damaged or inconsistent."""


class InvalidConfigError(VBLoRAStoreError, ValueError):
    """An ``adapter_config.json`` or a ``VBLoRAConfig`` is unusable."""


class UnsupportedConversionError(VBLoRAStoreError, ValueError):
    """A conversion that cannot be done, such as top-k back to full logits."""


class DestinationExistsError(VBLoRAStoreError, FileExistsError):
    """The destination exists and overwriting it was not asked for."""


class TargetingError(VBLoRAStoreError, ValueError):
    """A model's modules do not fit the adapter (no match, bad shapes)."""


class AdapterStateError(VBLoRAStoreError, RuntimeError):
    """An operation that the adapter's current state does not allow."""


class AdapterNamesError(VBLoRAStoreError, ValueError):
    """A mixed-adapter batch (``adapter_names=[...]``) that cannot be run as asked."""


class CheckpointNotFoundError(VBLoRAStoreError, FileNotFoundError):
    """A base-model checkpoint folder is missing, or holds no safetensors weights."""


class InvalidCheckpointError(VBLoRAStoreError, ValueError):
    """A base-model checkpoint's files are unreadable or disagree with each other."""


class HubError(VBLoRAStoreError):
    """The Hugging Face Hub refused or failed a request (the base of every Hub error)."""


class InvalidRepoIdError(HubError, ValueError):
    """A string that should be a Hub repo id (``namespace/name``) is not one."""


class HubAuthError(HubError, PermissionError):
    """No token, a token the Hub rejected, or a token without the access needed."""


class HubNotFoundError(HubError, AdapterNotFoundError):
    """The repo, the revision, or an adapter file in it does not exist (or is not visible)."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub endpoint cannot be reached, and the files are not in the local cache."""


class UnsafePathError(VBLoRAStoreError, PermissionError):
    """A symbolic link inside an adapter folder leads outside it, so it is not followed."""
