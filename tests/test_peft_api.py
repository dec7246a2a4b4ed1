"""What a PEFT user reaches for on ``VBLoRAModel``, each against the real PEFT doing the same."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import yaml
from conftest_engine import BASE_KWARGS, inputs, logits, peft_load, tiny_llama, twins
from safetensors.torch import load_file, save_file

from vblora_store import convert
from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import AdapterStateError, InvalidAdapterError

TARGETS = ["q_proj", "v_proj"]


def peft_model(base, seed: int = 3, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**{**BASE_KWARGS, **config}))


def front_matter(path) -> dict:
    text = path.read_text()
    return yaml.safe_load(text.split("---")[1])


# -- the model's layers, as PEFT spells them ----------------------------------------------------


def test_base_model_spelling_and_state_dict_keys_are_peft_s():
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    assert ours.base_model.model is ours.get_base_model() is ours.model
    assert (
        type(ours.base_model.model).__name__ == type(theirs.base_model.model).__name__ == "LlamaForCausalLM"
    )
    # PEFT also registers the shared bank in every layer; the engine keeps it once, on the tuner.
    theirs_keys = {
        k
        for k in theirs.state_dict()
        if not k.startswith("base_model.model.") or "vblora_vector_bank" not in k
    }
    assert {k for k in ours.state_dict() if "factor_" not in k} == theirs_keys
    assert ours.config.hidden_size == 64  # the wrapped model's attributes still come through


def test_peft_config_active_peft_config_and_modules_to_save():
    base = tiny_llama(classifier=True)
    theirs, ours = twins(base, target_modules=TARGETS, task_type="SEQ_CLS", modules_to_save=["norm"])
    assert ours.active_peft_config.r == theirs.active_peft_config.r == BASE_KWARGS["r"]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]
    assert ours.modules_to_save == theirs.modules_to_save == {"norm", "classifier", "score"}


def test_set_requires_grad_matches_peft():
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    config = {**BASE_KWARGS, "target_modules": ["o_proj"]}
    theirs.add_adapter("other", peft.VBLoRAConfig(**config))
    ours.add_adapter("other", VBLoRAConfig(**config))
    for names, flag in ((["other"], True), ("default", False), (["default", "other"], True)):
        theirs.set_requires_grad(names, flag)
        ours.set_requires_grad(names, flag)
        assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0], (names, flag)
    with pytest.raises(AdapterStateError, match="Adapter x does not exist"):
        ours.set_requires_grad("x")


def test_enable_and_disable_adapter_layers_match_peft():
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    theirs.eval(), ours.eval()
    ids = inputs()
    for action in ("disable_adapter_layers", "enable_adapter_layers"):
        getattr(theirs, action)()
        getattr(ours, action)()
        assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5), action


def test_layer_and_model_status_match_peft():
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    config = {**BASE_KWARGS, "target_modules": TARGETS}
    theirs.add_adapter("other", peft.VBLoRAConfig(**config))
    ours.add_adapter("other", VBLoRAConfig(**config))
    theirs.merge_adapter(), ours.merge_adapter()
    fields = (
        "name",
        "enabled",
        "active_adapters",
        "merged_adapters",
        "requires_grad",
        "available_adapters",
        "devices",
    )
    for mine, peft_s in zip(ours.get_layer_status(), theirs.get_layer_status(), strict=True):
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(peft_s, f) for f in fields}
    model_fields = fields[1:] + ("base_model_type", "peft_types", "trainable_params", "num_adapter_layers")
    mine, peft_s = ours.get_model_status(), theirs.get_model_status()
    for field in model_fields:
        if field != "name":
            assert getattr(mine, field) == getattr(peft_s, field), field
    ours.add_adapter("third", VBLoRAConfig(**{**BASE_KWARGS, "target_modules": ["q_proj"]}))
    v_proj = next(status for status in ours.get_layer_status() if status.name.endswith("v_proj"))
    assert v_proj.available_adapters == ["default", "other"]  # PEFT lists "third" too: its shared bank dict


# -- merging --------------------------------------------------------------------------------------------


def test_merge_named_adapters_matches_peft():
    base = tiny_llama()
    theirs, ours = twins(base, target_modules=TARGETS)
    config = {**BASE_KWARGS, "target_modules": ["q_proj", "o_proj"], "init_vector_bank_bound": 0.3}
    torch.manual_seed(11)
    theirs.add_adapter("other", peft.VBLoRAConfig(**config))
    torch.manual_seed(11)
    ours.add_adapter("other", VBLoRAConfig(**config))
    theirs.merge_adapter(adapter_names=["default", "other"])
    ours.merge_adapter(adapter_names=["default", "other"])
    ids = inputs()
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)
    theirs.unmerge_adapter(), ours.unmerge_adapter()
    merged_theirs = theirs.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["other"])
    merged_ours = ours.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["other"])
    assert type(merged_ours) is type(merged_theirs)
    for key, value in merged_theirs.state_dict().items():
        assert torch.allclose(merged_ours.state_dict()[key], value, atol=1e-5), key
    with pytest.raises(AdapterStateError, match="Adapter nope does not exist"):
        twins(base, target_modules=TARGETS)[1].merge_and_unload(adapter_names=["nope"])


# -- saving ------------------------------------------------------------------------------------------


def test_saved_config_card_and_bin_are_peft_s(tmp_path):
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=False)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    configs = [json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("ours", "theirs")]
    for config in configs:  # PEFT writes a set in whatever order it iterates; vblora_store sorts it
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    assert (tmp_path / "ours" / "adapter_model.bin").is_file()
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()
    mine = torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True)
    peft_s = torch.load(tmp_path / "theirs" / "adapter_model.bin", weights_only=True)
    assert mine.keys() == peft_s.keys() and all(torch.equal(mine[k], peft_s[k]) for k in mine)
    assert front_matter(tmp_path / "ours" / "README.md") == front_matter(tmp_path / "theirs" / "README.md")
    assert torch.allclose(
        logits(peft_load(tiny_llama(), tmp_path / "ours"), inputs()),
        logits(theirs.eval(), inputs()),
        atol=1e-5,
    )


def test_not_the_main_process_writes_nothing(tmp_path):
    _, ours = twins(tiny_llama(), target_modules=TARGETS)
    ours.save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(AdapterStateError, match="Adapter x does not exist"):
        ours.save_pretrained(tmp_path / "out", selected_adapters=["x"])


def test_selected_adapters_save_like_peft(tmp_path):
    theirs, ours = twins(tiny_llama(), target_modules=TARGETS)
    for model, cls in ((theirs, peft.VBLoRAConfig), (ours, VBLoRAConfig)):
        for name in ("b", "c"):
            model.add_adapter(name, cls(**{**BASE_KWARGS, "target_modules": ["k_proj"]}))
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["b", "default"])
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["b", "default"])
    layout = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert layout(tmp_path / "ours") == layout(tmp_path / "theirs")


@pytest.mark.parametrize("form", ["full", "topk", "packed"])
def test_adapters_saved_with_embedding_layers_load(tmp_path, form):
    """PEFT's save_embedding_layers=True writes embed_tokens and lm_head into the adapter: they load."""
    base = tiny_llama()
    theirs = peft_model(base, target_modules=TARGETS, save_only_topk_weights=form != "full")
    with torch.no_grad():  # embeddings changed in training, as when the vocabulary was resized
        theirs.base_model.model.model.embed_tokens.weight.normal_()
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.embed_tokens.weight" in keys
    folder = tmp_path / "peft"
    if form == "packed":
        convert(folder, tmp_path / "packed", to="packed")
        folder = tmp_path / "packed"
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    assert torch.allclose(
        logits(ours, inputs()), logits(peft_load(base, tmp_path / "peft"), inputs()), atol=1e-5
    )
    ours.save_pretrained(tmp_path / "again", save_embedding_layers=True)
    assert load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys() == keys


