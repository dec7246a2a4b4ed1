"""vblora_store: store, compress, reconstruct and publish VB-LoRA adapters.

The names below are imported on first use (PEP 562), so ``import vblora_store``
and the command line's ``--help`` cost no torch; ``from vblora_store import
convert`` works as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: Where each public name lives.
_HOMES = {
    "AdapterAccount": "accounting", "account": "accounting",
    "VBLoRAConfig": "config", "PeftType": "config",
    "VBLoRAModel": "engine", "get_peft_model_state_dict": "engine", "set_peft_model_state_dict": "engine",
    "inject_adapter_in_model": "engine", "get_base_model_state_dict": "engine", "convert_to_lora": "engine", "set_base_model_state_dict": "engine",
    "AdapterNotFoundError": "errors", "AdapterStateError": "errors", "AdapterNamesError": "errors",
    "AdapterNameError": "errors",
    "DestinationExistsError": "errors", "InvalidAdapterError": "errors", "InvalidArgumentError": "errors",
    "InvalidConfigError": "errors", "MissingConfigKeyError": "errors", "ReadError": "errors", "TargetingError": "errors", "UnsafeMergeError": "errors",
    "UnsupportedConversionError": "errors", "VBLoRAStoreError": "errors", "WriteError": "errors",
    "export_lora": "export",
    "StorageForm": "choices", "ReportFormat": "choices",
    "StoredAdapter": "format", "convert": "precision", "index_dtype": "format", "read_adapter": "format",
    "read_adapters": "format",
    "push": "hub", "resolve_source": "hub",
    "merge": "merge",
    "Report": "report", "build_report": "report",
    "verify_adapters": "verify",
}  # fmt: skip

__version__ = "0.1.0"

__all__ = [
    "AdapterAccount",
    "AdapterNameError",
    "AdapterNamesError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "DestinationExistsError",
    "InvalidAdapterError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "MissingConfigKeyError",
    "PeftType",
    "ReadError",
    "Report",
    "ReportFormat",
    "StorageForm",
    "StoredAdapter",
    "TargetingError",
    "UnsafeMergeError",
    "UnsupportedConversionError",
    "VBLoRAConfig",
    "VBLoRAModel",
    "VBLoRAStoreError",
    "account",
    "build_report",
    "convert",
    "convert_to_lora",
    "export_lora",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "index_dtype",
    "inject_adapter_in_model",
    "merge",
    "push",
    "read_adapter",
    "read_adapters",
    "resolve_source",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "verify_adapters",
    "WriteError",
]


class _Package(types.ModuleType):
    """Keeps ``vblora_store.merge`` the function once the submodule of that name is imported.

    Importing ``vblora_store.merge`` (the module) sets the package attribute
    ``merge`` to it; the function is what this package exports under that name,
    as it did when its exports were imported eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name, value)  # the submodule "merge" holds the function "merge"
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'vblora_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
