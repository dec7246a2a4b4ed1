"""Loading an adapter's files into a model: the work of ``from_pretrained`` and ``load_adapter``.

The counterpart of :mod:`.saving`.  The source is resolved (a folder, or a Hub
repo id: :func:`~vblora_store.sources.resolve_source`), the files are read and
checked (:func:`~vblora_store.format.read_adapter`), an adapter that cannot be
trained is refused before the model changes, and the tuner injects it.  A
config given by the caller may be ours or PEFT's (:func:`as_config`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import VBLoRAConfig
from ..errors import AdapterStateError, InvalidArgumentError, untrainable_dropped_logits, untrainable_topk
from ..format import read_adapter
from ..format.keys import parse_key
from ..format.stored import StoredAdapter
from ..sources import resolve_source

__all__ = ["DeviceMap", "as_config", "check_device_map", "refuse_dropped_logits", "load_adapter"]

#: accelerate's ``device_map``: module name prefix (``""``: the whole model) -> device.
DeviceMap = Union[str, dict[str, Union[str, int, torch.device]]]


def as_config(config: Any) -> VBLoRAConfig:
    """A vblora_store config from ours or PEFT's ``VBLoRAConfig`` (``from_pretrained(config=...)``)."""
    if config is None or isinstance(config, VBLoRAConfig):
        return config
    if not hasattr(config, "to_dict"):
        raise AdapterStateError(f"config must be a VBLoRAConfig, got {type(config).__name__}.")
    plain = {k: v.value if isinstance(v, Enum) else sorted(v) if isinstance(v, set) else v
             for k, v in config.to_dict().items()}  # fmt: skip
    return VBLoRAConfig.from_dict(plain, source=f"config ({type(config).__name__})")


def _same_device(found: torch.device, wanted: torch.device) -> bool:
    return found.type == wanted.type and (wanted.index is None or found.index in (None, wanted.index))


def check_device_map(model: torch.nn.Module, device_map: DeviceMap) -> None:
    """Accept ``device_map`` only if ``model`` already sits where it says (the adapter follows each layer).

    ``from_pretrained`` never moves or dispatches the base model (load it with
    transformers' ``device_map=...`` first); a map the model follows changes
    nothing and is accepted, anything else is refused rather than ignored.

    Raises:
        InvalidArgumentError: a strategy (``"auto"``, ...), ``"disk"``, a malformed device, an unknown
            module, or a module whose tensors are elsewhere.

    Example:
        >>> check_device_map(torch.nn.Linear(2, 2), {"": "cpu"})
    """
    fix = "load the base model with transformers' device_map=... first; the adapter goes beside each layer."
    if not isinstance(device_map, dict):
        raise InvalidArgumentError(
            f"device_map={device_map!r}: vblora_store never dispatches the model itself; {fix}"
        )
    for prefix, where in device_map.items():
        try:
            wanted = torch.device(where)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(f"device_map[{prefix!r}]={where!r} is not a device ({e}); {fix}") from e
        try:
            module = model.get_submodule(prefix)
        except AttributeError as e:
            raise InvalidArgumentError(f"device_map names {prefix!r}, which is no module of the model; {fix}") from e
        tensors = [*module.parameters(), *module.buffers()]
        elsewhere = sorted({str(t.device) for t in tensors if not _same_device(t.device, wanted)})
        if elsewhere:
            raise InvalidArgumentError(
                f"device_map puts {prefix or 'the model'!r} on {wanted} but its tensors are on "
                f"{', '.join(elsewhere)}; {fix}"
            )


def refuse_dropped_logits(stored: StoredAdapter) -> None:
    """Refuse training from ``-inf`` logits (as PEFT's training does): the dropped ones can never come back.

    Each logits tensor is read through the value checks, as every other read of
    an adapter is: a damaged one raises :class:`~vblora_store.errors.InvalidAdapterError`.
    """
    for key in stored.specs:
        parts = parse_key(key)
        if parts is None or parts.part != "logits":
            continue
        if bool(torch.isneginf(stored.checked_tensor(key)).any()):
            raise untrainable_dropped_logits(
                f"{stored.folder}: tensor {key!r}",
                "load it with is_trainable=False, or train from the original full adapter.",
            )


def load_adapter(
    tuner,
    model_id: Union[str, Path],
    adapter_name: str,
    *,
    is_trainable: bool,
    torch_device: Optional[Union[str, torch.device]],
    autocast_adapter_dtype: bool,
    revision: Optional[str],
    subfolder: Optional[str],
    config: Optional[VBLoRAConfig],
) -> None:
    """Read the adapter saved at ``model_id``; inject it into ``tuner`` (a ``VBLoRATuner``).

    As in PEFT, ``torch_device`` is where the file is read to, not where the
    adapter lives: every tensor ends beside the layer it adapts.  Reading here is
    memory-mapped on the CPU, so only a malformed device is refused.

    Raises:
        AdapterStateError: ``is_trainable`` with a top-k adapter or ``-inf``
            logits, or the name is taken.
        AdapterNameError: the name is reserved (``"__base__"``) or malformed.
    """
    if torch_device is not None:  # the file is read on the CPU, memory-mapped: only a malformed device matters
        try:
            torch.device(torch_device)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(f"torch_device={torch_device!r} is not a device ({e}); pass e.g. 'cpu'.") from e
    tuner.check_new(adapter_name)  # before any file is read
    folder = resolve_source(model_id, revision=revision, subfolder=subfolder, nested=False)
    stored = read_adapter(folder, name=adapter_name, config=as_config(config))
    stored.config.inference_mode = not is_trainable  # as PEFT sets it, on the caller's config too
    if is_trainable and not stored.form.has_logits:
        raise untrainable_topk(
            f"{stored.folder}",
            stored.form.value,
            "load it with is_trainable=False, or train from the full-form adapter.",
        )
    if is_trainable and stored.form.has_logits:
        refuse_dropped_logits(stored)
    if adapter_name in tuner._placeholders:
        tuner.forget(adapter_name)
    tuner.inject(adapter_name, stored.config, stored, autocast=autocast_adapter_dtype)
    tuner.set_trainable(adapter_name, is_trainable)
