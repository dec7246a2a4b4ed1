"""Shared helpers of the engine tests: tiny random transformers models and PEFT twins.

Not a conftest (pytest does not load it by itself); test modules import it.
Nothing is downloaded: every model is built from a config with random weights.
"""

from __future__ import annotations

import copy
import warnings

import peft
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel

VOCAB = 100

# Large enough that the adapter visibly moves the outputs (PEFT's default bound 0.02 barely does).
BASE_KWARGS = dict(r=2, num_vectors=30, vector_length=16, topk=2, init_vector_bank_bound=0.5)


def tiny_llama(
    seed: int = 0, *, classifier: bool = False, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A 2-layer Llama, hidden 64, with random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    return model.to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 (Conv1D layers), n_embd 64, with random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def inputs(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    """Random token ids."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def twins(base: torch.nn.Module, seed: int = 3, **config) -> tuple[torch.nn.Module, VBLoRAModel]:
    """PEFT's and the engine's fresh adapters on copies of ``base``, from the same seed and config."""
    config = {**BASE_KWARGS, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config))
        torch.manual_seed(seed)
        ours = VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**config))
    return theirs, ours


def peft_adapter(
    tmp_path, base: torch.nn.Module, *, topk: bool, seed: int = 3, name: str = "adapter", **config
):
    """Save a fresh PEFT adapter of ``base`` into ``tmp_path/name``; return (folder, the PEFT model)."""
    config = {**BASE_KWARGS, **config, "save_only_topk_weights": topk}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, model


def peft_load(base: torch.nn.Module, folder, adapter_name: str = "default") -> torch.nn.Module:
    """PEFT's own loading of ``folder`` onto a copy of ``base``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=adapter_name)
