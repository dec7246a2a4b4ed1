"""Publishing: upload adapters to the Hub in one commit, with their model card.

The repo is created if missing; every value is checked before anything is
sent; the commit holds exactly ``README.md`` and each adapter's two files, in
PEFT's layout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

from ..errors import HubAuthError, InvalidRepoIdError
from ..folders import CONFIG_NAME
from ..format import StorageForm, convert, read_adapters
from ..format.atomic import TMP_PREFIX
from .card import model_card
from ..sources import describe_repo, hub_errors, is_repo_id

__all__ = ["push", "push_model"]


def push(
    path: Union[str, Path],
    repo_id: str,
    *,
    to: Optional[Union[StorageForm, str]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[Union[str, Iterable[str]]] = None,
    token: Optional[Union[str, bool]] = None,
) -> str:
    """Upload the adapters in ``path`` to ``repo_id`` in one commit, with a model card.

    The commit holds exactly ``README.md`` (from :func:`model_card`) and each
    adapter's ``adapter_config.json`` and weights file, in the folder's layout.
    The repo is created if missing; every value is checked before anything is sent.

    Args:
        path: A local adapter folder.
        repo_id: ``namespace/name``.
        to: Convert to this storage form first (any :class:`StorageForm` or its name), in a
            temporary folder; ``path`` is only read.
        private: Create the repo private (an existing repo keeps its visibility).
        revision: The branch to commit to (created from main if missing).
        commit_message: Defaults to one naming the adapters' forms.
        commit_description: The commit's (or pull request's) description.
        create_pr: Open a pull request instead of committing to the branch.
        tags: More tags for the model card's front matter, after its own (a string is one tag).
        token: The token to push with (never printed); ``None`` or ``True``: huggingface_hub's own
            (``HF_TOKEN``, else the login cache); ``False``: none, so the push is refused.

    Returns:
        The URL of the commit, or of the pull request.

    Raises:
        InvalidRepoIdError: ``repo_id`` is not ``namespace/name``.
        HubAuthError: no token, or one the Hub rejected or that may not write there.
        HubConnectionError: the Hub cannot be reached.
        TypeError: ``tags`` or ``token`` of the wrong type.

    Example:
        >>> push("runs/my-adapter", "acme/my-adapter", to="packed")  # doctest: +SKIP
        'https://huggingface.co/acme/my-adapter/commit/...'
    """
    if not is_repo_id(repo_id):
        raise InvalidRepoIdError(
            f"{repo_id}: not a Hub repo id; use namespace/name, such as your-user/{Path(path).name}."
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    tags, token = _tags(tags), _token(token, repo_id)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as work:
        source = Path(path)
        if to is not None:
            source = Path(work) / "adapter"
            convert(path, source, to=to)  # checks every value as it converts
        adapters = read_adapters(source)
        if to is None:
            for adapter in adapters:
                adapter.check_values()
        card = model_card(adapters, repo_id=repo_id, tags=tags)
        operations = [CommitOperationAdd("README.md", card.encode())]
        for adapter in adapters:
            for file in (adapter.folder / CONFIG_NAME, adapter.weights_path):
                operations.append(CommitOperationAdd(file.relative_to(source).as_posix(), str(file)))
        forms = ", ".join(sorted({a.form.value for a in adapters}))
        api = HfApi(token=token)
        with hub_errors(describe_repo(repo_id, revision)):
            api.create_repo(repo_id, private=private or None, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload VB-LoRA adapters ({forms} form) with vblora-store",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
    return info.pr_url or info.commit_url


def push_model(model, repo_id: str, *, to: Optional[str] = None, **kwargs) -> str:
    """Save ``model``'s adapters as ``save_pretrained`` does, in a temporary folder, then :func:`push` them.

    The engine's one way to the publisher: ``VBLoRAModel.push_to_hub`` calls
    this, importing it on call, and this needs nothing of the engine but
    ``model.save_pretrained``, so neither imports the other at import time.

    Raises:
        TypeError: an argument neither ``save_pretrained`` nor :func:`push` takes.
    """
    save_keys = {"selected_adapters", "save_only_topk_weights", "safe_serialization"}
    push_keys = {"private", "revision", "commit_message", "commit_description", "create_pr", "tags", "token"}
    unknown = sorted(set(kwargs) - save_keys - push_keys)
    if unknown:
        raise TypeError(
            f"push_to_hub() got unsupported argument(s) {unknown}; it takes {sorted(save_keys | push_keys)}."
        )
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as work:
        model.save_pretrained(work, **{k: v for k, v in kwargs.items() if k in save_keys})
        return push(work, repo_id, to=to, **{k: v for k, v in kwargs.items() if k in push_keys})


def _tags(tags: Optional[Union[str, Iterable[str]]]) -> list[str]:
    """``tags`` as a list of strings (one string is one tag, not its letters)."""
    if tags is None:
        return []
    try:
        tags = [tags] if isinstance(tags, str) else list(tags)
    except TypeError:
        raise TypeError(f"tags must be a string or a list of strings, not {type(tags).__name__}.") from None
    wrong = [t for t in tags if not isinstance(t, str) or not t]
    if wrong:
        raise TypeError(f"tags must be non-empty strings; got {wrong!r}.")
    return tags


def _token(token: Optional[Union[str, bool]], repo_id: str) -> str:
    """The token to push with: ``token`` itself, else huggingface_hub's; never put in a message."""
    from huggingface_hub import get_token

    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"token must be a string or a bool, not {type(token).__name__}.")
    if isinstance(token, str):
        return token
    owner = repo_id.split("/")[0]
    if token is False:
        raise HubAuthError(
            f"{repo_id}: token=False sends no token, and pushing needs one; pass a token that can write to "
            f"{owner}, or leave token unset to use HF_TOKEN or the login cache."
        )
    found = get_token()
    if found is None:
        raise HubAuthError(
            f"{repo_id}: no Hub token found; set HF_TOKEN or run `hf auth login` with a token that can write "
            f"to {owner}."
        )
    return found
