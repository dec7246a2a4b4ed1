"""Sources: a local adapter folder, or a Hub repo id downloaded to one.

:func:`resolve_source` is the one door through which every reader of adapters
(``read_adapters``, ``convert``, ``export_lora``, ``merge``, the engine and the
command line) turns a path or a repo id (``namespace/name``) into a local
folder, downloading only the adapter files into huggingface_hub's cache.  Token,
endpoint and cache are huggingface_hub's (``HF_TOKEN`` or ``hf auth login``,
``HF_ENDPOINT``, ``HF_HOME``); the token is never printed.  huggingface_hub is
imported only when a repo id is resolved; every Hub failure becomes a one-line
:class:`~vblora_store.errors.HubError` (:func:`hub_errors`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import AdapterNotFoundError, HubAuthError, HubConnectionError, HubError, HubNotFoundError
from .folders import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_BIN, find_adapter_folders

__all__ = ["ADAPTER_FILES", "is_repo_id", "resolve_source", "hub_errors", "describe_repo"]


def is_repo_id(value: Union[str, Path]) -> bool:
    """True if ``value`` is a Hub repo id of the form ``namespace/name``.

    Only the syntax is checked (huggingface_hub's validator); nothing is fetched.
    A :class:`~pathlib.Path` is never a repo id.

    Args:
        value: A command-line source or a ``base_model_name_or_path``.

    Returns:
        Whether it names a Hub repo.

    Example:
        >>> is_repo_id("acme/tiny-vblora"), is_repo_id("runs/a/b"), is_repo_id("./adapter")
        (True, False, False)
    """
    if not isinstance(value, str) or value.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_source(
    path_or_repo: Union[str, Path],
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    nested: bool = True,
) -> Path:
    """The local folder holding the adapters of a local path or a Hub repo id.

    A local path that exists always wins.  Otherwise a repo id is downloaded
    through huggingface_hub (its cache, its endpoint, its token), restricted to
    :data:`ADAPTER_FILES`; anything else is returned as a path, so reading it
    fails with the usual "no such file or folder".

    Args:
        path_or_repo: An adapter folder, or ``namespace/name``.
        revision: Branch, tag or commit of a repo (default: its main branch);
            ignored for a local folder.
        subfolder: The folder, inside the repo or the local folder, that holds
            the adapter (as PEFT's ``subfolder``).
        nested: Also fetch the adapters in sub-folders (PEFT's multi-adapter
            layout); a caller that loads one adapter passes ``False``.

    Returns:
        A local folder to give to :func:`~vblora_store.format.read_adapters`.

    Raises:
        HubNotFoundError: no such repo, revision, or adapter in it.
        HubAuthError: the token was rejected, or the repo is gated.
        HubConnectionError: the Hub cannot be reached and the files are not cached.

    Example:
        >>> read_adapters(resolve_source("acme/tiny-vblora", revision="v1"))  # doctest: +SKIP
    """
    local = Path(path_or_repo)
    if local.exists() or not is_repo_id(path_or_repo):
        return local / subfolder if subfolder else local
    return _download(str(path_or_repo), revision=revision, subfolder=subfolder, nested=nested)


def _download(repo_id: str, *, revision: Optional[str], subfolder: Optional[str], nested: bool) -> Path:
    """Fetch the adapter files of ``repo_id`` (under ``subfolder``) into the cache; check they are there."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + name for name in ADAPTER_FILES]
    if nested:
        patterns += [f"{prefix}*/{name}" for name in ADAPTER_FILES]
    where = describe_repo(repo_id, revision, subfolder)
    with hub_errors(where):
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    folder = snapshot / subfolder if subfolder else snapshot
    try:
        found = find_adapter_folders(folder)
    except AdapterNotFoundError:
        raise HubNotFoundError(
            f"{where}: holds no {CONFIG_NAME}; check the repo id, --revision and --subfolder."
        ) from None
    for _, adapter_folder in found:
        if not any((adapter_folder / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_NAME_BIN)):
            in_repo = (adapter_folder / CONFIG_NAME).relative_to(snapshot).as_posix()
            raise HubNotFoundError(
                f"{where}: {in_repo} has no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} beside it; "
                "upload the weights file too (vblora-store push uploads both)."
            )
    return folder


@contextmanager
def hub_errors(where: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line typed errors naming ``where`` and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx

    endpoint = constants.ENDPOINT
    login = "set HF_TOKEN or run `hf auth login`"
    try:
        yield
    except GatedRepoError as e:
        raise HubAuthError(f"{where}: is gated on {endpoint}; ask for access, then {login}.") from e
    except RevisionNotFoundError as e:
        raise HubNotFoundError(
            f"{where}: no such revision on {endpoint}; pass one of the repo's branches, tags or commits."
        ) from e
    except RepositoryNotFoundError as e:
        raise HubNotFoundError(
            f"{where}: no such repo on {endpoint}, or it is private and your token cannot read it; "
            f"check the id (and that no local folder of that name was meant), or {login}."
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError) as e:
        raise HubConnectionError(
            f"{where}: cannot reach {endpoint} and the files are not in the local cache; "
            "check the network and HF_ENDPOINT (and that HF_HUB_OFFLINE is unset), then retry."
        ) from e
    except EntryNotFoundError as e:
        raise HubNotFoundError(f"{where}: a file is missing on {endpoint}; push the adapter again.") from e
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status == 401:
            raise HubAuthError(f"{where}: {endpoint} rejected your token (401); {login} anew.") from e
        if status == 403:
            raise HubAuthError(
                f"{where}: your token may not do this on {endpoint} (403); use a token with write access to "
                "this namespace, or push to your own."
            ) from e
        detail = f": {e.server_message.splitlines()[0]}" if e.server_message else ""
        raise HubError(f"{where}: {endpoint} answered HTTP {status}{detail}; retry later.") from e


def describe_repo(repo_id: str, revision: Optional[str] = None, subfolder: Optional[str] = None) -> str:
    """``repo_id`` with the revision and sub-folder asked for, as error messages name it."""
    extras = [f"revision {revision}"] * bool(revision) + [f"subfolder {subfolder}"] * bool(subfolder)
    return f"{repo_id} ({', '.join(extras)})" if extras else repo_id
