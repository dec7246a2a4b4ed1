"""Reading PEFT's VB-LoRA adapter folders, lazily, and validating them.

A folder holds the adapter named ``default`` at its root and every other adapter
in a sub-folder named after it, each as ``adapter_config.json`` plus
``adapter_model.safetensors`` (or ``adapter_model.bin``).  Reading parses the
config and the safetensors header only; tensors are read one at a time, on
demand, through safetensors' memory-mapped reader.

Files come from strangers, so nothing is trusted: a symbolic link leading
outside its adapter folder is not followed (huggingface_hub's cache, whose
snapshot files link to its ``blobs`` folder, excepted); ``.bin`` pickles load
only through ``torch.load(weights_only=True)``, and only when the zip archive's
declared sizes fit in the file; every tensor's dtype and shape is checked
against the config before any value is read.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from ..config import CONFIG_NAME, VBLoRAConfig
from ..errors import AdapterNotFoundError, InvalidAdapterError, InvalidConfigError, UnsafePathError
from .packed import is_packed, unpack_topk
from .keys import (
    BANK_KEY,
    WEIGHTS_NAME,
    WEIGHTS_NAME_BIN,
    StorageForm,
    indices_key,
    logits_key,
    parse_key,
    weights_key,
)

__all__ = [
    "ModuleShape",
    "TensorSpec",
    "StoredAdapter",
    "read_adapter",
    "read_adapters",
    "find_adapter_folders",
]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class ModuleShape:
    """One adapted module: its name (without ``base_model.model.``) and features."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's dtype and shape, known from the file header alone."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class StoredAdapter:
    """One adapter as stored on disk: config, form, modules and lazy tensors.

    Build it with :func:`read_adapter` or :func:`read_adapters`; the header has
    been validated against the config by then.  Whatever the form, ``specs``
    and ``tensor()`` speak PEFT's key names: a packed adapter presents the
    top-k tensors it unpacks to (``stored_specs`` lists what the file holds).

    Attributes:
        folder: The folder holding the adapter's two files.
        name: The adapter name (``default`` at a folder's root).
        config: The parsed ``adapter_config.json``.
        weights_path: The weights file.
        form: :class:`StorageForm` of the logits.
        modules: Adapted modules in file order, by name.
        specs: Dtype and shape of every stored tensor, by key.
    """

    def __init__(
        self, folder: Path, name: str, config: VBLoRAConfig, weights_path: Path, specs, reader, packed=None
    ):
        self.folder = folder
        self.name = name
        self.config = config
        self.weights_path = weights_path
        self.specs: dict[str, TensorSpec] = specs
        self._reader = reader
        self.form, self.modules = _validate_layout(self)
        # A packed file presents PEFT's top-k tensors; what it really stores is kept here.
        self.stored_specs: dict[str, TensorSpec] = specs
        self.packing: dict[str, str] = {}
        if packed is not None:
            self.form = StorageForm.PACKED
            self.stored_specs, self.packing, order = packed
            self.modules = {name: self.modules[name] for name in order}

    def __repr__(self) -> str:
        return f"StoredAdapter({str(self.folder)!r}, name={self.name!r}, form={self.form.value})"

    @property
    def file_bytes(self) -> int:
        """Size of the weights file in bytes."""
        return self.weights_path.stat().st_size

    @property
    def other_keys(self) -> list[str]:
        """Keys of tensors that are neither the bank nor logits-family (modules_to_save, biases)."""
        return [k for k in self.specs if k != BANK_KEY and parse_key(k) is None]

    def tensor(self, key: str) -> torch.Tensor:
        """Read one stored tensor.

        Raises:
            InvalidAdapterError: the file cannot back the tensor its header declares.
        """
        try:
            return self._reader(key)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise InvalidAdapterError(
                f"{self.weights_path}: tensor {key!r} cannot be read ({e}); the file is damaged, "
                "fetch it again."
            ) from e

    def checked_tensor(self, key: str) -> torch.Tensor:
        """Read one stored tensor and check its values (see :func:`check_tensor_values`).

        Everything that computes from an adapter reads through this: a NaN, or an
        index outside the bank (which would silently select another vector), is
        refused rather than used.

        Raises:
            InvalidAdapterError: naming the file and the tensor.
        """
        value = self.tensor(key)
        check_tensor_values(self, key, value)
        return value

    def check_values(self) -> None:
        """Read every tensor once and check its values: finite floats, indices in ``[0, N)``.

        Raises:
            InvalidAdapterError: naming the file and the first bad tensor.
        """
        for key in self.specs:
            self.checked_tensor(key)


