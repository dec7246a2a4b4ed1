"""vblora_store: store, compress, reconstruct and publish VB-LoRA adapters."""

from .accounting import AdapterAccount, account
from .config import VBLoRAConfig
from .engine import VBLoRAModel
from .errors import (
    AdapterNotFoundError,
    AdapterStateError,
    DestinationExistsError,
    InvalidAdapterError,
    InvalidConfigError,
    TargetingError,
    UnsupportedConversionError,
    VBLoRAStoreError,
)
from .export import export_lora
from .format import StorageForm, StoredAdapter, convert, index_dtype, read_adapter, read_adapters
from .hub import push, resolve_source
from .merge import merge
from .report import Report, ReportFormat, build_report
from .verify import verify_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterAccount",
    "AdapterNotFoundError",
    "AdapterStateError",
    "DestinationExistsError",
    "InvalidAdapterError",
    "InvalidConfigError",
    "Report",
    "ReportFormat",
    "StorageForm",
    "StoredAdapter",
    "TargetingError",
    "UnsupportedConversionError",
    "VBLoRAConfig",
    "VBLoRAModel",
    "VBLoRAStoreError",
    "account",
    "build_report",
    "convert",
    "export_lora",
    "index_dtype",
    "merge",
    "push",
    "read_adapter",
    "read_adapters",
    "resolve_source",
    "verify_adapters",
]
