"""Merging a VB-LoRA adapter into a transformers checkpoint, tensor by tensor, without transformers.

A checkpoint folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) plus an adapter gives a merged checkpoint
folder that ``from_pretrained`` loads::

    W' = W + B @ A              (fp32 arithmetic, saved in W's dtype or --dtype)

``modules_to_save`` copies and trained biases replace the base's tensors.
Every other file of the folder (config, tokenizer, generation config) is
copied; the sharding and the index are kept.  Shards are streamed
(:mod:`vblora_store.checkpoint`): memory holds one tensor, not one shard.

The pure middle: :func:`resolve_key` maps a PEFT name to a checkpoint key,
:func:`plan_merge` checks the whole adapter against the checkpoint's headers
(before anything is written) and :func:`merged_weight` is the arithmetic.
:func:`merge` is the edge that writes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional, Union

import torch

from .choices import MergeDtype
from .checkpoint import FLOAT_DTYPES, INDEX_FILE, Checkpoint, Shard, read_checkpoint, read_tensor, write_shard
from .dtypes import by_name
from .errors import InvalidCheckpointError, TargetingError
from .format.atomic import atomic_folder, check_destination
from .format.keys import MODEL_PREFIX
from .format import StoredAdapter, read_adapter
from .factors import module_factors
from .sources import resolve_source

__all__ = ["MergeDtype", "MergePlan", "MergeSummary", "resolve_key", "plan_merge", "merged_weight", "merge"]

#: Files not copied into the merged folder: weights in any format would hold the unmerged values.
_STALE_WEIGHTS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.msgpack.index.json",
    "*.gguf",
    ".*",
)
_BASE_LAYER = ".base_layer."  # PEFT's name of the wrapped layer in trained-bias keys


def output_dtype(choice: MergeDtype, stored: str) -> str:
    """The safetensors dtype name a tensor stored as ``stored`` is written in under ``choice``.

    Example:
        >>> output_dtype(MergeDtype.BFLOAT16, "F32"), output_dtype(MergeDtype.AUTO, "F32"), output_dtype(MergeDtype.FLOAT16, "I64")
        ('BF16', 'F32', 'I64')
    """
    if choice is MergeDtype.AUTO or stored not in FLOAT_DTYPES:
        return stored
    return by_name(choice.value).code


@dataclass
class MergePlan:
    """What happens to which checkpoint key, checked before anything is written.

    Attributes:
        deltas: Checkpoint key -> adapted module whose ``B @ A`` is added to it.
        replacements: Checkpoint key -> adapter key of the tensor that replaces it.
    """

    deltas: dict[str, str] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)

    def modules_in(self, keys: Collection[str]) -> dict[str, str]:
        """The part of ``deltas`` whose checkpoint keys are in ``keys``."""
        return {key: module for key, module in self.deltas.items() if key in keys}


# -- the pure middle ------------------------------------------------------------------------


def resolve_key(name: str, keys: Collection[str]) -> Optional[str]:
    """The checkpoint key of the PEFT parameter name ``name``, or ``None``.

    PEFT names modules relative to the model class it wrapped, the checkpoint
    relative to the class that saved it; the two differ by a leading prefix
    (``model.`` of ``LlamaForCausalLM`` around ``LlamaModel``).  Tried in order,
    the first that gives one key wins: ``name`` itself; a key ending in
    ``.name`` (the checkpoint's class wraps the adapter's); ``name`` without
    its first components (the adapter's class wraps the checkpoint's).

    Args:
        name: ``<module>.<parameter>``, e.g. ``model.layers.0.self_attn.q_proj.weight``.
        keys: The checkpoint's keys.

    Returns:
        The key, or ``None`` when none fits.

    Raises:
        TargetingError: several keys fit equally.

    Example:
        >>> resolve_key("model.layers.0.mlp.up_proj.weight", {"layers.0.mlp.up_proj.weight"})
        'layers.0.mlp.up_proj.weight'
    """
    if name in keys:
        return name
    wrapped = [key for key in keys if key.endswith("." + name)]
    if len(wrapped) > 1:
        raise TargetingError(
            f"{name!r} matches several checkpoint keys ({', '.join(sorted(wrapped)[:3])}); "
            "merge into the checkpoint of the model class the adapter was trained on."
        )
    if wrapped:
        return wrapped[0]
    parts = name.split(".")
    for start in range(1, len(parts) - 1):
        shorter = ".".join(parts[start:])
        if shorter in keys:
            return shorter
    return None


def plan_merge(adapter: StoredAdapter, checkpoint: Checkpoint) -> MergePlan:
    """Map every adapted module and carried tensor of ``adapter`` to a checkpoint key, checking shapes.

    Args:
        adapter: The adapter to merge (any form).
        checkpoint: The base checkpoint's headers.

    Returns:
        The :class:`MergePlan`.

    Raises:
        TargetingError: a module or tensor has no key, a floating weight is
            expected but the key is not floating, or a shape differs; the
            message names the module and the checkpoint.

    Example:
        >>> from vblora_store.checkpoint import read_checkpoint
        >>> plan = plan_merge(read_adapter("fixtures/tiny-llama-vblora"), read_checkpoint(checkpoint))
        >>> len(plan.deltas), plan.deltas["model.layers.0.self_attn.q_proj.weight"]
        (14, 'model.layers.0.self_attn.q_proj')
    """
    plan = MergePlan()
    fan_in_fan_out = adapter.config.fan_in_fan_out
    hint = " (fan_in_fan_out is set)" if fan_in_fan_out else ""
    targets: dict[str, str] = {}

    def claim(name: str, what: str, shape: tuple[int, ...]) -> str:
        key = resolve_key(name, checkpoint.tensors)
        if key is None:
            raise TargetingError(
                f"{adapter.weights_path}: {what} has no tensor {name!r} in the checkpoint "
                f"{checkpoint.folder} (nor one differing by a leading prefix); merge into the base model "
                "the adapter was trained on."
            )
        if key in targets:
            raise TargetingError(
                f"{adapter.weights_path}: {what} and {targets[key]} both map to {key!r} of "
                f"{checkpoint.folder}; the adapter is inconsistent, re-save it from PEFT."
            )
        entry = checkpoint.tensors[key]
        if entry.dtype not in FLOAT_DTYPES:
            raise TargetingError(
                f"{checkpoint.path(key)}: {key!r} ({what}) is {entry.dtype}, not a float dtype (a quantized "
                "checkpoint?); merge into the unquantized base model."
            )
        if entry.shape != tuple(shape):
            raise TargetingError(
                f"{adapter.weights_path}: {what} needs {key!r} of shape {list(shape)}, but "
                f"{checkpoint.path(key)} holds {list(entry.shape)}{hint}; merge into the base model the "
                "adapter was trained on."
            )
        targets[key] = what
        return key

    for module, shape in adapter.modules.items():
        out_in = (shape.out_features, shape.in_features)
        weight_shape = out_in[::-1] if fan_in_fan_out else out_in  # ΔW's layout: (out, in), Conv1D (in, out)
        plan.deltas[claim(f"{module}.weight", f"module {module!r}", weight_shape)] = module
    for adapter_key in adapter.other_keys:
        name = adapter_key.removeprefix(MODEL_PREFIX).replace(_BASE_LAYER, ".")
        spec = adapter.specs[adapter_key]
        plan.replacements[claim(name, f"tensor {adapter_key!r}", spec.shape)] = adapter_key
    return plan


def merged_weight(
    base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, fan_in_fan_out: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``base + B @ A`` computed in float32 (float64 for a float64 base), then cast to ``dtype``.

    The product ``ΔW = B @ A`` (:func:`vblora_store.topk.delta_weight`) is fused
    into the addition (``addmm_``): one pass over the weight, no ``ΔW``-sized
    temporary; ``base`` is never rounded before the sum.

    Args:
        base: The base weight, ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out``.
        a: ``(r, in)``.
        b: ``(out, r)``.
        fan_in_fan_out: The weight is stored transposed (transformers' ``Conv1D``).
        dtype: The result's dtype.

    Returns:
        The merged weight, shaped like ``base``, contiguous; ``base`` is not modified.

    Example:
        >>> merged_weight(torch.zeros(2, 3), torch.ones(1, 3), torch.ones(2, 1),
        ...               fan_in_fan_out=False, dtype=torch.bfloat16)
        tensor([[1., 1., 1.],
                [1., 1., 1.]], dtype=torch.bfloat16)
    """
    compute = torch.promote_types(base.dtype, torch.float32)
    merged = base.to(compute, copy=True)  # shaped like base
    out_in = merged.T if fan_in_fan_out else merged  # (in, out) -> (out, in) view, written through
    out_in.addmm_(b.to(compute), a.to(compute))  # += (out, r) @ (r, in)
    return merged.to(dtype)


