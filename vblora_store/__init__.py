"""vblora_store: store, compress, reconstruct and publish VB-LoRA adapters."""

from .accounting import AdapterAccount, account
from .config import VBLoRAConfig
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
from .format import StorageForm, StoredAdapter, convert, index_dtype, read_adapter, read_adapters
from .report import Report, ReportFormat, build_report

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
    "VBLoRAStoreError",
    "account",
    "build_report",
    "convert",
    "index_dtype",
    "read_adapter",
    "read_adapters",
]
