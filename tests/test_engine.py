"""The engine against real PEFT: targets, counts, outputs, merges, files, adapter switching."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from conftest_engine import BASE_KWARGS, inputs, logits, peft_adapter, peft_load, tiny_gpt2, tiny_llama, twins

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.format import StorageForm, convert

ATOL = 1e-5

TARGETING = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.layers\.1\..*_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude-list": dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"]),
    "exclude-regex": dict(target_modules=["q_proj", "k_proj", "up_proj"], exclude_modules=r".*layers\.0\..*"),
    "layers": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "layer-int": dict(target_modules=["k_proj"], layers_to_transform=0),
    "dropout-bias": dict(target_modules=["v_proj"], vblora_dropout=0.1, bias="all"),
}


@pytest.mark.parametrize("case", sorted(TARGETING))
def test_fresh_adapter_matches_peft(case):
    """Same targets, trainable and savable counts, and (same seed) same outputs as get_peft_model."""
    theirs, ours = twins(tiny_llama(), **TARGETING[case])
    assert ours.targeted_module_names == theirs.base_model.targeted_module_names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_savable_parameters() == theirs.get_nb_savable_parameters()
    ids = inputs()
    theirs.eval(), ours.eval()
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)


def test_classifier_head_is_saved_like_peft(tmp_path):
    """SEQ_CLS adds the head to modules_to_save; the saved files hold the same keys and load in PEFT."""
    base = tiny_llama(classifier=True)
    theirs, ours = twins(base, target_modules=["q_proj"], task_type="SEQ_CLS")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        ours.model.score.modules_to_save["default"].weight.normal_()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert _specs(tmp_path / "ours") == _specs(tmp_path / "theirs")
    ids = inputs()
    assert torch.allclose(
        logits(peft_load(base, tmp_path / "ours").eval(), ids), logits(ours.eval(), ids), atol=ATOL
    )


def _specs(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_loads_peft_adapters_with_equal_outputs(tmp_path, topk):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=topk, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    ids = inputs()
    reference = logits(peft_load(base, folder), ids)
    assert not torch.allclose(reference, logits(base, ids), atol=1e-3)  # the adapter matters
    assert torch.allclose(logits(ours, ids), reference, atol=ATOL)


def test_loads_packed_adapters(tmp_path):
    """The format layer's packed form (bit-packed indices) loads like the top-k file it came from."""
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules=["q_proj", "v_proj"])
    convert(folder, tmp_path / "packed", to="packed")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "packed")
    assert ours.storage_form["default"] is StorageForm.PACKED
    ids = inputs()
    assert torch.allclose(logits(ours, ids), logits(peft_load(base, folder), ids), atol=ATOL)


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_saved_here_loads_in_peft(tmp_path, topk):
    """Our files have PEFT's exact keys, dtypes and shapes, and PEFT gets the same outputs from them."""
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=False, target_modules=["q_proj", "up_proj"])
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    ours.save_pretrained(tmp_path / "ours", save_only_topk_weights=topk)
    theirs = peft_load(base, folder)
    theirs.peft_config["default"].save_only_topk_weights = topk
    theirs.save_pretrained(tmp_path / "theirs")
    assert _specs(tmp_path / "ours") == _specs(tmp_path / "theirs")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["save_only_topk_weights"] is topk and config["inference_mode"] is True
    ids = inputs()
    assert torch.allclose(logits(peft_load(base, tmp_path / "ours"), ids), logits(ours, ids), atol=ATOL)


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_merged_weights_match_peft(tmp_path, topk):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=topk, target_modules=["k_proj", "o_proj", "gate_proj"])
    merged_theirs = peft_load(base, folder).merge_and_unload()
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    merged_ours = ours.merge_and_unload()
    assert type(merged_ours) is type(base)
    theirs_state, ours_state = merged_theirs.state_dict(), merged_ours.state_dict()
    assert theirs_state.keys() == ours_state.keys()
    for key, value in theirs_state.items():
        assert torch.allclose(ours_state[key], value, atol=1e-6), key


def test_two_adapters_switch_like_peft(tmp_path):
    base = tiny_llama()
    first, _ = peft_adapter(tmp_path, base, topk=False, seed=3, name="a", target_modules=["q_proj", "v_proj"])
    second, _ = peft_adapter(tmp_path, base, topk=True, seed=4, name="b", target_modules=["v_proj", "o_proj"])
    theirs = peft_load(base, first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(second, adapter_name="other")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), first)
    ours.load_adapter(second, "other")
    ids = inputs()
    assert ours.active_adapter == "default"
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)
    theirs.set_adapter("other"), ours.set_adapter("other")
    assert ours.active_adapters == ["other"]
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)
    with ours.disable_adapter():
        assert torch.allclose(logits(ours, ids), logits(base, ids), atol=ATOL)
    theirs.set_adapter("default"), ours.set_adapter("default")
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)
    ours.delete_adapter("other")
    assert (
        sorted(ours.peft_config) == ["default"]
        and "model.layers.0.self_attn.o_proj" not in ours.targeted_module_names
    )
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)


def test_saves_every_adapter_in_peft_layout(tmp_path):
    base = tiny_llama()
    first, _ = peft_adapter(tmp_path, base, topk=False, seed=3, name="a", target_modules=["q_proj"])
    second, _ = peft_adapter(tmp_path, base, topk=True, seed=4, name="b", target_modules=["v_proj"])
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), first)
    ours.load_adapter(second, "other")
    ours.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "adapter_model.safetensors").is_file()
    theirs = peft_load(base, tmp_path / "both" / "other", adapter_name="other")
    ours.set_adapter("other")
    ids = inputs()
    assert torch.allclose(logits(theirs, ids), logits(ours, ids), atol=ATOL)


def test_training_steps_match_peft():
    """The same SGD steps from the same init give the same model: gradients flow like PEFT's."""
    theirs, ours = twins(tiny_llama(), target_modules=["q_proj", "v_proj"], vblora_dropout=0.0)
    ids = inputs(batch=4)
    for model in (theirs, ours):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1.0)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-4)


def test_conv1d_model_matches_peft(tmp_path):
    """GPT-2's Conv1D: fan_in_fan_out is corrected with a warning, outputs and merges match PEFT."""
    base = tiny_gpt2()
    with pytest.warns(UserWarning, match="Conv1D"):
        VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**BASE_KWARGS, target_modules=["c_attn"]))
    folder, _ = peft_adapter(
        tmp_path, base, topk=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    theirs = peft_load(base, folder)
    ids = inputs()
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=ATOL)
    merged = ours.merge_and_unload().state_dict()
    for key, value in theirs.merge_and_unload().state_dict().items():
        assert torch.allclose(merged[key], value, atol=1e-6), key


def test_modules_to_save_matches_by_plain_suffix_like_peft():
    """PEFT's fixture adapter with modules_to_save=["norm"] (which PEFT applies to every *norm, not
    just ``model.norm``) loads here with PEFT's outputs."""
    from conftest import EVAL_IDS, MULTI_FIXTURE, load_peft
    from conftest import tiny_llama as fixture_llama

    folder = MULTI_FIXTURE / "second"
    ours = VBLoRAModel.from_pretrained(fixture_llama(), folder)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=EVAL_IDS).logits, load_peft(folder)(input_ids=EVAL_IDS).logits
        )