# -- the edge: reading and writing folders ------------------------------------------------


@dataclass(frozen=True)
class MergeSummary:
    """What :func:`merge` did: counts for the command line."""

    shards: int
    merged_modules: int
    replaced_tensors: int


def merge(
    base_dir: Union[str, Path],
    adapter_path: Union[str, Path],
    out: Union[str, Path],
    *,
    dtype: Union[MergeDtype, str] = MergeDtype.AUTO,
    force: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> MergeSummary:
    """Write ``base_dir`` with the adapter at ``adapter_path`` merged into ``out``, atomically.

    The adapter and the checkpoint are checked against each other (names,
    shapes, values) before anything is written; nothing appears at ``out``
    unless every shard was written.  The sharding and the index are kept; every
    file that is not a weights file is copied; ``config.json``'s ``dtype`` is
    updated when ``dtype`` is not ``auto``.

    Args:
        base_dir: The base model's checkpoint folder (``save_pretrained``).
        adapter_path: The folder of one VB-LoRA adapter, any form, or a Hub repo id (in a
            multi-adapter folder, the root is ``default``, a sub-folder its adapter).
        out: The folder to create.
        dtype: The merged floating tensors' dtype; ``auto`` keeps each as in the base.
        force: Replace ``out`` if it exists.
        revision, subfolder: Of ``adapter_path`` when it is a Hub repo id.

    Returns:
        A :class:`MergeSummary`.

    Raises:
        CheckpointNotFoundError, InvalidCheckpointError: ``base_dir`` is not a
            safetensors checkpoint.
        AdapterNotFoundError, InvalidConfigError, InvalidAdapterError: the adapter is unreadable.
        TargetingError: the adapter does not fit the checkpoint.
        DestinationExistsError: ``out`` exists and ``force`` is false.

    Example:
        >>> merge(checkpoint, "fixtures/tiny-llama-vblora", tmp / "merged", dtype="bfloat16")
        MergeSummary(shards=1, merged_modules=14, replaced_tensors=0)
    """
    base_dir, dtype = Path(base_dir), MergeDtype(dtype)
    adapter_path = resolve_source(adapter_path, revision=revision, subfolder=subfolder, nested=False)
    check_destination(out, force=force, sources=(base_dir, adapter_path))
    checkpoint = read_checkpoint(base_dir)
    adapter = read_adapter(adapter_path)
    plan = plan_merge(adapter, checkpoint)
    adapter.check_values()
    total_size = 0
    with atomic_folder(out, force=force) as work:
        shutil.copytree(base_dir, work, ignore=shutil.ignore_patterns(*_STALE_WEIGHTS), dirs_exist_ok=True)
        for shard in checkpoint.shards:
            total_size += _merge_shard(checkpoint, shard, adapter, plan, dtype, work / shard.name)
        if checkpoint.index is not None:
            index = dict(
                checkpoint.index, metadata={**checkpoint.index.get("metadata", {}), "total_size": total_size}
            )
            (work / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        if dtype is not MergeDtype.AUTO:
            _set_config_dtype(work / "config.json", dtype.value)
    return MergeSummary(len(checkpoint.shards), len(plan.deltas), len(plan.replacements))


def _merge_shard(
    checkpoint: Checkpoint,
    shard: Shard,
    adapter: StoredAdapter,
    plan: MergePlan,
    dtype: MergeDtype,
    dst: Path,
) -> int:
    """Write one merged shard to ``dst``; return its data size in bytes."""
    in_shard = plan.modules_in(set(shard.keys))
    factors = {m: (a, b) for m, a, b in module_factors(adapter, list(in_shard.values()), dtype=torch.float32)}
    out_dtypes = {key: output_dtype(dtype, checkpoint.tensors[key].dtype) for key in shard.keys}

    def produce(key: str) -> Optional[torch.Tensor]:
        target = FLOAT_DTYPES.get(out_dtypes[key])
        if key in in_shard:
            a, b = factors[in_shard[key]]
            base = read_tensor(checkpoint, key)
            return merged_weight(base, a, b, fan_in_fan_out=adapter.config.fan_in_fan_out, dtype=target)
        if key in plan.replacements:
            return adapter.tensor(plan.replacements[key]).to(target).contiguous()
        if out_dtypes[key] != checkpoint.tensors[key].dtype:
            return read_tensor(checkpoint, key).to(target)
        return None  # copied byte for byte

    return write_shard(checkpoint, shard, dst, out_dtypes, produce)


def _set_config_dtype(path: Path, dtype: str) -> None:
    """Record the merged dtype in ``config.json`` (``dtype``, and the older ``torch_dtype`` if present)."""
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpointError(
            f"{path}: not valid JSON ({e}); restore the base model's config.json."
        ) from e
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
