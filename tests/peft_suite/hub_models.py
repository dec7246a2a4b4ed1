"""Tiny random stand-ins for the Hub ids PEFT's tests load, built locally from transformers configs.

PEFT's tests call ``AutoModelForCausalLM.from_pretrained("peft-internal-testing/tiny-random-OPTForCausalLM")``
and the like. :func:`install` makes every ``from_pretrained`` of transformers (models,
configs, tokenizers) read such an id from a local folder instead: a model of the
same class, built from a small config with seeded random weights and saved once,
plus a byte-level tokenizer. Nothing is downloaded; an id with no stand-in fails
with a message saying so.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

_SMALL = dict(vocab_size=300, max_position_embeddings=64)
_DECODER = dict(_SMALL, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=4)  # fmt: skip
_ENCODER = dict(_SMALL, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)


def _opt() -> tuple[str, dict]:
    return "OPTForCausalLM", dict(_SMALL, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4,
                                  word_embed_proj_dim=16)  # fmt: skip


def _gpt2() -> tuple[str, dict]:
    return "GPT2LMHeadModel", dict(vocab_size=300, n_positions=64, n_embd=16, n_layer=2, n_head=4)


def _gemma3() -> tuple[str, dict]:
    return "Gemma3ForCausalLM", dict(_DECODER, sliding_window=8, model_type="gemma3_text")


#: Hub id -> (transformers class name, config keyword arguments); the config class is the model's.
STAND_INS: dict[str, Callable[[], tuple[str, dict]]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": _opt,
    "peft-internal-testing/opt-125m": _opt,
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": _gpt2,
    "hf-internal-testing/tiny-random-gpt2": _gpt2,
    "peft-internal-testing/tiny-random-GPTJForCausalLM": lambda: (
        "GPTJForCausalLM", dict(vocab_size=300, n_positions=64, n_embd=16, n_layer=2, n_head=4, rotary_dim=4)),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": lambda: ("LlamaForCausalLM", _DECODER),
    "peft-internal-testing/tiny-dummy-qwen2": lambda: ("Qwen2ForCausalLM", _DECODER),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": lambda: ("Qwen3ForCausalLM", _DECODER),
    "hf-internal-testing/tiny-random-MistralForCausalLM": lambda: ("MistralForCausalLM", _DECODER),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": _gemma3,
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": lambda: (
        "LlamaForSequenceClassification", dict(_DECODER, pad_token_id=1)),
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": lambda: (
        "T5ForConditionalGeneration", dict(_SMALL, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                           num_heads=4, decoder_start_token_id=0)),  # fmt: skip
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": lambda: (
        "BartForConditionalGeneration", dict(_SMALL, d_model=16, encoder_layers=2, decoder_layers=2,
                                             encoder_attention_heads=4, decoder_attention_heads=4,
                                             encoder_ffn_dim=32, decoder_ffn_dim=32)),  # fmt: skip
    "peft-internal-testing/tiny-random-BertModel": lambda: ("BertModel", _ENCODER),
    "peft-internal-testing/tiny-random-RobertaModel": lambda: ("RobertaModel", dict(_ENCODER, pad_token_id=1)),
    "peft-internal-testing/tiny-random-DebertaModel": lambda: ("DebertaModel", _ENCODER),
    "peft-internal-testing/tiny-random-DebertaV2Model": lambda: ("DebertaV2Model", _ENCODER),
    "peft-internal-testing/tiny-random-BertForSequenceClassification": lambda: (
        "BertForSequenceClassification", _ENCODER),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": lambda: (
        "RobertaForSequenceClassification", dict(_ENCODER, pad_token_id=1)),
}  # fmt: skip

def install(cache: Path) -> None:
    """Make transformers read every id of :data:`STAND_INS` from a local stand-in.

    Every file transformers fetches for a model, config, tokenizer or generation
    config goes through ``transformers.utils.hub.cached_files``; for a stand-in id
    it is given the local folder instead, so the loaded object still names the id.

    Args:
        cache: the folder the stand-ins are saved in (built on first use, then reused).
    """
    original = transformers.utils.hub.cached_files

    @functools.wraps(original)
    def cached_files(path_or_repo_id: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path_or_repo_id, str) and _is_repo_id(path_or_repo_id):
            path_or_repo_id = str(stand_in(path_or_repo_id, cache))
            kwargs.pop("revision", None)
        return original(path_or_repo_id, *args, **kwargs)

    transformers.utils.hub.cached_files = cached_files


def _is_repo_id(name: str) -> bool:
    return "/" in name and not os.path.isabs(name) and not os.path.exists(name)


def stand_in(model_id: str, cache: Path) -> Path:
    """The local folder standing in for ``model_id``: saved once, then reused.

    Raises:
        OSError: ``model_id`` has no stand-in (the suite downloads nothing).
    """
    if model_id not in STAND_INS:
        raise OSError(f"{model_id!r} has no local stand-in in tests/peft_suite/hub_models.py; nothing is downloaded")
    folder = cache / model_id.replace("/", "--")
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    class_name, kwargs = STAND_INS[model_id]()
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    staged = Path(tempfile.mkdtemp(dir=cache))
    try:
        model.save_pretrained(staged)
        _tokenizer().save_pretrained(staged)
        os.replace(staged, folder)  # whole or absent
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return folder


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: every text encodes, ids below 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
