"""``export-lora``: PEFT loads the LoRA adapter and gives the VB-LoRA adapter's outputs, from every form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (
    MULTI_FIXTURE,
    SINGLE_FIXTURE,
    leftovers,
    logits_of,
    peft_logits,
    run_cli,
    snapshot,
    tiny_llama,
)
from vblora_store import convert, read_adapters
from vblora_store.export import lora_key

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ATOL = 1e-5


def load_lora(folder: Path, base=None, *, adapter_name: str = "default"):
    """``PeftModel.from_pretrained`` of a LoRA folder, on a fresh tiny Llama unless ``base`` is given."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base or tiny_llama(), str(folder), adapter_name=adapter_name).eval()


# -- a tiny GPT-2: Conv1D weights stored (in, out), so fan_in_fan_out ----------------------------


def tiny_gpt2(seed: int = 0):
    """A 2-layer ``GPT2LMHeadModel`` with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def make_gpt2_adapter(folder: Path) -> Path:
    """A VB-LoRA adapter on every GPT-2 Conv1D, fan_in_fan_out, with trained biases, saved by PEFT."""
    from peft import VBLoRAConfig, get_peft_model

    config = VBLoRAConfig(
        r=4,
        num_vectors=32,
        vector_length=16,
        topk=2,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        bias="vblora_only",
        init_vector_bank_bound=0.3,
    )
    model = get_peft_model(tiny_gpt2(), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("base_layer.bias"):
                param.add_(torch.randn_like(param))  # a "trained" bias, far from the base's
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory) -> Path:
    return make_gpt2_adapter(tmp_path_factory.mktemp("gpt2") / "vblora")


# -- single adapter, every form -------------------------------------------------------------


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, Path]:
    """The committed full-form fixture and its top-k and packed conversions."""
    root = tmp_path_factory.mktemp("forms")
    out = {"full": SINGLE_FIXTURE}
    for form in ("topk", "packed"):
        convert(SINGLE_FIXTURE, root / form, to=form)
        out[form] = root / form
    return out


@pytest.fixture(scope="module")
def vblora_logits() -> torch.Tensor:
    return peft_logits(SINGLE_FIXTURE)


@pytest.mark.parametrize("form", ["full", "topk", "packed"])
def test_peft_loads_the_export_with_the_vblora_outputs(forms, vblora_logits, form, tmp_path):
    result = run_cli("export-lora", forms[form], tmp_path / "lora")
    assert result.exit_code == 0, result.output
    lora = logits_of(load_lora(tmp_path / "lora"))
    torch.testing.assert_close(lora, vblora_logits, atol=ATOL, rtol=0)
    assert (vblora_logits - logits_of(tiny_llama())).abs().max() > 0.1  # the adapter does change the outputs


def test_export_is_a_plain_lora_of_the_same_rank(tmp_path):
    from peft import LoraConfig

    run_cli("export-lora", SINGLE_FIXTURE, tmp_path / "lora")
    (adapter,) = read_adapters(SINGLE_FIXTURE)
    config = json.loads((tmp_path / "lora" / CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    assert config["target_modules"] == sorted(adapter.modules)
    assert isinstance(LoraConfig.from_pretrained(str(tmp_path / "lora")), LoraConfig)
    tensors = load_file(str(tmp_path / "lora" / WEIGHTS))
    expected = {}
    for module, shape in adapter.modules.items():
        expected[lora_key(module, "A")] = (4, shape.in_features)
        expected[lora_key(module, "B")] = (shape.out_features, 4)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_multi_adapter_folder_keeps_its_layout_and_modules_to_save(tmp_path):
    from peft import PeftModel

    result = run_cli("export-lora", MULTI_FIXTURE, tmp_path / "lora")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path / "lora").as_posix() for p in (tmp_path / "lora").rglob("*")) == [
        CONFIG,
        WEIGHTS,
        "second",
        f"second/{CONFIG}",
        f"second/{WEIGHTS}",
    ]
    second = json.loads((tmp_path / "lora" / "second" / CONFIG).read_text())
    assert second["modules_to_save"] == ["norm"]
    carried = load_file(str(MULTI_FIXTURE / "second" / WEIGHTS))
    exported = load_file(str(tmp_path / "lora" / "second" / WEIGHTS))
    for key in (k for k in carried if "vblora" not in k):
        assert torch.equal(exported[key], carried[key])
    for name in ("default", "second"):
        folder = MULTI_FIXTURE if name == "default" else MULTI_FIXTURE / name
        vblora = PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name=name).eval()
        lora_folder = tmp_path / "lora" if name == "default" else tmp_path / "lora" / name
        torch.testing.assert_close(
            logits_of(load_lora(lora_folder, adapter_name=name)), logits_of(vblora), atol=ATOL, rtol=0
        )


def test_gpt2_conv1d_fan_in_fan_out_and_trained_biases(gpt2_adapter, tmp_path):
    from peft import PeftModel

    result = run_cli("export-lora", gpt2_adapter, tmp_path / "lora")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lora" / CONFIG).read_text())
    assert (config["fan_in_fan_out"], config["bias"]) == (True, "lora_only")
    vblora = logits_of(PeftModel.from_pretrained(tiny_gpt2(), str(gpt2_adapter)).eval())
    torch.testing.assert_close(
        logits_of(load_lora(tmp_path / "lora", tiny_gpt2())), vblora, atol=ATOL, rtol=0
    )
    merged = logits_of(
        load_lora(tmp_path / "lora", tiny_gpt2()).merge_and_unload()
    )  # PEFT's LoRA merge agrees
    torch.testing.assert_close(merged, vblora, atol=ATOL, rtol=0)
    assert (vblora - logits_of(tiny_gpt2())).abs().max() > 0.1


# -- bad input: exit 2, one line, nothing written ----------------------------------------------


def test_bad_inputs_exit_2_and_write_nothing(single_copy, tmp_path):
    missing = run_cli("export-lora", tmp_path / "nowhere", tmp_path / "out")
    assert missing.exit_code == 2 and "nowhere" in missing.stderr
    run_cli("export-lora", single_copy, tmp_path / "lora")
    not_vblora = run_cli("export-lora", tmp_path / "lora", tmp_path / "out")
    assert not_vblora.exit_code == 2 and "peft_type" in not_vblora.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    before = snapshot(tmp_path / "lora")
    exists = run_cli("export-lora", single_copy, tmp_path / "lora")
    assert exists.exit_code == 2 and "--force" in exists.stderr
    assert snapshot(tmp_path / "lora") == before


def test_nan_logits_are_refused_before_writing(single_copy, tmp_path):
    tensors = load_file(str(single_copy / WEIGHTS))
    key = next(k for k in tensors if k.endswith("vblora_logits_A"))
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, str(single_copy / WEIGHTS), metadata={"format": "pt"})
    result = run_cli("export-lora", single_copy, tmp_path / "out")
    assert result.exit_code == 2 and key in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("form", ["full", "topk", "packed"])
def test_composing_modules_of_one_shape_together_gives_the_same_factors_bit_for_bit(multi_copy, tmp_path, form):
    """export-lora (and the vLLM plugin) compose a group of modules at once; module by module is the reference."""
    from vblora_store.factors import module_factors

    folder = multi_copy if form == "full" else tmp_path / form
    if form != "full":
        convert(multi_copy, folder, to=form)
    for adapter in read_adapters(folder):  # k=2 and k=3 (the second adapter)
        one = list(module_factors(adapter, dtype=torch.float32))
        for group in (2, 64):
            grouped = list(module_factors(adapter, dtype=torch.float32, group=group))
            assert [m for m, _, _ in grouped] == [m for m, _, _ in one]
            for (_, a, b), (_, a1, b1) in zip(grouped, one):
                assert torch.equal(a, a1) and torch.equal(b, b1)


def test_composing_two_vectors_gives_torchs_sum_bit_for_bit_signed_zeros_included():
    """k=2 adds the two products instead of summing them: the same bits, even where both are -0."""
    from vblora_store.topk import compose

    bank = torch.tensor([[-0.0, 0.0, -1.0, 2.0, -0.0], [-0.0, -0.0, 1.0, -2.0, 3.0]])
    indices = torch.tensor([[0, 1], [1, 0], [0, 0]])
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]])
    reference = (weights.unsqueeze(-1) * bank[indices]).sum(-2)  # (3, 2, 5) -> (3, 5)
    composed = compose(indices, weights, bank)
    assert torch.equal(composed.view(torch.int32), reference.view(torch.int32))
    assert not torch.signbit(composed[:, 0]).any()  # -0 + -0 summed from +0: +0, as torch's sum gives


@pytest.mark.parametrize("form", ["packed", "compressed"])
def test_a_bad_index_in_the_slot_table_names_its_tensor_as_reading_it_alone_would(multi_copy, tmp_path, form):
    """The slot table is checked at once; a bad value is then found tensor by tensor, for the message."""
    from vblora_store.errors import InvalidAdapterError
    from vblora_store.factors import module_factors
    from vblora_store.format.keys import indices_key

    convert(multi_copy, tmp_path / form, to=form)
    adapter = read_adapters(tmp_path / form)[0]
    config = adapter.config
    length = config.vector_length
    rows = [config.r * (s.in_features + s.out_features) // length for s in adapter.modules.values()]
    module = list(adapter.modules)[1]
    adapter.slots.indices[rows[0] + rows[1] - 1, 0] = config.num_vectors  # module 1's last row: its side B
    with pytest.raises(InvalidAdapterError) as alone:
        adapter.checked_tensor(indices_key(module, "B"))
    with pytest.raises(InvalidAdapterError) as whole:
        list(module_factors(adapter, dtype=torch.float32, group=32))
    assert str(whole.value) == str(alone.value) and indices_key(module, "B") in str(whole.value)
