"""vLLM's offline engine serves VB-LoRA folders, every form, exactly as their ``export-lora``.

The reference for "exact" is vLLM itself serving the LoRA adapter that
``vblora-store export-lora`` writes (the same tensors, so the same tokens, bit
for bit), and, for the lossless forms, our own ``VBLoRAModel`` in float32.
Runs where vLLM is installed (``.ci/run`` makes such an environment); skips
elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_support import SKIP_REASON  # noqa: E402

pytest.importorskip("vllm", reason=SKIP_REASON)

from vllm_support import PROMPTS, greedy, make_vblora  # noqa: E402
from vllm_support import base, ids, llm, where  # noqa: E402,F401  (this module's fixtures)

from vblora_store import convert, export_lora  # noqa: E402


@pytest.fixture(scope="module")
def base_tokens(llm) -> list[list[int]]:
    return greedy(llm, [None] * len(PROMPTS))


@pytest.fixture(scope="module")
def peft_full(base, where) -> Path:
    """The reference adapter, PEFT's full form: r=4, N=64, L=16, k=2 on every linear layer."""
    return make_vblora(base, where / "full")


def _form(src: Path, dst: Path, form: str) -> Path:
    """``src`` stored as ``form``: ``<to>`` or ``<to>:<bank dtype>:<weights dtype>``."""
    to, *dtypes = form.split(":")
    options = dict(zip(("bank_dtype", "weights_dtype"), dtypes))
    convert(src, dst, to=to, **options)
    return dst


#: Every stored form and precision (bank dtype, weights dtype) the reader takes.
FORMS = [
    "topk", "packed", "compressed",
    "packed:int8:fixed8", "packed:int4:float16", "packed:float8_e4m3:fixed16",
    "compressed:bfloat16:bfloat16", "compressed:float16:float16",
]  # fmt: skip


def _export(folder: Path) -> Path:
    lora = folder.with_name(folder.name + "-lora")
    export_lora(folder, lora, force=True)
    return lora


def _same_as_export(llm, ids, folder: Path) -> list[list[int]]:
    """Greedy tokens of ``folder`` and of its ``export-lora``, asserted equal; the tokens."""
    lora = _export(folder)
    ours = greedy(llm, [ids.request(folder)] * len(PROMPTS))
    assert ours == greedy(llm, [ids.request(lora)] * len(PROMPTS))
    return ours


def test_full_form_serves_exactly_as_its_lora_export_and_differs_from_the_base(
    llm, ids, peft_full, base_tokens
):
    assert _same_as_export(llm, ids, peft_full) != base_tokens


@pytest.mark.parametrize("form", FORMS)
def test_every_form_and_precision_serves_exactly_as_its_lora_export(
    llm, ids, peft_full, where, base_tokens, form
):
    folder = _form(peft_full, where / form.replace(":", "-"), form)
    assert _same_as_export(llm, ids, folder) != base_tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_files_serve_exactly_as_their_lora_export(llm, ids, base, where, base_tokens, dtype):
    folder = make_vblora(base, where / f"half-{dtype}", dtype=dtype, seed=3)
    assert {t.dtype for t in _tensors(folder).values()} == {dtype}
    assert _same_as_export(llm, ids, folder) != base_tokens
    assert (
        _same_as_export(llm, ids, _form(folder, where / f"half-{dtype}-compressed", "compressed"))
        != base_tokens
    )


def test_bin_files_and_k1_serve_exactly_as_their_lora_export(llm, ids, base, where, base_tokens):
    topk_bin = make_vblora(
        base, where / "topk-bin", seed=4, save_only_topk_weights=True, safe_serialization=False
    )
    assert (topk_bin / "adapter_model.bin").is_file()
    assert _same_as_export(llm, ids, topk_bin) != base_tokens
    k1 = make_vblora(base, where / "k1", seed=5, topk=1)
    assert _same_as_export(llm, ids, k1) != base_tokens
    assert _same_as_export(llm, ids, _form(k1, where / "k1-compressed", "compressed")) != base_tokens


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))
