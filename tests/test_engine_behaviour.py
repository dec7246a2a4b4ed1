"""The engine's own guarantees: factor cache, no N-wide work at inference, dtypes, errors, state."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest_engine import BASE_KWARGS, inputs, logits, peft_adapter, peft_load, tiny_gpt2, tiny_llama, twins

from vblora_store.config import VBLoRAConfig
from vblora_store.engine import VBLoRALinear, VBLoRAModel
from vblora_store.errors import (
    AdapterStateError,
    InvalidAdapterError,
    TargetingError,
    UnsupportedConversionError,
)


class RecordOps(TorchDispatchMode):
    """Records every aten op and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


def _count_builds(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = VBLoRALinear.build_factors

    def counting(self, adapter):
        calls.append(self.module_name)
        return original(self, adapter)

    monkeypatch.setattr(VBLoRALinear, "build_factors", counting)
    return calls


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_inference_builds_factors_once_and_never_n_wide(tmp_path, monkeypatch, topk):
    n = 37  # a size no other tensor of the model has
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=topk, num_vectors=n, target_modules=["q_proj", "v_proj"])
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    builds = _count_builds(monkeypatch)
    ids = inputs()
    first = logits(model, ids)
    assert len(builds) == 4  # two layers x (q, v), once each
    with RecordOps() as record, torch.no_grad():
        second = model(input_ids=ids).logits
    assert len(builds) == 4 and torch.equal(first, second)
    assert not [op for op, _ in record.ops if "topk" in op or "softmax" in op]
    assert not [op for op, shapes in record.ops if any(n in s for s in shapes)]


def test_cache_follows_changes_and_training(monkeypatch):
    _, model = twins(tiny_llama(), target_modules=["q_proj"])
    builds = _count_builds(monkeypatch)
    ids = inputs()
    model.eval()
    before = logits(model, ids)
    logits(model, ids)
    assert len(builds) == 2
    with torch.no_grad():
        model.vblora_vector_bank["default"].mul_(2)  # an in-place edit, as an optimizer step makes
    after = logits(model, ids)
    assert len(builds) == 4 and not torch.allclose(before, after)
    model.to(torch.float64)
    logits(model, ids)
    assert len(builds) == 6  # another dtype
    model.train()
    model(input_ids=ids)  # with autograd on and trainable logits: built every time, not cached
    model(input_ids=ids)
    assert len(builds) == 10


def test_topk_adapter_refuses_training(tmp_path):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules=["q_proj"])
    with pytest.raises(AdapterStateError, match="top-k"):
        VBLoRAModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.train()
    with pytest.raises(AdapterStateError, match="cannot be trained"):
        model(input_ids=inputs())
    with pytest.raises(UnsupportedConversionError, match="top-k"):
        model.save_pretrained(tmp_path / "out", save_only_topk_weights=False)
    model.eval()  # a bank that asks for gradients still runs at inference, gradients on
    expected = logits(model, inputs())
    model.vblora_vector_bank["default"].requires_grad_(True)
    assert torch.allclose(model(input_ids=inputs()).logits, expected)


def test_full_adapter_trains_when_asked(tmp_path):
    base = tiny_llama()
    folder, theirs = peft_adapter(tmp_path, base, topk=False, target_modules=["q_proj"])
    model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    model(input_ids=inputs(), labels=inputs()).loss.backward()
    assert model.vblora_vector_bank["default"].grad is not None


def test_targeting_errors_name_the_problem():
    base = tiny_llama()
    with pytest.raises(TargetingError, match=r"q_proj.*not divisible by vector_length=48"):
        VBLoRAModel(
            copy.deepcopy(base),
            VBLoRAConfig(**{**BASE_KWARGS, "vector_length": 48}, target_modules=["q_proj"]),
        )
    with pytest.raises(TargetingError, match="matched no module"):
        VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**BASE_KWARGS, target_modules=["nope"]))
    with pytest.raises(TargetingError, match="every match was excluded"):
        VBLoRAModel(
            copy.deepcopy(base),
            VBLoRAConfig(**BASE_KWARGS, target_modules=["q_proj"], exclude_modules=["q_proj"]),
        )
    with pytest.raises(TargetingError, match="is a LlamaRMSNorm"):
        VBLoRAModel(copy.deepcopy(base), VBLoRAConfig(**BASE_KWARGS, target_modules=["norm"]))
    assert isinstance(
        base.model.layers[0].self_attn.q_proj, torch.nn.Linear
    )  # failed attempts left no wrapper


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    base = tiny_llama(classifier=True)
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules=["q_proj"], task_type="SEQ_CLS")
    _, model = twins(tiny_llama(classifier=True), target_modules=["v_proj"])
    before = {n: type(m) for n, m in model.named_modules()}

    def broken(*args):
        raise InvalidAdapterError("damaged")

    monkeypatch.setattr("vblora_store.engine.injection.load_other_tensors", broken)
    with pytest.raises(InvalidAdapterError):
        model.load_adapter(folder, "other")
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert list(model.peft_config) == ["default"] and list(model.vblora_vector_bank) == ["default"]


