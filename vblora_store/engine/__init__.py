"""The reconstruction engine: VB-LoRA adapters on a live model, with PEFT's API.

``VBLoRAModel`` wraps a torch or transformers model, injects or loads
adapters (full or top-k form) and runs them as rank-r LoRA factors built once
and cached.  See ``docs/engine.md``.
"""

from .cache import FactorCache
from .layer import VBLoRALinear
from .topk_store import TopKTensors
from .model import VBLoRAModel
from .targeting import find_targets
from .trainable import ModulesToSave
from .lora_conversion import convert_to_lora
from .functions import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "VBLoRAModel", "VBLoRALinear", "TopKTensors", "FactorCache", "ModulesToSave", "find_targets",
    "convert_to_lora", "get_base_model_state_dict", "get_peft_model_state_dict", "inject_adapter_in_model",
    "set_base_model_state_dict", "set_peft_model_state_dict",
]  # fmt: skip