def _non_finite(value: torch.Tensor, *, logits_k: Optional[int]) -> Optional[str]:
    """What is wrong with the non-finite values of a floating ``value``, or ``None`` if nothing is.

    ``aminmax`` propagates NaN and its bounds are finite only if every value is,
    so the common case is one pass with no temporary the size of ``value``
    (about 4x faster than ``torch.isfinite(value).all()`` on logits tensors).
    Logits (``logits_k`` is the adapter's k) may hold ``-inf``: PEFT writes it
    for every logit outside the top-k when it saves a top-k-loaded adapter in
    full form; each row must keep at least k finite logits.
    """
    if value.numel() == 0:
        return None
    low, high = torch.aminmax(value)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return None
    if bool(torch.isnan(low) | torch.isnan(high)):
        return "holds NaN values"
    if bool(high == float("inf")):
        return "holds +inf values"
    if logits_k is None:
        return "holds -inf values"
    fewest = int(torch.isfinite(value).sum(-1).min())  # only for PEFT's -inf logits
    if fewest < logits_k:
        return f"has a row with {fewest} finite logits, fewer than topk={logits_k}"
    return None


def check_tensor_values(adapter: StoredAdapter, key: str, value: torch.Tensor) -> None:
    """Raise :class:`InvalidAdapterError` if ``value`` (stored as ``key``) holds bad values.

    Floats must be finite, except PEFT's ``-inf`` logits (at least k finite per
    row); top-k weights a sub-simplex; indices in ``[0, N)``.
    """
    parts = parse_key(key)
    if value.is_floating_point():
        is_logits = parts is not None and parts.part == "logits"
        problem = _non_finite(value, logits_k=adapter.config.topk if is_logits else None)
        if problem is not None:
            raise InvalidAdapterError(
                f"{adapter.weights_path}: tensor {key!r} {problem}; the adapter is broken, retrain or restore it."
            )
        if parts is not None and parts.part == "weights":
            if bool((value < 0).any()) or bool((value.sum(-1) > 1 + 1e-3).any()):
                raise InvalidAdapterError(
                    f"{adapter.weights_path}: tensor {key!r} is not a set of top-k softmax weights "
                    "(negative, or summing above 1); the file is damaged."
                )
    if parts is not None and parts.part == "indices":
        n = adapter.config.num_vectors
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= n):
            raise InvalidAdapterError(
                f"{adapter.weights_path}: tensor {key!r} holds indices outside [0, {n}); "
                "the file does not match num_vectors in its config; restore the file or its config from the "
                "source."
            )


# -- reading --------------------------------------------------------------------


def find_adapter_folders(path: Union[str, Path]) -> list[tuple[str, Path]]:
    """The ``(adapter_name, folder)`` pairs PEFT's layout puts under ``path``.

    The root is ``default``; each immediate sub-folder with an
    ``adapter_config.json`` is the adapter of that name.  Hidden sub-folders,
    and sub-folders that are symbolic links leading outside ``path``, are skipped.

    Raises:
        AdapterNotFoundError: ``path`` is missing or holds no adapter.
    """
    root = Path(path)
    if not root.exists():
        raise AdapterNotFoundError(f"{root}: no such file or folder; check the path.")
    if not root.is_dir():
        raise AdapterNotFoundError(f"{root}: not a folder; pass the adapter folder that holds {CONFIG_NAME}.")
    found = []
    if (root / CONFIG_NAME).is_file():
        found.append(("default", root))
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.is_symlink() and not _is_within(sub.resolve(), root.resolve()):
            continue
        if (sub / CONFIG_NAME).is_file():
            found.append((sub.name, sub))
    if not found:
        raise AdapterNotFoundError(
            f"{root}: no {CONFIG_NAME} here or in its sub-folders; point at a folder written by "
            "PEFT's save_pretrained."
        )
    return found


