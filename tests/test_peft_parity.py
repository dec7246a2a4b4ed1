"""PEFT's API where PEFT's own test suite found gaps: each behaviour checked against PEFT 0.21.2 itself.

Several active adapters, ``disable_adapter``'s restored state, ``inference_mode``,
``autocast_adapter_dtype``, PEFT's exception types, ``PeftType``, ``task_type``,
``gradient_checkpointing_enable``, the merge warning, ``device_map`` and the
reserved adapter name.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest_engine import BASE_KWARGS, inputs, logits, tiny_llama, twins
from torch import nn

from vblora_store import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import AdapterNameError

ATOL = 1e-5
SMALL = dict(target_modules=["lin0"], vector_length=2, num_vectors=5)


class MLP(nn.Module):
    """The two-layer model of the issue."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def mlp_twins(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """PEFT's and ours on the same MLP, same seed; ``kwargs`` go to both constructors."""
    torch.manual_seed(seed)
    base = MLP().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed + 1)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**SMALL), **kwargs)
        torch.manual_seed(seed + 1)
        ours = VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**SMALL), **kwargs)
    return theirs, ours


def same_names(names) -> list[str]:
    """Names with the bank under one key: PEFT registers it under its first layer, ours on the tuner."""
    return sorted("vblora_vector_bank." + n.split("vblora_vector_bank.")[1] if "vblora_vector_bank." in n else n
                  for n in names)  # fmt: skip


def trainable(model) -> list[str]:
    return same_names(n for n, p in model.named_parameters() if p.requires_grad)


def adapter_grads(model) -> list[str]:
    """Names of the logits tensors that got a gradient."""
    return sorted(n for n, p in model.named_parameters() if "logits" in n and p.grad is not None)


def with_b(seed: int = 7):
    """Llama twins with a second adapter "b" on both, drawn from the same seed."""
    theirs, ours = twins(tiny_llama(), target_modules=["q_proj", "v_proj"])
    for model, cls in ((theirs, peft.VBLoRAConfig), (ours, VBLoRAConfig)):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("b", cls(**{**BASE_KWARGS, "target_modules": ["q_proj", "v_proj"]}))
    return theirs, ours


# -- several active adapters -----------------------------------------------------------------------


def test_two_active_adapters_add_up_in_inference_as_in_peft():
    theirs, ours = with_b()
    single = logits(ours, inputs())
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == theirs.active_adapters == ["default", "b"]
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default", "b"]
    both = logits(ours, inputs())
    assert torch.allclose(both, logits(theirs, inputs()), atol=ATOL)
    assert not torch.allclose(both, single, atol=1e-3)
    assert ours.get_model_status().active_adapters == ["default", "b"]
    ours.set_adapter("default")
    ours.set_adapter(["default", "b"])  # the model's set_adapter takes a list too
    assert ours.active_adapters == ["default", "b"] and torch.equal(logits(ours, inputs()), both)


def test_two_active_adapters_both_train_as_in_peft():
    theirs, ours = with_b()
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
        model.train()
        model(input_ids=inputs()).logits.square().mean().backward()
    assert trainable(ours) and {n.rpartition(".")[2] for n in trainable(ours)} == {"default", "b"}
    assert adapter_grads(ours) == adapter_grads(theirs)
    for name, param in ours.named_parameters():
        if "logits" in name:
            assert torch.allclose(param.grad, dict(theirs.named_parameters())[name].grad, atol=1e-5), name


def test_mixed_batches_and_merging_still_work_with_two_active():
    _, ours = with_b()
    ours.base_model.set_adapter(["default", "b"])
    both = logits(ours, inputs())
    with torch.no_grad():
        mixed = ours(input_ids=inputs(), adapter_names=["b", "__base__"]).logits
    assert ours.active_adapters == ["default", "b"]
    ours.set_adapter("b")
    assert torch.allclose(mixed[0], logits(ours, inputs())[0], atol=ATOL)
    ours.base_model.set_adapter(["default", "b"])
    ours.merge_adapter()
    assert torch.allclose(logits(ours, inputs()), both, atol=ATOL)
    ours.unmerge_adapter()
    assert torch.allclose(ours.merge_and_unload()(input_ids=inputs()).logits.detach(), both, atol=ATOL)


