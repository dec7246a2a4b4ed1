"""Typed errors of vblora_store.

Every error raised on bad input derives from :class:`VBLoRAStoreError`, and also
from the built-in exception a caller would expect (``FileNotFoundError``,
``ValueError``, ...), so ``except ValueError`` keeps working.  Messages name the
file or key, say what is wrong, and say what to do next.  The command line maps
every ``VBLoRAStoreError`` to exit code 2 and prints its message alone.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "VBLoRAStoreError",
    "AdapterNotFoundError",
    "InvalidAdapterError",
    "InvalidConfigError",
    "MissingConfigKeyError",
    "UnsupportedConversionError",
    "DestinationExistsError",
    "TargetingError",
    "AdapterStateError",
    "AdapterNameError",
    "UnsafeMergeError",
    "InvalidArgumentError",
    "AdapterNamesError",
    "CheckpointNotFoundError",
    "InvalidCheckpointError",
    "UnsafePathError",
    "UnsupportedVLLMError",
    "ServingRefusedError",
    "WriteError",
    "ReadError",
    "OSProblem",
    "os_problem",
    "read_error",
    "untrainable_topk",
    "untrainable_dropped_logits",
]


class VBLoRAStoreError(Exception):
    """Base class of every error vblora_store raises on bad input or misuse."""


class AdapterNotFoundError(VBLoRAStoreError, FileNotFoundError):
    """A path holds no adapter, or a file the adapter needs is missing."""


class InvalidAdapterError(VBLoRAStoreError, ValueError):
    """Adapter files exist but their tensors are damaged or inconsistent."""


class InvalidConfigError(VBLoRAStoreError, ValueError):
    """An ``adapter_config.json`` or a ``VBLoRAConfig`` is unusable."""


class MissingConfigKeyError(InvalidConfigError, TypeError):
    """A config file lacks a key every PEFT config has (a ``TypeError`` too, as PEFT raises)."""


class UnsupportedConversionError(VBLoRAStoreError, ValueError):
    """A conversion that cannot be done, such as top-k back to full logits."""


class DestinationExistsError(VBLoRAStoreError, FileExistsError):
    """The destination exists and overwriting it was not asked for."""


class TargetingError(VBLoRAStoreError, ValueError):
    """A model's modules do not fit the adapter (no match, bad shapes)."""


class AdapterStateError(VBLoRAStoreError, ValueError, RuntimeError):
    """An operation that the adapter's current state does not allow.

    A ``ValueError``, as PEFT raises for an unknown, taken or merged adapter name,
    and a ``RuntimeError``, as PEFT's training forward raises for ``-inf`` logits.
    """


class AdapterNameError(AdapterStateError):
    """A name that cannot name an adapter: empty, with a ``.``, or the reserved ``"__base__"``."""


class UnsafeMergeError(AdapterStateError):
    """``safe_merge`` found NaN or infinite merged weights (a ``ValueError``, as PEFT raises)."""


class InvalidArgumentError(VBLoRAStoreError, ValueError):
    """An argument of a call that cannot be taken as given (a malformed device, say)."""


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


class UnsupportedVLLMError(VBLoRAStoreError, RuntimeError):
    """The installed vLLM is outside the versions the vLLM plugin supports."""


class ServingRefusedError(VBLoRAStoreError, ValueError):
    """vLLM cannot serve this adapter as configured (rank, biases, module shapes, ...): refused at load time."""


class WriteError(VBLoRAStoreError, OSError):
    """The operating system refused a write (full disk, read-only or missing folder, no permission)."""


class ReadError(VBLoRAStoreError, OSError):
    """The operating system refused a read (no permission, an I/O error): the file itself may be sound."""