def read_adapters(path: Union[str, Path]) -> list[StoredAdapter]:
    """Read every adapter under ``path`` (the root's ``default`` and each sub-folder's).

    Args:
        path: A PEFT adapter folder.

    Returns:
        The adapters, ``default`` first, then the others by name.

    Example:
        >>> [a.name for a in read_adapters("fixtures/tiny-llama-vblora-full")]  # doctest: +SKIP
        ['default', 'second']
    """
    return [read_adapter(folder, name=name) for name, folder in find_adapter_folders(path)]


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
        InvalidConfigError: the config is not a usable VB-LoRA config.
        InvalidAdapterError: the weights do not fit the config.
        UnsafePathError: a file is a symbolic link leading outside ``folder``.
    """
    folder = Path(folder)
    st_path, bin_path = folder / WEIGHTS_NAME, folder / WEIGHTS_NAME_BIN
    for file in (folder / CONFIG_NAME, st_path, bin_path):
        _check_link(file, folder)
    if config is None:
        config = VBLoRAConfig.from_pretrained(folder)
    elif not isinstance(config, VBLoRAConfig):
        raise InvalidConfigError(
            f"{folder}: config must be a vblora_store VBLoRAConfig, got {type(config).__name__}; "
            "build one with VBLoRAConfig(...) or VBLoRAConfig.from_dict(peft_config.to_dict())."
        )
    if st_path.is_file():
        specs, reader, metadata = _open_safetensors(st_path)
        if is_packed(metadata):
            return _read_packed(folder, name, config, st_path, specs, reader, metadata)
        return StoredAdapter(folder, name, config, st_path, specs, reader)
    if bin_path.is_file():
        specs, reader = _open_bin(bin_path)
        return StoredAdapter(folder, name, config, bin_path, specs, reader)
    raise AdapterNotFoundError(
        f"{folder}: has {CONFIG_NAME} but no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN}; copy the weights file beside it."
    )


def _open_safetensors(path: Path):
    try:
        handle = safe_open(str(path), framework="pt")
        specs = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
            if dtype is None:
                raise InvalidAdapterError(
                    f"{path}: tensor {key!r} has dtype {view.get_dtype()}, which no VB-LoRA adapter uses."
                )
            specs[key] = TensorSpec(dtype, tuple(view.get_shape()))
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, InvalidAdapterError):
            raise
        raise InvalidAdapterError(
            f"{path}: not a readable safetensors file ({e}); the file is damaged, fetch it again."
        ) from e
    return specs, handle.get_tensor, handle.metadata()


def _read_packed(folder, name, config, path, stored_specs, reader, metadata) -> StoredAdapter:
    """Unpack a packed file (small by construction) into PEFT's top-k tensors in memory."""
    stored = {key: reader(key) for key in stored_specs}
    modules, tensors, info = unpack_topk(
        stored,
        metadata,
        r=config.r,
        num_vectors=config.num_vectors,
        vector_length=config.vector_length,
        topk=config.topk,
        source=str(path),
    )
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    order = [m[0] for m in modules]
    return StoredAdapter(
        folder, name, config, path, specs, tensors.__getitem__, packed=(stored_specs, info, order)
    )


def _open_bin(path: Path):
    _check_zip_sizes(path)
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


