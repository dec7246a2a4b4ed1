"""``topk=1``: each sub-vector is one bank vector, so the top-k form stores zero weights per slot.

PEFT saves such an adapter with ``(..., 0)`` weight tensors; every reader and
every form must take them (a ``reshape(-1, 0)`` cannot: its ``-1`` is ambiguous).
The adapter here is saved by PEFT itself, in top-k form.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import run_cli
from conftest_engine import BASE_KWARGS, inputs, logits, peft_load, tiny_llama
from safetensors.torch import load_file

from vblora_store import convert, export_lora
from vblora_store.engine import VBLoRAModel

ATOL = 1e-5
FORMS = ["topk", "packed", "compressed", "full"]


@pytest.fixture(scope="module")
def k1(tmp_path_factory):
    """A tiny Llama, PEFT's topk=1 adapter saved in top-k form, the same converted to every form."""
    tmp = tmp_path_factory.mktemp("topk-one")
    base = tiny_llama()
    config = {**BASE_KWARGS, "topk": 1, "target_modules": ["q_proj", "v_proj"], "save_only_topk_weights": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config)).save_pretrained(tmp / "topk")
    for form in FORMS[1:-1]:
        convert(tmp / "topk", tmp / form, to=form)
    # A full form of a top-k=1 adapter: PEFT's own full save of it (its logits -inf but one per slot).
    loaded = peft_load(base, tmp / "topk")
    loaded.peft_config["default"].save_only_topk_weights = False
    loaded.save_pretrained(tmp / "full")
    return base, tmp


def test_peft_stores_zero_weights_per_slot(k1):
    _, tmp = k1
    weights = [t for k, t in load_file(str(tmp / "topk" / "adapter_model.safetensors")).items() if "weights" in k]
    assert weights and all(t.shape[-1] == 0 and t.numel() == 0 for t in weights)


@pytest.mark.parametrize("form", FORMS)
def test_the_engine_loads_every_form_with_peft_s_outputs(k1, form):
    base, tmp = k1
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / form)
    expected = logits(peft_load(base, tmp / "topk"), inputs())
    assert not torch.allclose(expected, logits(base, inputs()), atol=1e-3)  # the adapter does something
    assert torch.allclose(logits(ours, inputs()), expected, atol=ATOL)
    merged = ours.merge_and_unload()
    assert torch.allclose(logits(merged, inputs()), expected, atol=ATOL)


@pytest.mark.parametrize("form", FORMS)
def test_mixed_batches_with_a_topk_one_adapter(k1, form):
    base, tmp = k1
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / form, adapter_name="one")
    ids = inputs(batch=3)
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=["one", "__base__", "one"]).logits
    alone = logits(ours, ids)
    base_alone = logits(base, ids)
    assert torch.allclose(mixed[[0, 2]], alone[[0, 2]], atol=ATOL)
    assert torch.allclose(mixed[1], base_alone[1], atol=ATOL)


@pytest.mark.parametrize("form", FORMS)
def test_export_lora_of_every_form_gives_the_adapter_s_outputs(k1, form, tmp_path):
    base, tmp = k1
    export_lora(tmp / form, tmp_path / "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert torch.allclose(logits(lora, inputs()), logits(peft_load(base, tmp / "topk"), inputs()), atol=ATOL)


@pytest.mark.parametrize("form", FORMS[1:])
def test_verify_and_convert_take_every_form(k1, form, tmp_path):
    _, tmp = k1
    result = run_cli("verify", tmp / "topk", tmp / form)
    assert result.exit_code == 0, result.output
    convert(tmp / form, tmp_path / "back", to="topk")
    ours = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp / "topk" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