#: What to do about each operating-system failure while writing, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that device, or choose another destination",
    errno.EDQUOT: "free space within your quota, or choose another destination",
    errno.EACCES: "choose a destination you may write to, or change its permissions",
    errno.EPERM: "choose a destination you may write to, or change its permissions",
    errno.EROFS: "choose another destination",  # strerror already says "read-only file system"
    errno.ENOTDIR: "choose another path",
    errno.EEXIST: "choose another path",
    errno.EISDIR: "give a file name, not a folder's",
    errno.ENOENT: "a folder on the way does not exist and cannot be made; check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the device reported an I/O error; check it, or choose another destination",
}
#: What to do about each operating-system failure while reading (or looking at) a path, by errno.
_READ_FIXES = {
    errno.EACCES: "check its permissions, or run as a user who may read it",
    errno.EPERM: "check its permissions, or run as a user who may read it",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give the file, not its folder",
    errno.ELOOP: "check the symbolic links on the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "the device reported an I/O error; check it, or fetch the file again",
}
#: Plainer words than ``strerror``'s where the error is about the path itself.
_TEXTS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


class OSProblem:
    """An operating-system failure reduced to its errno and text, from an ``OSError`` or a library's message."""

    def __init__(self, code: Optional[int], text: str):
        self.code, self.text = code, _TEXTS.get(code, text)

    def message(self, verb: str, path: Union[str, Path]) -> str:
        """``cannot <verb> <path>: <what happened>; <what to do>.``

        ``write`` gets a writer's advice (another destination); any other verb (``read``,
        ``access``) a reader's (the file's permissions).

        Example:
            >>> problem = os_problem(PermissionError(13, "Permission denied"))
            >>> problem.message("read", "w")
            'cannot read w: permission denied; check its permissions, or run as a user who may read it.'
            >>> problem.message("write", "w")  # doctest: +ELLIPSIS
            'cannot write w: permission denied; choose a destination you may write to, ...'
        """
        fixes = _WRITE_FIXES if verb == "write" else _READ_FIXES
        fix = fixes.get(self.code, "check the path and its permissions")
        return f"cannot {verb} {path}: {self.text}; {fix}."


def os_problem(error: BaseException) -> Optional[OSProblem]:
    """The :class:`OSProblem` behind ``error``, or ``None`` when it is no operating-system failure.

    safetensors and torch report a failed write as their own exception with
    ``(os error N)`` in the message; an ``OSError`` carries its errno.

    Example:
        >>> os_problem(OSError(28, "No space left on device")).message("write", "out")
        'cannot write out: no space left on device; free space on that device, or choose another destination.'
    """
    if isinstance(error, OSError) and error.errno is not None:
        return OSProblem(error.errno, (error.strerror or str(error)).lower())
    match = _OS_ERROR_CODE.search(str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSProblem(code, os.strerror(code).lower())


def read_error(path: Union[str, Path], error: OSError) -> ReadError:
    """The :class:`ReadError` for ``error``, raised while reading ``path``: what happened, and a reader's fix.

    Example:
        >>> str(read_error("c.json", PermissionError(13, "Permission denied")))
        'cannot read c.json: permission denied; check its permissions, or run as a user who may read it.'
    """
    problem = os_problem(error) or OSProblem(None, str(error))
    return ReadError(problem.message("read", path))


#: PEFT's words for the same refusal, kept in ours so code matching PEFT's message still matches.
_PEFT_TRAINING_REFUSAL = (
    "Found infinity values in VB-LoRA logits. Ensure training was not resumed from a `save_only_topk_weights` model."
)


def untrainable_topk(where: str, form: str, fix: str) -> AdapterStateError:
    """Training asked of an adapter held without logits (top-k, packed, ...), with the caller's ``fix``.

    Example:
        >>> str(untrainable_topk("adapter 'a'", "topk", "load the full-form adapter."))[:61]
        "adapter 'a': held in topk form, which keeps the top-k weights"
    """
    return AdapterStateError(
        f"{where}: held in {form} form, which keeps the top-k weights but not the logits, so it cannot be "
        f"trained; {fix} (PEFT: {_PEFT_TRAINING_REFUSAL})"
    )


def untrainable_dropped_logits(where: str, fix: str) -> AdapterStateError:
    """Training asked of PEFT's ``-inf`` logits (a top-k adapter saved in full form), with a ``fix``.

    Example:
        >>> "cannot be trained" in str(untrainable_dropped_logits("x", "train the original."))
        True
    """
    return AdapterStateError(
        f"{where} holds -inf logits (PEFT's full save of an adapter loaded from top-k form): the dropped "
        f"logits can never re-enter the top-k, so it cannot be trained; {fix} (PEFT: {_PEFT_TRAINING_REFUSAL})"
    )