def _check_zip_sizes(path: Path) -> None:
    """Refuse a ``.bin`` that is not a ``torch.save`` zip archive whose entries fit in the file.

    torch's reader allocates each entry's declared size before reading it, so a
    forged size would drive an allocation the file cannot back; ``torch.save``
    stores entries uncompressed, so their sizes can never exceed the file's.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise InvalidAdapterError(
            f"{path}: not a torch.save zip archive ({e}); re-save it with torch.save or as safetensors."
        ) from e
    declared = sum(e.file_size for e in entries)
    if declared > path.stat().st_size or any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise InvalidAdapterError(
            f"{path}: its zip entries declare {declared:,} bytes (or compression) that the file cannot hold; "
            "the file is damaged or forged, fetch it again."
        )


# -- links ------------------------------------------------------------------------


def _is_within(target: Path, folder: Path) -> bool:
    """Whether the resolved ``target`` is ``folder`` or lies under it."""
    return target == folder or folder in target.parents


def _check_link(file: Path, folder: Path) -> None:
    """Refuse ``file`` if it is a symbolic link whose target lies outside ``folder``.

    A huggingface_hub cache snapshot (``<repo>/snapshots/<rev>/...``) links each
    file to ``<repo>/blobs``; targets there are allowed.
    """
    if not file.is_symlink():
        return
    try:
        base, target = folder.resolve(), file.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # dangling, or a loop (RuntimeError before Python 3.13)
        raise AdapterNotFoundError(
            f"{file}: is a symbolic link that leads to no file ({e}); replace it with the file."
        ) from e
    if _is_within(target, base):
        return
    for snapshot in (base, *base.parents):
        blobs = snapshot.parent.parent / "blobs"
        if snapshot.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            if _is_within(target, blobs):
                return
            break
    raise UnsafePathError(
        f"{file}: is a symbolic link to {target}, outside the adapter folder {folder}; not followed. "
        "Copy the file into the folder if it is meant to be there."
    )


# -- header validation ------------------------------------------------------------


def _validate_layout(adapter: StoredAdapter) -> tuple[StorageForm, dict[str, ModuleShape]]:
    """Check every tensor's shape against the config; return the form and the modules."""
    cfg, path, specs = adapter.config, adapter.weights_path, adapter.specs
    n, length, r, k = cfg.num_vectors, cfg.vector_length, cfg.r, cfg.topk

    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{path}: {message}")

    bank = specs.get(BANK_KEY)
    if bank is None:
        raise bad(f"no {BANK_KEY!r} tensor; this is not a VB-LoRA weights file, or it is truncated.")
    if bank.shape != (n, length) or not bank.dtype.is_floating_point:
        raise bad(
            f"{BANK_KEY!r} is {_describe(bank)}, expected float (num_vectors={n}, vector_length={length}) "
            "as the config says; the config does not belong to these weights; restore the "
            "adapter_config.json saved with them."
        )

    parts_by_module: dict[str, dict[tuple[str, str], TensorSpec]] = {}
    for key, spec in specs.items():
        parts = parse_key(key)
        if parts is not None:
            parts_by_module.setdefault(parts.module, {})[(parts.side, parts.part)] = spec
    if not parts_by_module:
        raise bad("holds a vector bank but no vblora_logits tensors; nothing was adapted.")

    forms = {
        StorageForm.TOPK if any(part != "logits" for _, part in found) else StorageForm.FULL
        for found in parts_by_module.values()
    }
    if len(forms) > 1:
        raise bad("mixes full logits and top-k tensors; re-save the adapter from PEFT in one form.")
    form = forms.pop()
    expected_flag = form is StorageForm.TOPK
    if bool(cfg.save_only_topk_weights) != expected_flag:
        raise bad(
            f"holds the {form.value} form but {CONFIG_NAME} says save_only_topk_weights="
            f"{str(bool(cfg.save_only_topk_weights)).lower()}; set it to {str(expected_flag).lower()}."
        )
    wanted = ("logits",) if form is StorageForm.FULL else ("indices", "weights")
    last = {"logits": n, "indices": k, "weights": k - 1}

    modules: dict[str, ModuleShape] = {}
    for module, found in parts_by_module.items():
        extra = set(found) - {(side, part) for side in "AB" for part in wanted}
        missing = [(side, part) for side in "AB" for part in wanted if (side, part) not in found]
        if missing or extra:
            side, part = (missing or sorted(extra))[0]
            raise bad(
                f"module {module!r} has no consistent {part} tensor for side {side}; the file is incomplete."
            )
        for (side, part), spec in found.items():
            is_index = part == "indices"
            if len(spec.shape) != 3 or spec.shape[-1] != last[part] or 0 in spec.shape[:2]:
                raise bad(
                    f"module {module!r} side {side} {part} is {_describe(spec)}, expected 3 dims ending in "
                    f"{last[part]} (num_vectors={n}, topk={k}); the config does not belong to these weights; "
                    "restore the adapter_config.json saved with them."
                )
            if is_index == spec.dtype.is_floating_point or spec.dtype is torch.bool:
                kind = "an integer" if is_index else "a float"
                raise bad(f"module {module!r} side {side} {part} is {spec.dtype}, expected {kind} dtype.")
        a = found[("A", wanted[0])].shape
        b = found[("B", wanted[0])].shape
        if a[0] != r or b[1] != r:
            raise bad(
                f"module {module!r} has rank {a[0]} (A) and {b[1]} (B) but the config says r={r}; "
                "the config does not belong to these weights; restore the adapter_config.json saved with them."
            )
        for part in wanted[1:]:
            if found[("A", part)].shape[:2] != a[:2] or found[("B", part)].shape[:2] != b[:2]:
                raise bad(f"module {module!r}: indices and weights disagree in shape; the file is damaged.")
        modules[module] = ModuleShape(module, in_features=a[1] * length, out_features=b[0] * length)
    return form, modules


def _describe(spec: Optional[TensorSpec]) -> str:
    return "missing" if spec is None else f"{str(spec.dtype).removeprefix('torch.')} {list(spec.shape)}"
