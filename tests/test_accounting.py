"""Our per-adapter counts equal PEFT's ``get_nb_savable_parameters``, computed from the files alone."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MULTI_FIXTURE, save_both_forms, single_config, tiny_llama
from vblora_store import account, convert, read_adapter, read_adapters
from vblora_store.format.codecs.base import FormCounts
from vblora_store.format.codecs.topk import CODEC as TOPK


def peft_counts(model, adapter: str = "default", *, topk: bool) -> tuple[int, int]:
    """PEFT's ``(vblora_params, other_params)`` for the form the adapter's config flag selects."""
    config = model.peft_config[adapter]
    saved, config.save_only_topk_weights = config.save_only_topk_weights, topk
    try:
        return model.get_nb_savable_parameters(adapter)
    finally:
        config.save_only_topk_weights = saved


def our_counts(folder: Path) -> tuple[int, int]:
    """Our ``(vblora_params, other_params)`` for the single adapter stored in ``folder``."""
    acc = account(read_adapter(folder))
    return acc.vblora_params, acc.other_params


# -- tiny models of several kinds -------------------------------------------------------------------


class TinyMLP(torch.nn.Module):
    """One 4x4 linear layer: a bank of 2**15 vectors of length 4 still costs nothing."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def tiny_llama_seq_cls():
    from transformers import LlamaForSequenceClassification

    from conftest import make_fixtures

    config = make_fixtures.tiny_llama_config()
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    config.bos_token_id = config.eos_token_id = 0  # inside the tiny vocabulary
    return GPT2LMHeadModel(config)


def vblora(**kwargs):
    from peft import VBLoRAConfig

    return VBLoRAConfig(**kwargs)


def _gpt2_config(**overrides):
    """A VB-LoRA config for the tiny GPT2 (Conv1D: fan_in_fan_out)."""
    return vblora(
        task_type="CAUSAL_LM", r=4, num_vectors=64, vector_length=16, topk=2, fan_in_fan_out=True, **overrides
    )


CASES = {
    # llama, uint8 indices (N < 2**8)
    "llama-N64-uint8": (tiny_llama, lambda: single_config()),
    # llama, int16 indices, topk 3
    "llama-N300-int16-k3": (tiny_llama, lambda: single_config(num_vectors=300, topk=3, vector_length=32)),
    # int32 indices (N = 2**15) on a one-layer model
    "mlp-N32768-int32": (
        TinyMLP,
        lambda: vblora(r=1, num_vectors=2**15, vector_length=4, topk=2, target_modules=["fc"]),
    ),
    # sequence classification: PEFT adds the "score" head to modules_to_save
    "llama-seqcls-modules_to_save": (
        tiny_llama_seq_cls,
        lambda: single_config(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]),
    ),
    # GPT2's Conv1D needs fan_in_fan_out; biases trained and saved
    "gpt2-bias-all": (tiny_gpt2, lambda: _gpt2_config(target_modules=["c_attn", "c_proj"], bias="all")),
    "gpt2-bias-vblora_only": (tiny_gpt2, lambda: _gpt2_config(target_modules=["c_attn"], bias="vblora_only")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved_case(request, tmp_path_factory):
    """A PEFT model of one case, and its full and top-k saves."""
    from peft import get_peft_model

    make_model, make_config = CASES[request.param]
    torch.manual_seed(0)
    model = get_peft_model(make_model(), make_config())
    paths = save_both_forms(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, paths


def test_counts_equal_peft_for_single_adapter_models_in_both_forms(saved_case):
    """For each model kind and each form, our counts from the files equal PEFT's counts from the model."""
    name, model, paths = saved_case
    for form, topk in (("full", False), ("topk", True)):
        assert our_counts(paths[form]) == peft_counts(model, topk=topk), (name, form)


def test_other_params_are_what_peft_trains_besides_vblora(saved_case):
    """``other_params`` is non-zero exactly when PEFT trains something else (modules_to_save or biases)."""
    name, model, paths = saved_case
    expects_other = name.startswith(("llama-seqcls", "gpt2"))
    assert (our_counts(paths["full"])[1] > 0) == expects_other


def test_converted_topk_counts_equal_peft_topk_counts(saved_case, tmp_path):
    """Our conversion of the full save is counted as PEFT counts the top-k form."""
    name, model, paths = saved_case
    convert(paths["full"], tmp_path / "ours")
    assert our_counts(tmp_path / "ours") == peft_counts(model, topk=True)


def test_full_count_is_bank_plus_logits_by_hand():
    """Full form of the single fixture: 64x16 bank + 544 slots x 64 logits, derived by hand.

    Slots: r*(in+out)/L per module; attention 4*(64+64)/16 = 32, MLP 4*(64+128)/16 = 48;
    2 layers x (4 x 32 + 3 x 48) = 544.  Top-k: bank + 544*(k-1) + 544*k/4 (uint8 indices).
    """
    from conftest import SINGLE_FIXTURE

    acc = account(read_adapter(SINGLE_FIXTURE))
    assert acc.slots == 544
    assert acc.vblora_params == acc.full_vblora_params == 64 * 16 + 544 * 64
    assert acc.topk_vblora_params == 64 * 16 + 544 * 1 + 544 * 2 // 4
    assert acc.lora_params == 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 128))