def test_deleting_one_of_two_active_leaves_the_other_active_as_in_peft():
    theirs, ours = with_b()
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
        model.delete_adapter("default")
    assert ours.active_adapters == theirs.active_adapters == ["b"]
    assert torch.allclose(logits(ours, inputs()), logits(theirs, inputs()), atol=ATOL)


# -- disable_adapter -------------------------------------------------------------------------------------


def test_disable_adapter_freezes_inside_and_restores_after():
    theirs, ours = mlp_twins()
    before = trainable(ours)
    assert before == trainable(theirs) and len(before) == 3
    for model in (theirs, ours):
        with model.disable_adapter():
            assert trainable(model) == []
    assert trainable(ours) == before
    ours.set_requires_grad("default", False)  # a frozen adapter stays frozen after the block
    with ours.disable_adapter():
        pass
    assert trainable(ours) == []


def test_disable_adapter_keeps_disabled_layers_disabled_as_in_peft():
    x = torch.randn(4, 10)
    for model in mlp_twins():
        model.disable_adapter_layers()
        with model.disable_adapter():
            pass
        assert model.get_model_status().enabled is False
        assert torch.equal(model(x), model.get_base_model()(x))
        model.enable_adapter_layers()
        assert model.get_model_status().enabled is True


# -- inference_mode -------------------------------------------------------------------------------------


def test_a_fresh_adapter_in_inference_mode_is_frozen_as_in_peft():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(MLP(), peft.VBLoRAConfig(**SMALL, inference_mode=True))
    ours = VBLoRAModel(MLP(), VBLoRAConfig(**SMALL, inference_mode=True))
    assert trainable(ours) == trainable(theirs) == []


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_keeps_the_given_config_and_sets_inference_mode(tmp_path, is_trainable):
    _, ours = mlp_twins()
    ours.save_pretrained(tmp_path)
    config = VBLoRAConfig(**SMALL, inference_mode=is_trainable)  # the opposite of what loading sets
    loaded = VBLoRAModel.from_pretrained(MLP(), tmp_path, config=config, is_trainable=is_trainable)
    assert loaded.peft_config["default"] is config
    assert config.inference_mode is (not is_trainable)
    assert bool(trainable(loaded)) is is_trainable
    saved = VBLoRAModel.from_pretrained(MLP(), tmp_path, is_trainable=is_trainable)
    assert saved.peft_config["default"].inference_mode is (not is_trainable)


# -- autocast_adapter_dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [True, False])
def test_the_constructor_takes_autocast_adapter_dtype_as_peft(autocast):
    theirs, ours = mlp_twins(dtype=torch.float16, autocast_adapter_dtype=autocast)
    dtypes = {same_names([n])[0]: p.dtype for n, p in ours.named_parameters() if "vblora" in n}
    assert set(dtypes.values()) == {torch.float32 if autocast else torch.float16}
    assert dtypes == {same_names([n])[0]: p.dtype for n, p in theirs.named_parameters() if "vblora" in n}


def test_add_adapter_takes_peft_s_keywords():
    theirs, ours = mlp_twins(dtype=torch.float16, autocast_adapter_dtype=False)
    for model, cls in ((theirs, peft.VBLoRAConfig), (ours, VBLoRAConfig)):
        model.add_adapter(adapter_name="o", peft_config=cls(**SMALL), autocast_adapter_dtype=True)
        model.add_adapter("h", cls(**SMALL), False, False)  # low_cpu_mem_usage, autocast_adapter_dtype
    bank = ours.base_model.vblora_vector_bank
    assert (bank["default"].dtype, bank["o"].dtype, bank["h"].dtype) == (torch.float16, torch.float32, torch.float16)
    assert theirs.base_model.model.lin0.vblora_logits_A["o"].dtype == torch.float32


# -- errors, types and small calls ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.delete_adapter("nope"),
        lambda m: m.set_adapter("nope"),
        lambda m: (m.merge_adapter(), m.delete_adapter("default")),
    ],
    ids=["delete-unknown", "set-unknown", "delete-merged"],
)
def test_peft_s_value_errors(call):
    for model in mlp_twins():
        with pytest.raises(ValueError):
            call(model)