def test_adapter_name_errors():
    _, model = twins(tiny_llama(), target_modules=["q_proj"])
    with pytest.raises(AdapterStateError, match="exists"):
        model.add_adapter("default", VBLoRAConfig(**BASE_KWARGS, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="Adapter x does not exist"):
        model.set_adapter("x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_computes_in_fp32_like_peft(tmp_path, dtype):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules=["q_proj", "down_proj"])
    half = tiny_llama(dtype=dtype)
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(half), folder)
    assert ours.vblora_vector_bank["default"].dtype == torch.float32  # adapter tensors stay fp32
    ids = inputs()
    out = logits(ours, ids)
    assert out.dtype == dtype
    reference = logits(VBLoRAModel.from_pretrained(copy.deepcopy(base), folder), ids)
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)
    layer = ours.model.model.layers[0].self_attn.q_proj
    delta = layer.delta_weight("default")
    assert delta.dtype == torch.float32
    expected = (layer.base_layer.weight.float() + delta).to(dtype)  # summed in fp32, rounded once
    merged_ours = ours.merge_and_unload().state_dict()
    assert torch.equal(merged_ours["model.layers.0.self_attn.q_proj.weight"], expected)
    merged_theirs = peft_load(half, folder).merge_and_unload().state_dict()
    for key, value in merged_theirs.items():  # PEFT rebuilds logits as log(weights): last-bit differences
        assert torch.allclose(merged_ours[key], value, atol=1e-3, rtol=1e-3), key


def test_bf16_outputs_are_as_accurate_as_peft(tmp_path):
    """The adapter path runs in the model's dtype; its error against fp32 stays PEFT's (which upcasts)."""
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules="all-linear")
    half = tiny_llama(dtype=torch.bfloat16)
    ids = inputs(length=16)
    reference = logits(VBLoRAModel.from_pretrained(copy.deepcopy(half).float(), folder), ids)
    ours = logits(VBLoRAModel.from_pretrained(copy.deepcopy(half), folder), ids).float()
    theirs = logits(peft_load(half, folder), ids).float()
    error = lambda out: ((out - reference).norm() / reference.norm()).item()  # noqa: E731
    assert error(ours) < 1.5 * error(theirs) + 1e-3


def test_adapter_loaded_under_inference_mode_runs(tmp_path):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=True, target_modules=["q_proj"])
    with torch.inference_mode():
        model = VBLoRAModel.from_pretrained(copy.deepcopy(base), folder)
        first = model(input_ids=inputs()).logits
        assert torch.equal(model(input_ids=inputs()).logits, first)


def test_merge_unmerge_and_disable_restore_the_base():
    _, model = twins(tiny_llama(), target_modules=["q_proj", "o_proj"])
    model.eval()
    ids = inputs()
    with model.disable_adapter():
        base_out = logits(model, ids)
    adapted = logits(model, ids)
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(logits(model, ids), base_out, atol=1e-5)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-5)
    unloaded = model.unload()
    assert not any(isinstance(m, VBLoRALinear) for m in unloaded.modules())
    assert torch.allclose(logits(unloaded, ids), base_out, atol=1e-5)


def test_low_cpu_mem_usage_allocates_nothing_until_loaded(tmp_path):
    base = tiny_llama()
    folder, _ = peft_adapter(tmp_path, base, topk=False, target_modules=["q_proj"])
    model = VBLoRAModel(
        copy.deepcopy(base), VBLoRAConfig(**BASE_KWARGS, target_modules=["q_proj"]), low_cpu_mem_usage=True
    )
    assert model.vblora_vector_bank["default"].is_meta
    model.load_adapter(folder, "default")
    ids = inputs()
    assert torch.allclose(logits(model, ids), logits(peft_load(base, folder), ids), atol=1e-5)


def test_bias_modes_match_peft(tmp_path):
    """On GPT-2 (which has biases) the trainable set and the saved biases are PEFT's."""
    for bias in ("all", "vblora_only"):
        theirs, ours = twins(tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True, bias=bias)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        ours.save_pretrained(tmp_path / bias / "ours")
        theirs.save_pretrained(tmp_path / bias / "theirs")
        from safetensors.torch import load_file

        saved_ours = load_file(str(tmp_path / bias / "ours" / "adapter_model.safetensors"))
        saved_theirs = load_file(str(tmp_path / bias / "theirs" / "adapter_model.safetensors"))
        assert saved_ours.keys() == saved_theirs.keys()


def test_passthrough_of_the_wrapped_model():
    _, model = twins(tiny_llama(), target_modules=["q_proj"])
    assert model.config.hidden_size == 64  # transformers' Trainer reads model.config
    assert model.get_base_model() is model.model
    out = model.generate(inputs(batch=1, length=3), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_works_without_transformers():
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import torch
        from torch import nn
        from vblora_store.config import VBLoRAConfig
        from vblora_store.engine import VBLoRAModel
        net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 32))
        config = VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules="all-linear")
        model = VBLoRAModel(net, config)
        assert model.targeted_module_names == ["0", "2"]
        print(tuple(model(torch.randn(3, 32)).shape))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 32)"
