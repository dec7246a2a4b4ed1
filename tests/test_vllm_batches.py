"""vLLM with VB-LoRA adapters: logprobs against our own engine, mixed batches, and base rows.

Lossless forms must give, in float32, the log-probabilities our
``VBLoRAModel`` computes from the same folder.  A batch mixing adapters of
different shapes and forms with base requests must give each request what it
gives alone; and base requests must stay base requests once every LoRA slot
has held an adapter (vLLM's CPU ops alone read slot ``-1`` as the last slot;
the plugin mends that, :mod:`vblora_store.vllm.base_rows`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_support import SKIP_REASON  # noqa: E402

pytest.importorskip("vllm", reason=SKIP_REASON)

from vllm_support import MAX_LORAS, PROMPTS, greedy, make_vblora  # noqa: E402
from vllm_support import base, ids, llm, where  # noqa: E402,F401  (this module's fixtures)

from vblora_store import convert  # noqa: E402

#: float32 logprobs of two implementations of the same float32 model differ by the order of their sums
#: (vLLM fuses q/k/v and gate/up, adds x @ A @ B in its own op, and uses its own attention): a few float32
#: ulps of values of order 10, about 1e-6, measured 2e-6 at most here.  1e-4 is far above that noise and far
#: below what a wrong adapter changes (the adapters move logprobs by more than 0.1, asserted below).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def lossless(base, where) -> dict[str, Path]:
    """One PEFT adapter in every lossless form, and one on the LM head too (vLLM serves LoRA there)."""
    full = make_vblora(base, where / "full", seed=11)
    forms = {"full": full}
    for to in ("topk", "packed", "compressed"):
        convert(full, where / to, to=to)
        forms[to] = where / to
    forms["lm_head"] = make_vblora(base, where / "lm_head", seed=12, targets=["q_proj", "lm_head"])
    return forms


def _vllm_logprobs(llm, request, prompt: list[int]) -> torch.Tensor:
    """vLLM's log-probabilities of every token after each prefix of ``prompt``: ``(len(prompt), vocab)``."""
    from vllm import SamplingParams

    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab, prompt_logprobs=vocab)
    out = llm.generate([{"prompt_token_ids": prompt}], params, lora_request=request, use_tqdm=False)[0]
    rows = [*out.prompt_logprobs[1:], out.outputs[0].logprobs[0]]  # the first prompt token has no prefix
    return torch.tensor([[row[t].logprob for t in range(vocab)] for row in rows], dtype=torch.float64)


def _engine_logprobs(base: Path, folder, prompt: list[int]) -> torch.Tensor:
    """Our ``VBLoRAModel``'s float32 log-probabilities on ``prompt``: ``(len(prompt), vocab)``."""
    from transformers import LlamaForCausalLM

    from vblora_store import VBLoRAModel

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if folder is not None:
        model = VBLoRAModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]  # (1, len, vocab) -> (len, vocab)
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("form", ["full", "topk", "packed", "compressed", "lm_head"])
def test_lossless_forms_give_our_engine_s_float32_logprobs(llm, ids, base, lossless, form):
    prompt = PROMPTS[1]
    served = _vllm_logprobs(llm, ids.request(lossless[form]), prompt)
    expected = _engine_logprobs(base, lossless[form], prompt)
    assert (served - expected).abs().max().item() < LOGPROB_ATOL
    assert (expected - _engine_logprobs(base, None, prompt)).abs().max().item() > 0.1  # the adapter matters


@pytest.fixture(scope="module")
def varied(base, where) -> list[Path]:
    """Four adapters of different r, N, L, k, targets and forms."""
    a = make_vblora(base, where / "v-a", r=2, num_vectors=32, vector_length=16, topk=1, seed=21)
    b = make_vblora(base, where / "v-b", r=8, num_vectors=300, vector_length=32, topk=3, seed=22,
                    targets=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    c = make_vblora(base, where / "v-c", r=4, num_vectors=64, vector_length=64, topk=2, seed=23,
                    targets=["o_proj", "up_proj"])  # fmt: skip
    d = make_vblora(base, where / "v-d-src", r=6, num_vectors=128, vector_length=16, topk=4, seed=24)
    convert(b, where / "v-b-packed", to="packed", bank_dtype="int8", weights_dtype="fixed8")
    convert(d, where / "v-d", to="compressed")
    return [a, where / "v-b-packed", c, where / "v-d"]


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(llm, ids, varied):
    requests = [ids.request(folder) for folder in varied[:3]] + [None]  # 3 adapters and a base row
    prompts = PROMPTS * 2
    mixed = greedy(llm, requests * 2, prompts)
    alone = [greedy(llm, [request], [prompt])[0] for request, prompt in zip(requests * 2, prompts)]
    assert mixed == alone
    assert len({tuple(tokens) for tokens in alone[:4]}) == 4  # every adapter does something different


def test_base_rows_stay_base_once_every_slot_has_held_an_adapter(llm, ids, varied, lossless):
    base_alone = greedy(llm, [None] * len(PROMPTS))
    for folder in [*varied, lossless["full"]][
        : MAX_LORAS + 1
    ]:  # one at a time: every slot filled, the last too
        greedy(llm, [ids.request(folder)], [PROMPTS[0]])
    requests = [ids.request(varied[0]), None, ids.request(varied[3]), None]
    mixed = greedy(llm, requests)
    assert [mixed[1], mixed[3]] == [base_alone[1], base_alone[3]]
    assert mixed[0] == greedy(llm, [requests[0]], [PROMPTS[0]])[0]


def test_vllm_s_own_cpu_op_reads_slot_minus_one_as_the_last_slot_and_the_mend_zeroes_it():
    from vllm.lora.ops.torch_ops import lora_ops

    from vblora_store.vllm.base_rows import without_base_rows

    original = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    weights = torch.stack([torch.eye(3), 5 * torch.eye(3)])  # (slots 2, r 3, in 3)
    inputs, indices = torch.ones(2, 3), torch.tensor([0, -1])
    out = torch.zeros(2, 3)
    original(inputs, weights, out, indices)
    assert out[1].tolist() == [5.0, 5.0, 5.0]  # the base row got slot 1's adapter: vLLM's behaviour
    without_base_rows(original)(inputs, weights, out, indices)
    assert out.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