def test_an_unknown_name_in_a_list_is_refused_too():
    _, ours = mlp_twins()  # PEFT takes it silently; nothing runs it
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        ours.base_model.set_adapter(["default", "nope"])
    assert ours.active_adapters == ["default"]


def test_peft_type_is_peft_s_enum_and_writes_the_same_json(tmp_path):
    config = VBLoRAConfig(**SMALL)
    assert config.peft_type.value == "VBLORA"
    assert config.peft_type == peft.PeftType.VBLORA and config.peft_type == "VBLORA"
    _, ours = mlp_twins()
    assert ours.peft_config["default"].peft_type == peft.PeftType.VBLORA
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VBLORA"
    assert VBLoRAConfig.from_pretrained(tmp_path).peft_type.value == "VBLORA"


def test_task_type_is_validated_as_peft():
    for cls in (peft.VBLoRAConfig, VBLoRAConfig):
        with pytest.raises(ValueError):
            cls(task_type="invalid-task-type")
    assert VBLoRAConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    assert VBLoRAConfig(task_type="SEQ_CLS").to_dict()["task_type"] == "SEQ_CLS"


def test_gradient_checkpointing_enable_takes_its_kwargs_positionally():
    _, ours = twins(tiny_llama(), target_modules=["q_proj", "v_proj"])
    ours.gradient_checkpointing_enable({"use_reentrant": False})
    assert ours.get_base_model().is_gradient_checkpointing
    ours.train()
    ours(input_ids=inputs()).logits.square().mean().backward()
    assert adapter_grads(ours)


def test_a_second_merge_warns_as_peft():
    for model in mlp_twins():
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged"):
            model.merge_adapter()


def test_device_map_is_taken_when_the_model_follows_it_and_refused_otherwise(tmp_path):
    torch.manual_seed(0)
    base = MLP()
    ours = VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**SMALL))
    ours.save_pretrained(tmp_path)
    x = torch.randn(3, 10)
    loaded = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path, device_map={"": "cpu"})
    assert torch.allclose(loaded(x), ours(x), atol=ATOL)
    assert not torch.allclose(loaded(x), base(x), atol=1e-4)
    for device_map, message in [
        ("auto", "never dispatches"),
        ({"": "meta"}, "tensors are on cpu"),
        ({"lin9": "cpu"}, "no module"),
    ]:
        with pytest.raises(ValueError, match=message):
            VBLoRAModel.from_pretrained(MLP(), tmp_path, device_map=device_map)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: VBLoRAModel(MLP(), VBLoRAConfig(**SMALL), adapter_name="__base__"),
        lambda d: VBLoRAModel.from_pretrained(MLP(), d, adapter_name="__base__"),
        lambda d: VBLoRAModel(MLP(), VBLoRAConfig(**SMALL)).add_adapter("__base__", VBLoRAConfig(**SMALL)),
        lambda d: VBLoRAModel(MLP(), VBLoRAConfig(**SMALL)).load_adapter(d, adapter_name="__base__"),
    ],
    ids=["constructor", "from_pretrained", "add_adapter", "load_adapter"],
)
def test_the_reserved_name_is_refused_wherever_an_adapter_is_named(tmp_path, call):
    VBLoRAModel(MLP(), VBLoRAConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(AdapterNameError, match="'__base__' is reserved"):
        call(tmp_path)


def test_two_active_adapters_with_their_own_head_copies_are_refused_as_in_peft():
    theirs, ours = twins(tiny_llama(classifier=True), target_modules=["q_proj"], task_type="SEQ_CLS")
    for model, cls in ((theirs, peft.VBLoRAConfig), (ours, VBLoRAConfig)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("b", cls(**{**BASE_KWARGS, "target_modules": ["q_proj"], "task_type": "SEQ_CLS"}))
        with pytest.raises(ValueError):
            model.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default"] and trainable(ours)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=inputs()).logits, theirs(input_ids=inputs()).logits, atol=ATOL)


def test_active_adapter_with_several_active_is_peft_s():
    theirs, ours = with_b()
    for model in (theirs, ours):
        model.base_model.set_adapter(["b", "default"])
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["b", "default"]
    for model in (theirs, ours):
        model.set_adapter("b")
    assert ours.active_adapter == theirs.active_adapter == "b"
    assert ours.active_peft_config is ours.peft_config["b"]