def test_a_damaged_bank_is_refused_by_the_engine(tmp_path):
    base = tiny_llama()
    peft_model(base, target_modules=TARGETS, save_only_topk_weights=True).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vblora_vector_bank"][3, 5] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match="vblora_vector_bank.*NaN"):
        VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")


# -- loading ------------------------------------------------------------------------------------------


def test_from_pretrained_config_autocast_and_torch_device(tmp_path):
    base = tiny_llama()
    theirs = peft_model(base, target_modules=TARGETS, save_only_topk_weights=True)
    theirs.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ours = VBLoRAModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "a", config=theirs.peft_config["default"]
    )
    assert ours.vblora_vector_bank["default"].dtype == torch.float32  # autocast_adapter_dtype=True
    assert ours.vblora_topk["default"].weights.dtype == torch.float32
    # PEFT cannot load a bf16 top-k file (its scatter of the logits fails): give it the same values in fp32.
    (tmp_path / "a32").mkdir()
    (tmp_path / "a32" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text()
    )
    widened = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(widened, str(tmp_path / "a32" / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert torch.allclose(
        logits(ours, inputs()), logits(peft_load(base, tmp_path / "a32"), inputs()), atol=1e-5
    )
    ours.load_adapter(tmp_path / "a", "again", torch_device="cpu")
    assert ours.vblora_topk["again"].indices.device.type == "cpu"
    with pytest.raises(ValueError, match="torch_device='no-such-device' is not a device"):
        ours.load_adapter(tmp_path / "a", "bad", torch_device="no-such-device")
    wrong = VBLoRAConfig(**{**BASE_KWARGS, "num_vectors": 31, "target_modules": TARGETS})
    with pytest.raises(InvalidAdapterError, match="num_vectors=31"):
        VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", config=wrong)


@pytest.mark.parametrize(
    "model_dtype, file_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_gives_peft_s_dtypes(tmp_path, model_dtype, file_dtype, autocast):
    """On, half precision is widened to float32; off, the adapter takes its layer's dtype: as PEFT does."""
    peft_model(tiny_llama(), target_modules=TARGETS).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.to(file_dtype) for k, v in load_file(str(weights)).items()}, str(weights))
    base = tiny_llama(dtype=model_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), tmp_path / "a", autocast_adapter_dtype=autocast
        )
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", autocast_adapter_dtype=autocast)
    layer = "model.layers.0.self_attn.q_proj"
    for model in (theirs, ours):
        model.dtypes = (
            model.base_model.vblora_vector_bank["default"].dtype,
            model.base_model.model.get_submodule(layer).vblora_logits_A["default"].dtype,
        )
    assert ours.dtypes == theirs.dtypes


def test_torch_device_reads_there_but_the_adapter_stays_beside_its_layer(tmp_path):
    """PEFT's ``torch_device`` is where the file is read to: a ``"meta"`` read still gives a real adapter."""
    base = tiny_llama()
    peft_model(base, target_modules=TARGETS, save_only_topk_weights=True).save_pretrained(tmp_path / "a")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", torch_device="meta")
    assert ours.vblora_vector_bank["default"].device.type == "cpu"
    assert torch.allclose(logits(ours, inputs()), logits(peft_load(base, tmp_path / "a"), inputs()), atol=1e-5)


def test_safe_merge_of_a_broken_adapter_raises_value_error_like_peft(tmp_path):
    from vblora_store.errors import UnsafeMergeError

    base = tiny_llama()
    peft_model(base, target_modules=TARGETS).save_pretrained(tmp_path / "a")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        ours.vblora_vector_bank["default"].fill_(float("inf"))
    before = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN or infinite") as raised:
        ours.merge_and_unload(safe_merge=True)
    assert isinstance(raised.value, UnsafeMergeError)
    assert torch.equal(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
