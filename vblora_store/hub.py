"""The Hugging Face Hub: load adapters by repo id, push them with a model card.

:func:`resolve_source` turns a local folder or a repo id (``namespace/name``)
into a local folder, downloading only the adapter files into huggingface_hub's
cache; :func:`push` uploads a folder, converted first if asked, with the card
:func:`model_card` writes.  Token, endpoint and cache come from huggingface_hub's
usual configuration (``HF_TOKEN`` or ``hf auth login``, ``HF_ENDPOINT``,
``HF_HOME``); the token is never printed or written.  huggingface_hub is
imported inside the functions that need it, so commands on local folders never
pay for it.  Every Hub failure becomes a one-line :class:`~vblora_store.errors.HubError`.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .accounting import account
from .config import CONFIG_NAME
from .errors import (
    AdapterNotFoundError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    InvalidRepoIdError,
)
from .format import StorageForm, StoredAdapter, convert, find_adapter_folders, read_adapters
from .format.atomic import TMP_PREFIX
from .format.keys import WEIGHTS_NAME, WEIGHTS_NAME_BIN
from .report import ReportFormat, build_report

__all__ = ["ADAPTER_FILES", "is_repo_id", "resolve_source", "model_card", "push"]

#: The only files a repo id source downloads, at its root and in each sub-folder.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_BIN)

_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


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


def model_card(adapters: Sequence[StoredAdapter], *, repo_id: str) -> str:
    """The ``README.md`` pushed with ``adapters``: YAML front matter, then Markdown.

    The front matter has ``library_name: peft``, tags (``vblora``, and
    ``inference-only`` for top-k or packed adapters) and ``base_model`` when
    the configs name a Hub repo (never a local path).  The body says what the
    adapter is, gives its compression report, and how to load it.

    Args:
        adapters: The adapters of one folder, as :func:`read_adapters` returns them.
        repo_id: The repo they are pushed to (used in the loading examples).

    Returns:
        The card's text.

    Example:
        >>> print(model_card(read_adapters("ship/tiny"), repo_id="acme/tiny"))  # doctest: +SKIP
    """
    from huggingface_hub import ModelCardData

    forms = sorted({a.form for a in adapters}, key=list(StorageForm).index)
    inference_only = any(not form.has_logits for form in forms)
    bases = sorted({a.config.base_model_name_or_path for a in adapters} - {None})
    bases = [base for base in bases if _is_hub_model(base)]
    metadata = ModelCardData(
        library_name="peft",
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        tags=["vblora", "peft", "vblora-store"] + (["inference-only"] if inference_only else []),
    )
    name = repo_id.split("/")[-1]
    where = ", ".join(f"`{a.name}` ({_location(a)})" for a in adapters)
    for_base = ", ".join(f"`{b}`" for b in bases) or "a base model not recorded in its config"
    report = build_report([account(a) for a in adapters]).render(ReportFormat.MARKDOWN)
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"[VB-LoRA](https://arxiv.org/abs/2405.15179) adapter{'s' * (len(adapters) > 1)} for {for_base}, "
        f"saved in PEFT's layout and published with vblora_store. Adapters: {where}.",
        "",
        "## Storage form",
        "",
        *[form.codec.card_note.format(repo_id=repo_id, name=name) for form in forms],
        "",
        "## Compression report",
        "",
        report,
        "",
        "## Load it with PEFT",
        "",
        *_peft_usage(adapters, repo_id=repo_id, name=name, base=bases[0] if bases else None),
        "",
        "## Load it with vblora_store",
        "",
        *_vblora_store_usage(adapters, repo_id=repo_id),
        "",
    ]
    return "\n".join(lines)


def push(
    path: Union[str, Path],
    repo_id: str,
    *,
    to: Optional[Union[StorageForm, str]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
) -> str:
    """Upload the adapters in ``path`` to ``repo_id`` in one commit, with a model card.

    The commit holds exactly ``README.md`` (from :func:`model_card`) and each
    adapter's ``adapter_config.json`` and weights file, in the folder's layout.
    The repo is created if missing; every value is checked before anything is sent.

    Args:
        path: A local adapter folder.
        repo_id: ``namespace/name``.
        to: Convert to this form first (``"topk"`` or ``"packed"``), in a
            temporary folder; ``path`` is only read.
        private: Create the repo private (an existing repo keeps its visibility).
        revision: The branch to commit to (created from main if missing).
        commit_message: Defaults to one naming the adapters' forms.
        create_pr: Open a pull request instead of committing to the branch.

    Returns:
        The URL of the commit, or of the pull request.

    Raises:
        InvalidRepoIdError: ``repo_id`` is not ``namespace/name``.
        HubAuthError: no token, or one the Hub rejected or that may not write there.
        HubConnectionError: the Hub cannot be reached.

    Example:
        >>> push("runs/my-adapter", "acme/my-adapter", to="packed")  # doctest: +SKIP
        'https://huggingface.co/acme/my-adapter/commit/...'
    """
    if not is_repo_id(repo_id):
        raise InvalidRepoIdError(
            f"{repo_id}: not a Hub repo id; use namespace/name, such as your-user/{Path(path).name}."
        )
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if get_token() is None:
        raise HubAuthError(
            f"{repo_id}: no Hub token found; set HF_TOKEN or run `hf auth login` with a token that can write "
            f"to {repo_id.split('/')[0]}."
        )
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as work:
        source = Path(path)
        if to is not None:
            source = Path(work) / "adapter"
            convert(path, source, to=to)  # checks every value as it converts
        adapters = read_adapters(source)
        if to is None:
            for adapter in adapters:
                adapter.check_values()
        operations = [CommitOperationAdd("README.md", model_card(adapters, repo_id=repo_id).encode())]
        for adapter in adapters:
            for file in (adapter.folder / CONFIG_NAME, adapter.weights_path):
                operations.append(CommitOperationAdd(file.relative_to(source).as_posix(), str(file)))
        forms = ", ".join(sorted({a.form.value for a in adapters}))
        api = HfApi()
        with _hub_errors(_describe(repo_id, revision)):
            api.create_repo(repo_id, private=private or None, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload VB-LoRA adapters ({forms} form) with vblora-store",
                revision=revision,
                create_pr=create_pr,
            )
    return info.pr_url or info.commit_url


# -- downloading ------------------------------------------------------------------------


def _download(repo_id: str, *, revision: Optional[str], subfolder: Optional[str], nested: bool) -> Path:
    """Fetch the adapter files of ``repo_id`` (under ``subfolder``) into the cache; check they are there."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + name for name in ADAPTER_FILES]
    if nested:
        patterns += [f"{prefix}*/{name}" for name in ADAPTER_FILES]
    where = _describe(repo_id, revision, subfolder)
    with _hub_errors(where):
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
def _hub_errors(where: str) -> Iterator[None]:
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


