"""Saving a model's adapters as PEFT's ``PeftModel.save_pretrained`` does, file for file.

Each adapter goes to ``save_directory`` (``default``) or a sub-folder named
after it: ``adapter_config.json`` (``inference_mode`` true, the base model's
``name_or_path``, ``auto_mapping`` when there is no ``task_type``, the PEFT
version) and ``adapter_model.safetensors`` (or ``adapter_model.bin``), with
PEFT's key names; ``README.md`` is PEFT's model card, created or updated.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..config import VBLoRAConfig
from ..errors import AdapterStateError
from ..format.conversion import write_adapter
from .state import adapter_state_dict, embedding_parameters

__all__ = [
    "PEFT_FORMAT_VERSION",
    "saved_config",
    "embedding_tensors",
    "save_adapter",
    "write_model_card",
    "save_model",
]

#: The PEFT release whose files vblora_store writes byte for byte (written as ``peft_version``
#: when PEFT itself is not installed).
PEFT_FORMAT_VERSION = "0.21.2"


def _peft_version() -> str:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return PEFT_FORMAT_VERSION


def saved_config(model: nn.Module, config: VBLoRAConfig, *, topk: bool) -> VBLoRAConfig:
    """The config PEFT writes for ``config`` saved from ``model``.

    Example:
        >>> saved_config(nn.Linear(2, 2), VBLoRAConfig(), topk=True).auto_mapping
        {'base_model_class': 'Linear', 'parent_library': 'torch.nn.modules.linear'}
    """
    name_or_path = config.base_model_name_or_path
    if name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    auto_mapping = config.auto_mapping
    if config.task_type is None:
        cls = type(model)
        auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return dataclasses.replace(
        config,
        save_only_topk_weights=bool(topk),
        inference_mode=True,
        base_model_name_or_path=name_or_path,
        auto_mapping=auto_mapping,
        peft_version=config.peft_version or _peft_version(),
    )


def embedding_tensors(
    model: nn.Module, config: VBLoRAConfig, save_embedding_layers
) -> dict[str, torch.Tensor]:
    """The input and output embeddings PEFT saves with ``save_embedding_layers``, by PEFT key.

    ``"auto"`` saves them when the base model's ``config.json`` (a local
    ``base_model_name_or_path``) has another vocabulary size than the model:
    the embeddings were resized in training.  VB-LoRA adapts no embedding, so
    PEFT's other "auto" rule (embeddings among the targets) never applies.
    """
    if save_embedding_layers == "auto":
        save_embedding_layers = _vocab_resized(model, config)
    elif not isinstance(save_embedding_layers, bool):
        raise AdapterStateError(
            f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}."
        )
    if not save_embedding_layers:
        return {}
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a transformers model.")
        return {}
    return dict(embedding_parameters(model))


def _vocab_resized(model: nn.Module, config: VBLoRAConfig) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = config.base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    file = Path(base) / "config.json" if base else None
    if not vocab or file is None or not file.is_file():
        return False
    try:
        saved = json.loads(file.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return False
    if saved is not None and saved != vocab:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning."
        )
        return True
    return False


def save_adapter(
    folder: Union[str, Path],
    model: nn.Module,
    bank: torch.Tensor,
    adapter: str,
    config: VBLoRAConfig,
    *,
    topk: bool,
    safe_serialization: bool = True,
    save_embedding_layers: Union[bool, str] = "auto",
) -> None:
    """Write one adapter of ``model`` into ``folder`` as PEFT does."""
    saved = saved_config(model, config, topk=topk)
    tensors = adapter_state_dict(model, bank, adapter, saved, topk=topk)
    for key, param in embedding_tensors(model, config, save_embedding_layers).items():
        tensors[key] = param.detach().to("cpu").contiguous().clone()  # a tied head gets its own copy
    write_adapter(folder, saved, tensors, safe_serialization=safe_serialization)


def write_model_card(folder: Union[str, Path], model: nn.Module, config: VBLoRAConfig) -> None:
    """Create or update ``README.md`` in ``folder`` the way PEFT's ``create_or_update_model_card`` does.

    Front matter: ``library_name: peft``, the model's tags plus ``transformers``
    (for a transformers model) and ``base_model:adapter:<name>``, ``base_model``
    and, for a causal LM, ``pipeline_tag: text-generation``; the text gets a
    "Framework versions" line.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(getattr(model, "model_tags", None) or [])
    if type(model).__module__.startswith("transformers."):
        tags.add("transformers")
    name = getattr(model, "name_or_path", None)
    if name is not None:  # PEFT's rule, an empty name (a model built from a config) included
        tags.add(f"base_model:adapter:{name}")
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and config.task_type == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    model_config = getattr(model, "config", None)
    base = getattr(model_config, "name_or_path", None) if model_config is not None else None
    if base is not None:
        card.data["base_model"] = base
    lines = card.text.splitlines()
    version_line = f"- PEFT {_peft_version()} format, written by vblora_store"
    if version_line not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version_line)
        else:
            lines.append(f"{heading}\n\n{version_line}")
    card.text = "\n".join(lines)
    card.save(path)


def save_model(
    tuner,
    save_directory: Union[str, Path],
    *,
    safe_serialization: bool,
    selected_adapters: Optional[list[str]],
    save_embedding_layers: Union[bool, str],
    is_main_process: bool,
    save_only_topk_weights: Optional[bool],
) -> None:
    """``VBLoRAModel.save_pretrained``: the model card, then each adapter in PEFT's layout."""
    root = Path(save_directory)
    if root.is_file():
        raise AdapterStateError(f"{root}: is a file; save_pretrained needs a folder.")
    adapters = tuner.check_known(list(tuner.peft_config) if selected_adapters is None else selected_adapters)
    if not is_main_process:
        return
    root.mkdir(parents=True, exist_ok=True)
    write_model_card(root, tuner.model, tuner.peft_config[(tuner.active_adapters or adapters)[0]])
    for adapter in adapters:
        config = tuner.peft_config[adapter]
        topk = config.save_only_topk_weights if save_only_topk_weights is None else save_only_topk_weights
        save_adapter(
            root if adapter == "default" else root / adapter, tuner.model, tuner.vblora_vector_bank[adapter],
            adapter, config, topk=bool(topk), safe_serialization=safe_serialization,
            save_embedding_layers=save_embedding_layers,
        )  # fmt: skip
