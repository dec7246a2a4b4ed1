"""The format layer: PEFT's adapter files, read lazily and written exactly; one codec per storage form."""

from ..storage_forms import StorageForm
from .atomic import atomic_folder, check_destination
from .conversion import convert, convert_tensors, write_adapter
from .keys import BANK_KEY, index_dtype
from .reading import find_adapter_folders, read_adapter, read_adapters
from .stored import ModuleShape, StoredAdapter, TensorSpec, check_tensor_values

__all__ = [
    "BANK_KEY",
    "ModuleShape",
    "StorageForm",
    "StoredAdapter",
    "TensorSpec",
    "atomic_folder",
    "check_destination",
    "check_tensor_values",
    "convert",
    "convert_tensors",
    "find_adapter_folders",
    "index_dtype",
    "read_adapter",
    "read_adapters",
    "write_adapter",
]