# -- the model card -----------------------------------------------------------------------


def _peft_usage(
    adapters: Sequence[StoredAdapter], *, repo_id: str, name: str, base: Optional[str]
) -> list[str]:
    """The "load it with PEFT" snippet: a top-k copy first if packed; sub-folders as extra adapters."""
    packed = any(not a.form.peft_reads for a in adapters)
    source = f"{name}-topk" if packed else repo_id
    auto = _AUTO_CLASSES.get(str(adapters[0].config.task_type), "AutoModel")
    lines = []
    if packed:
        lines += ["```bash", f"vblora-store convert {repo_id} {source} --to topk", "```", ""]
    lines += [
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{base or "..."}")' + ("" if base else "  # its base model"),
        f'model = PeftModel.from_pretrained(base, "{source}")',
    ]
    for adapter in adapters:
        if _subfolder_of(adapter) is None:
            continue
        where = f'"{source}/{adapter.name}"' if packed else f'"{source}", subfolder="{adapter.name}"'
        lines.append(f'model.load_adapter({where}, adapter_name="{adapter.name}")')
    return lines + ["```"]


def _vblora_store_usage(adapters: Sequence[StoredAdapter], *, repo_id: str) -> list[str]:
    """The "load it with vblora_store" snippet: the command line, then the engine."""
    lines = [
        "```bash",
        f"vblora-store inspect {repo_id}",
        f"vblora-store report {repo_id} --format markdown",
        "```",
        "",
        "```python",
        "from vblora_store.engine import VBLoRAModel",
        "",
        f'model = VBLoRAModel.from_pretrained(base, "{repo_id}")  # base: loaded as above',
    ]
    for adapter in adapters:
        if _subfolder_of(adapter) is not None:
            lines.append(f'model.load_adapter("{repo_id}", "{adapter.name}", subfolder="{adapter.name}")')
    return lines + ["```"]


# -- small helpers --------------------------------------------------------------------------


def _subfolder_of(adapter: StoredAdapter) -> Optional[str]:
    """The sub-folder PEFT's layout puts ``adapter`` in (``None`` for ``default``, at the root)."""
    return None if adapter.name == "default" else adapter.name


def _location(adapter: StoredAdapter) -> str:
    """Where ``adapter`` sits in the repo, for the card."""
    return f"`{_subfolder_of(adapter)}/`" if _subfolder_of(adapter) else "repo root"


def _is_hub_model(value: Optional[str]) -> bool:
    """True if a config's ``base_model_name_or_path`` names a Hub repo, not a local folder."""
    return bool(value) and is_repo_id(value) and not Path(value).exists()


def _describe(repo_id: str, revision: Optional[str] = None, subfolder: Optional[str] = None) -> str:
    """``repo_id`` with the revision and sub-folder asked for, as error messages name it."""
    extras = [f"revision {revision}"] * bool(revision) + [f"subfolder {subfolder}"] * bool(subfolder)
    return f"{repo_id} ({', '.join(extras)})" if extras else repo_id
