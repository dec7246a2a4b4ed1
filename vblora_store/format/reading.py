"""Reading PEFT's VB-LoRA adapter folders, lazily, into validated :class:`StoredAdapter` objects.

A folder holds the adapter named ``default`` at its root and every other adapter
in a sub-folder named after it, each as ``adapter_config.json`` plus
``adapter_model.safetensors`` (or ``adapter_model.bin``).  Reading parses the
config and the safetensors header only; tensors are read one at a time, on
demand, through safetensors' memory-mapped reader.  The storage form is the
one whose codec claims the file (:mod:`vblora_store.storage_forms`); every
tensor's dtype and shape is checked against the config (:mod:`.layout`)
before a :class:`StoredAdapter` exists.  Files come from strangers: links and
pickles are checked first (:mod:`.safety`).

A path may also be a Hub repo id (``namespace/name``): :mod:`vblora_store.sources`
downloads its adapter files first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from ..config import CONFIG_NAME, VBLoRAConfig
from ..dtypes import by_code
from ..errors import AdapterNotFoundError, InvalidAdapterError, InvalidConfigError, os_problem, read_error
from ..folders import find_adapter_folders
from ..sources import resolve_source
from ..storage_forms import StorageForm
from .keys import WEIGHTS_NAME, WEIGHTS_NAME_BIN
from .codecs.checks import check_factors
from .layout import validate_layout
from .safety import check_link, check_zip_sizes
from .stored import StoredAdapter, TensorSpec

__all__ = ["find_adapter_folders", "read_adapters", "read_adapter"]


def read_adapters(
    path: Union[str, Path], *, revision: Optional[str] = None, subfolder: Optional[str] = None
) -> list[StoredAdapter]:
    """Read every adapter under ``path`` (the root's ``default`` and each sub-folder's).

    Args:
        path: A PEFT adapter folder, or a Hub repo id (``namespace/name``; a
            local path that exists wins).
        revision: Branch, tag or commit of a repo.
        subfolder: The folder, inside the repo or the local folder, that holds the adapters.

    Returns:
        The adapters, ``default`` first, then the others by name.

    Example:
        >>> [a.name for a in read_adapters("fixtures/tiny-llama-vblora-multi")]
        ['default', 'second']
    """
    root = resolve_source(path, revision=revision, subfolder=subfolder)
    return [read_adapter(folder, name=name) for name, folder in find_adapter_folders(root)]


def read_adapter(
    folder: Union[str, Path], *, name: str = "default", config: Optional[VBLoRAConfig] = None
) -> StoredAdapter:
    """Read one adapter folder: the config, the weights header; tensors stay on disk.

    Args:
        folder: The folder holding ``adapter_config.json`` and the weights.
        name: The adapter's name.
        config: Use this config instead of the folder's ``adapter_config.json``
            (PEFT's ``from_pretrained(config=...)``); the weights are checked against it.

    Returns:
        A validated :class:`StoredAdapter`.

    Raises:
        AdapterNotFoundError: a file is missing.
        ReadError: the operating system refused to read a file (permissions, an I/O error).
        InvalidConfigError: the config is not a usable VB-LoRA config.
        InvalidAdapterError: the weights do not fit the config.
        UnsafePathError: a file is a symbolic link leading outside ``folder``.
    """
    folder = Path(folder)
    st_path, bin_path = folder / WEIGHTS_NAME, folder / WEIGHTS_NAME_BIN
    for file in (folder / CONFIG_NAME, st_path, bin_path):
        check_link(file, folder)
    if config is None:
        config = VBLoRAConfig.from_pretrained(folder)
    elif not isinstance(config, VBLoRAConfig):
        raise InvalidConfigError(
            f"{folder}: config must be a vblora_store VBLoRAConfig, got {type(config).__name__}; "
            "build one with VBLoRAConfig(...) or VBLoRAConfig.from_dict(peft_config.to_dict())."
        )
    if st_path.is_file():
        path, (specs, reader, metadata) = st_path, _open_safetensors(_readable(st_path))
    elif bin_path.is_file():
        path, (specs, reader), metadata = bin_path, _open_bin(_readable(bin_path)), None
    else:
        raise AdapterNotFoundError(
            f"{folder}: has {CONFIG_NAME} but no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN}; copy the weights file beside it."
        )
    form = _detect(specs, metadata)
    decoded = form.codec.decode(specs, reader, metadata, config, path)
    has_logits, modules = validate_layout(decoded.specs, config, path)
    check_factors(modules.values(), config.r, path)
    if has_logits != form.has_logits:
        raise InvalidAdapterError(
            f"{path}: its tensors do not fit the {form.value} form; the file is damaged."
        )
    if decoded.order is not None:
        modules = {module: modules[module] for module in decoded.order}
    return StoredAdapter(
        folder=folder, name=name, config=config, weights_path=path, form=form, modules=modules,
        specs=decoded.specs, stored_specs=specs, packing=decoded.packing, reader=decoded.reader,
        slots=decoded.slots,
    )  # fmt: skip


def _detect(specs: dict[str, TensorSpec], metadata: Optional[dict[str, str]]) -> StorageForm:
    """The registered form whose codec claims the file; forms PEFT cannot read are asked first.

    PEFT's own two forms are told apart by their key names alone, so a form of
    our own, which marks its file, must be ruled out before them.
    """
    for form in sorted(StorageForm, key=lambda f: f.peft_reads):
        if form.codec.detect(specs, metadata):
            return form
    return StorageForm.FULL  # no tensor a form recognises: the layout check names what is missing


def _readable(path: Path) -> Path:
    """``path``, once the operating system has let us open it; its refusal is a ``ReadError``, not damage.

    safetensors reports a file it may not open as ``No such file or directory``, without an errno,
    and the zip reader of ``.bin`` files as a bad archive: open it plainly first.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise read_error(path, e) from e
    return path


def _open_safetensors(path: Path):
    try:
        handle = safe_open(str(path), framework="pt")
        specs = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            try:  # any dtype of the table; each form's layout check then says which one each tensor may have
                entry = by_code(view.get_dtype())
            except KeyError:
                raise InvalidAdapterError(
                    f"{path}: tensor {key!r} has dtype {view.get_dtype()}, which no VB-LoRA adapter uses."
                ) from None
            specs[key] = TensorSpec(entry.torch, tuple(view.get_shape()))
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, InvalidAdapterError):
            raise
        if isinstance(e, OSError) and os_problem(e) is not None:  # an errno, or "(os error N)": not damage
            raise read_error(path, e) from e
        raise InvalidAdapterError(
            f"{path}: not a readable safetensors file ({e}); the file is damaged, fetch it again."
        ) from e
    return specs, handle.get_tensor, handle.metadata()


def _open_bin(path: Path):
    check_zip_sizes(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors come in many types
        raise InvalidAdapterError(
            f"{path}: not a readable PyTorch weights file ({type(e).__name__}); "
            "only plain tensor state dicts load (weights_only=True)."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidAdapterError(f"{path}: does not hold a dictionary of tensors; it is not a PEFT adapter.")
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in state.items()}
    return specs, state.__getitem__
