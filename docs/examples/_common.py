"""Shared by the examples: command-line options and the base model.

Every example runs on a real checkpoint (``--model``, downloaded by
transformers) or, with ``--tiny``, on a 2-layer Llama with random weights and a
byte-level "tokenizer", which needs no download (the tests use this).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"  # hidden 576, kv 192, mlp 1536: all multiples of 32


def parse_args(description: str) -> argparse.Namespace:
    """``--model``, ``--tiny`` and ``--out`` (default: a fresh temporary folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a causal LM on the Hugging Face Hub or on disk"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (no download)")
    parser.add_argument("--out", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="vblora-example-")
    return args


def load_base(args: argparse.Namespace, dtype: torch.dtype = torch.float32):
    """``(model, encode, decode)``: the base causal LM and text <-> token-id functions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model, (lambda text: tokenizer(text, return_tensors="pt").input_ids), tokenizer.decode
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([[min(b, 127) for b in text.encode()]])

    def decode(ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")

    return model, encode, decode
