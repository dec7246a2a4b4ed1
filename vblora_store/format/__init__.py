"""The format layer: PEFT's adapter files, read lazily and written exactly."""

from .atomic import atomic_folder, check_destination
from .conversion import convert, convert_tensors, write_adapter
from .keys import BANK_KEY, StorageForm, index_dtype
from .peft import ModuleShape, StoredAdapter, TensorSpec, find_adapter_folders, read_adapter, read_adapters

__all__ = [
    "BANK_KEY",
    "ModuleShape",
    "StorageForm",
    "StoredAdapter",
    "TensorSpec",
    "atomic_folder",
    "check_destination",
    "convert",
    "convert_tensors",
    "find_adapter_folders",
    "index_dtype",
    "read_adapter",
    "read_adapters",
    "write_adapter",
]
