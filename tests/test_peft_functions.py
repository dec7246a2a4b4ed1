"""PEFT's module-level functions (``vblora_store.engine.functions``), each against PEFT's own on twin models."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest_engine import BASE_KWARGS, inputs, logits, tiny_gpt2, tiny_llama, twins

from vblora_store import (
    convert_to_lora,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import AdapterNotFoundError, InvalidArgumentError, UnsupportedConversionError

TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize("topk", [False, True])
def test_get_peft_model_state_dict_is_peft_s(topk):
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS, save_only_topk_weights=topk)
    expected, got = peft.get_peft_model_state_dict(theirs), get_peft_model_state_dict(ours)
    assert got.keys() == expected.keys()
    assert any(k.endswith("_topk_indices") for k in got) == topk
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_get_peft_model_state_dict_takes_values_from_a_given_state_dict():
    _, ours = twins(tiny_llama(), target_modules=TARGETS)
    state = {k: torch.zeros_like(v) if "vblora_logits" in k else v for k, v in ours.state_dict().items()}
    got = get_peft_model_state_dict(ours, state_dict=state)
    assert got.keys() == get_peft_model_state_dict(ours).keys()
    assert all(not v.any() for k, v in got.items() if "vblora_logits" in k)


@pytest.mark.parametrize("topk", [False, True])
def test_set_peft_model_state_dict_gives_peft_s_model(topk):
    base, ids = tiny_gpt2(), inputs()
    theirs, _ = twins(base, seed=5, target_modules=["c_attn"], save_only_topk_weights=topk)
    _, ours = twins(base, seed=9, target_modules=["c_attn"], save_only_topk_weights=topk)
    assert not torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-4)
    result = set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert result.unexpected_keys == [] and type(result).__name__ == "_IncompatibleKeys"
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    if topk:  # PEFT's reading: -inf outside the top k
        assert torch.isneginf(ours.base_model.model.transformer.h[0].attn.c_attn.vblora_logits_A["default"]).any()


def test_set_peft_model_state_dict_names_what_has_no_place():
    _, ours = twins(tiny_llama(), target_modules=TARGETS)
    state = get_peft_model_state_dict(ours)
    result = set_peft_model_state_dict(ours, {**state, "base_model.model.nowhere.vblora_logits_A": torch.ones(1)})
    assert result.unexpected_keys == ["base_model.model.nowhere.vblora_logits_A"]
    with pytest.raises(AdapterNotFoundError, match="'other'"):
        set_peft_model_state_dict(ours, state, adapter_name="other")
    with pytest.raises(RuntimeError, match="size mismatch"):
        key = next(k for k in state if "vblora_logits_A" in k)
        set_peft_model_state_dict(ours, {key: torch.zeros(1, 1, 1)})


def test_set_peft_model_state_dict_refuses_top_k_indices_without_their_weights():
    _, ours = twins(tiny_llama(), target_modules=TARGETS, save_only_topk_weights=True)
    state = {k: v for k, v in get_peft_model_state_dict(ours).items() if not k.endswith("_topk_weights")}
    with pytest.raises(InvalidArgumentError, match="_topk_weights"):
        set_peft_model_state_dict(ours, state)


def test_set_peft_model_state_dict_refuses_an_adapter_held_in_topk_form(tmp_path):
    _, ours = twins(tiny_llama(), target_modules=TARGETS)
    ours.save_pretrained(tmp_path, save_only_topk_weights=True)
    loaded = VBLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(UnsupportedConversionError, match="top-k form"):
        set_peft_model_state_dict(loaded, get_peft_model_state_dict(ours))


def test_inject_adapter_in_model_refuses_vblora_as_peft_does():
    config = dict(target_modules=TARGETS, vector_length=16)
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):
        peft.inject_adapter_in_model(peft.VBLoRAConfig(**config), tiny_llama())
    base = tiny_llama()
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):
        inject_adapter_in_model(VBLoRAConfig(**config), base)
    assert not any("vblora" in name for name, _ in base.named_modules())


def test_base_model_state_dict_is_peft_s_and_loads_back():
    theirs, ours = twins(tiny_llama(classifier=True), target_modules=TARGETS, modules_to_save=["score"])
    expected, got = peft.get_base_model_state_dict(theirs), get_base_model_state_dict(ours)
    assert got.keys() == expected.keys() == tiny_llama(classifier=True).state_dict().keys()
    original = {k: v.clone() for k, v in got.items()}
    with torch.no_grad():
        ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)
    assert set_base_model_state_dict(ours, original) == ([], [])
    assert all(torch.equal(v, original[k]) for k, v in get_base_model_state_dict(ours).items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        set_base_model_state_dict(ours, {**original, "extra.weight": torch.ones(1)})
    missing = set_base_model_state_dict(ours, {}, strict=False).missing_keys
    assert sorted(missing) == sorted(original)


def test_the_tuner_passes_layers_to_the_model_as_peft_s_does():
    inner = tiny_llama().model  # a LlamaModel: its decoder layers are `layers`
    wrapped = VBLoRAModel(inner, VBLoRAConfig(target_modules=TARGETS, vector_length=16))
    assert wrapped.base_model.layers is inner.layers


# -- convert_to_lora ------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 8, 0.5, 0.9])
def test_convert_to_lora_is_peft_s(rank):
    theirs, ours = twins(tiny_gpt2(), target_modules=["c_attn", "c_fc"])
    assert ours.supports_lora_conversion() and theirs.supports_lora_conversion()
    peft_config, expected = peft.convert_to_lora(theirs, rank)
    config, got = convert_to_lora(ours, rank)
    assert got.keys() == expected.keys()
    for key in (k for k in got if k.endswith("lora_A.weight")):
        other = key.replace("lora_A", "lora_B")
        assert got[key].shape == expected[key].shape and got[other].shape == expected[other].shape
        torch.testing.assert_close(got[other] @ got[key], expected[other] @ expected[key], atol=1e-5, rtol=1e-4)
    assert (config["r"], config["lora_alpha"]) == (peft_config.r, peft_config.lora_alpha)
    assert config["rank_pattern"] == peft_config.rank_pattern


def test_convert_to_lora_all_the_energy_stops_at_the_update_s_rank():
    # PEFT's SVD of the dense ΔW counts round-off directions too (3 here); ours stops at B @ A's rank, exactly
    _, ours = twins(tiny_gpt2(), target_modules=["c_attn"])
    config, got = convert_to_lora(ours, 1.0)
    assert set(config["rank_pattern"].values()) == {BASE_KWARGS["r"]}
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    a, b = layer.build_factors("default")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
    torch.testing.assert_close(got[key.format("B")] @ got[key.format("A")], b @ a, atol=1e-6, rtol=1e-5)


def test_convert_to_lora_runs_as_a_peft_lora_model():
    base, ids = tiny_llama(), inputs()
    _, ours = twins(base, target_modules=TARGETS)
    config, state = convert_to_lora(ours, rank=BASE_KWARGS["r"])  # the adapter's own rank: exact
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{k: v for k, v in config.items()
                                                                        if k != "peft_type"}))
    assert peft.set_peft_model_state_dict(lora, state).unexpected_keys == []
    torch.testing.assert_close(logits(lora, ids), logits(ours, ids), atol=1e-5, rtol=0)


def test_convert_to_lora_refuses_what_it_cannot_do():
    _, ours = twins(tiny_llama(), target_modules=TARGETS)
    for rank in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="rank must be"):
            convert_to_lora(ours, rank)
    with pytest.raises(InvalidArgumentError, match="larger than the layer allows"):
        convert_to_lora(ours, 10_000)
    _, biased = twins(tiny_llama(), target_modules=TARGETS, bias="all")
    assert not biased.supports_lora_conversion()
    with pytest.raises(InvalidArgumentError, match="bias"):
        convert_to_lora(biased, 2)