# -- two adapters: PEFT sums, we count per adapter -------------------------------------------------------


def load_trainable(folder: Path, adapter_name: str = "default"):
    """A model holding only the adapter at ``folder``, trainable so PEFT counts its other params."""
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name=adapter_name, is_trainable=True)


@pytest.fixture(scope="module")
def multi_topk(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("multi") / "topk"
    convert(MULTI_FIXTURE, dst)
    return dst


def test_each_adapter_counts_as_peft_counts_a_model_holding_only_it(multi_topk):
    """Per adapter, in both forms, our count equals PEFT's count on a model holding just that adapter."""
    for folder, topk in ((MULTI_FIXTURE, False), (multi_topk, True)):
        default, second = read_adapters(folder)
        only_default = load_trainable(folder)
        only_second = load_trainable(folder / "second", "second")
        assert our_counts(default.folder) == peft_counts(only_default, topk=topk)
        assert our_counts(second.folder) == peft_counts(only_second, "second", topk=topk)


def test_peft_sums_both_adapters_and_ours_add_up_to_it():
    """On a model holding both adapters PEFT's full-form count is the sum of our two per-adapter counts.

    (PEFT's top-k formula applies the asked adapter's N and k to every adapter's logits, so only
    the full form is a plain sum.)
    """
    model = load_trainable(MULTI_FIXTURE)
    model.load_adapter(str(MULTI_FIXTURE / "second"), adapter_name="second", is_trainable=True)
    ours = [account(a).vblora_params for a in read_adapters(MULTI_FIXTURE)]
    assert ours[0] != ours[1]
    assert peft_counts(model, topk=False)[0] == sum(ours)


# -- the top-k formula against PEFT's own float arithmetic ---------------------------------------------------


def peft_topk_formula(bank_params: int, slots: int, num_vectors: int, topk: int) -> int:
    """PEFT's ``get_nb_savable_parameters`` itself, run on stand-in parameters that only report ``numel``."""
    from peft.tuners.vblora.model import VBLoRAModel

    def param(n):
        return SimpleNamespace(numel=lambda: n, requires_grad=True)

    fake = SimpleNamespace(
        named_parameters=lambda: [
            ("vblora_logits_A", param(slots * num_vectors)),
            ("vblora_vector_bank", param(bank_params)),
        ],
        peft_config={
            "default": SimpleNamespace(save_only_topk_weights=True, num_vectors=num_vectors, topk=topk)
        },
    )
    return VBLoRAModel.get_nb_savable_parameters(fake, "default")[0]


@settings(max_examples=300, deadline=None)
@given(
    num_vectors=st.one_of(
        st.integers(1, 600),
        st.sampled_from([255, 256, 2**15 - 1, 2**15, 2**31 - 1, 2**31]),
        st.integers(1, 2**33),
    ),
    vector_length=st.integers(1, 256),
    slots=st.integers(1, 100_000),
    data=st.data(),
)
def test_topk_formula_equals_peft_float_formula(num_vectors, vector_length, slots, data):
    """``topk_savable_params`` (exact integers) equals PEFT's float formula, including its int() floor."""
    topk = data.draw(st.integers(1, min(num_vectors, 64)), label="topk")
    bank = num_vectors * vector_length
    assert TOPK.savable_params(FormCounts(bank, slots, num_vectors, topk)) == (
        peft_topk_formula(bank, slots, num_vectors, topk)
    )
