"""``merge``: transformers loads the merged checkpoint and gives PEFT's ``merge_and_unload()`` outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import (
    EVAL_IDS,
    MULTI_FIXTURE,
    SINGLE_FIXTURE,
    leftovers,
    load_peft,
    logits_of,
    make_fixtures,
    run_cli,
    snapshot,
    tiny_llama,
)
from test_export import make_gpt2_adapter, tiny_gpt2
from vblora_store import convert
from vblora_store.checkpoint import INDEX_FILE, SINGLE_FILE
from vblora_store.merge import resolve_key

ATOL = 1e-5
TOKENIZER_FILE = "tokenizer_config.json"


def save_base(model, folder: Path, **kwargs) -> Path:
    """``save_pretrained`` the base model, plus a tokenizer file that merge must copy."""
    model.save_pretrained(str(folder), **kwargs)
    (folder / TOKENIZER_FILE).write_text('{"model_max_length": 64}\n', encoding="utf-8")
    return folder


def load_merged(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def weights_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama saved by transformers in one file and in several shards."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "single": save_base(tiny_llama(), root / "single"),
        "sharded": save_base(tiny_llama(), root / "sharded", max_shard_size="100KB"),
    }


@pytest.fixture(scope="module")
def reference_logits() -> torch.Tensor:
    return logits_of(load_peft(SINGLE_FIXTURE).merge_and_unload())


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_merged_checkpoint_gives_peft_merge_and_unload_outputs(bases, reference_logits, layout, tmp_path):
    base = bases[layout]
    result = run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    torch.testing.assert_close(logits_of(load_merged(merged)), reference_logits, atol=ATOL, rtol=0)
    assert (reference_logits - logits_of(tiny_llama())).abs().max() > 0.1  # the merge does change the model
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in base.iterdir())
    assert (merged / TOKENIZER_FILE).read_bytes() == (base / TOKENIZER_FILE).read_bytes()
    assert (merged / "config.json").read_bytes() == (base / "config.json").read_bytes()
    if layout == "sharded":
        assert len(list(merged.glob("*.safetensors"))) > 2
        index, base_index = (json.loads((f / INDEX_FILE).read_text()) for f in (merged, base))
        assert index == base_index  # same shards, same keys, same total size (float32 kept)


def test_packed_adapter_merges_like_the_full_one(bases, reference_logits, tmp_path):
    convert(SINGLE_FIXTURE, tmp_path / "packed", to="packed")
    assert run_cli("merge", bases["sharded"], tmp_path / "packed", tmp_path / "merged").exit_code == 0
    torch.testing.assert_close(
        logits_of(load_merged(tmp_path / "merged")), reference_logits, atol=ATOL, rtol=0
    )


def test_modules_to_save_replace_the_base_tensors(bases, tmp_path):
    from peft import PeftModel

    adapter = MULTI_FIXTURE / "second"  # modules_to_save=["norm"]
    result = run_cli("merge", bases["sharded"], adapter, tmp_path / "merged")
    assert result.exit_code == 0 and "replaced 5 tensors" in result.stdout, result.output
    peft = PeftModel.from_pretrained(tiny_llama(), str(adapter), adapter_name="second").eval()
    expected = logits_of(peft.merge_and_unload())
    torch.testing.assert_close(logits_of(load_merged(tmp_path / "merged")), expected, atol=ATOL, rtol=0)


def test_gpt2_conv1d_fan_in_fan_out_and_trained_biases(tmp_path):
    from peft import PeftModel

    adapter = make_gpt2_adapter(tmp_path / "vblora")
    base = save_base(tiny_gpt2(), tmp_path / "gpt2")
    result = run_cli("merge", base, adapter, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    expected = logits_of(PeftModel.from_pretrained(tiny_gpt2(), str(adapter)).eval().merge_and_unload())
    torch.testing.assert_close(logits_of(load_merged(tmp_path / "merged")), expected, atol=ATOL, rtol=0)
    assert (expected - logits_of(tiny_gpt2())).abs().max() > 0.1


def test_bf16_base_is_saved_in_bf16_and_dtype_option_converts(tmp_path):
    base = save_base(tiny_llama().to(torch.bfloat16), tmp_path / "bf16")
    assert run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "auto").exit_code == 0
    assert weights_dtypes(tmp_path / "auto") == {torch.bfloat16}
    # fp32 arithmetic, one rounding: the bf16 weight plus PEFT's ΔW, summed in float32, rounded once
    key = "model.layers.0.self_attn.q_proj.weight"
    delta = (
        load_peft(SINGLE_FIXTURE)
        .base_model.model.model.layers[0]
        .self_attn.q_proj.get_delta_weight("default")
    )
    with safe_open(str(base / SINGLE_FILE), framework="pt") as f:
        expected = (f.get_tensor(key).float() + delta).to(torch.bfloat16)
    with safe_open(str(tmp_path / "auto" / SINGLE_FILE), framework="pt") as f:
        torch.testing.assert_close(
            f.get_tensor(key), expected, atol=0, rtol=2**-7
        )  # at most one bf16 ulp apart

    assert run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "fp32", "--dtype", "float32").exit_code == 0
    assert weights_dtypes(tmp_path / "fp32") == {torch.float32}
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert load_merged(tmp_path / "fp32").dtype == torch.float32


def test_adapter_names_resolve_across_a_model_class_prefix():
    keys = {"model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"}
    assert resolve_key("model.layers.0.mlp.up_proj.weight", keys) == "model.layers.0.mlp.up_proj.weight"
    assert resolve_key("layers.0.mlp.up_proj.weight", keys) == "model.layers.0.mlp.up_proj.weight"
    assert resolve_key("model.model.layers.0.mlp.up_proj.weight", keys) == "model.layers.0.mlp.up_proj.weight"
    assert resolve_key("model.layers.0.mlp.down_proj.weight", keys) is None


def test_base_model_class_checkpoint_merges(tmp_path):
    """An adapter trained on LlamaForCausalLM merges into a checkpoint saved from LlamaModel (no 'model.')."""
    from transformers import AutoModel

    base = save_base(tiny_llama().model, tmp_path / "llama-model")
    assert run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "merged").exit_code == 0
    merged = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    expected = load_peft(SINGLE_FIXTURE).merge_and_unload().model
    with torch.no_grad():
        ours, theirs = (m(input_ids=EVAL_IDS).last_hidden_state for m in (merged, expected))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# -- bad input: exit 2, one line naming the module and the checkpoint, nothing written ----------


def test_adapter_of_another_model_exits_2_naming_module_and_checkpoint(tmp_path):
    base = save_base(tiny_gpt2(), tmp_path / "gpt2")
    result = run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 2
    assert "model.layers.0" in result.stderr and str(base) in result.stderr
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_shape_mismatch_exits_2_and_writes_nothing(tmp_path):
    from transformers import LlamaForCausalLM

    config = make_fixtures.tiny_llama_config()
    config.intermediate_size = 96  # still a multiple of vector_length, but not the adapter's 128
    base = save_base(LlamaForCausalLM(config), tmp_path / "other")
    result = run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 2 and "shape" in result.stderr and "mlp" in result.stderr
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_missing_weights_and_existing_output_exit_2(bases, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("merge", empty, SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 2 and SINGLE_FILE in result.stderr
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path / "merged")
    result = run_cli("merge", bases["single"], SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert snapshot(tmp_path / "merged") == before
    assert run_cli("merge", bases["single"], SINGLE_FIXTURE, tmp_path / "merged", "--force").exit_code == 0
    assert not (tmp_path / "merged" / "keep.txt").exists()


def test_truncated_shard_exits_2_before_writing(bases, tmp_path):
    base = Path(shutil.copytree(bases["sharded"], tmp_path / "base"))
    shard = sorted(base.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run_cli("merge", base, SINGLE_FIXTURE, tmp_path / "merged")
    assert result.exit_code == 2 and shard.name in result.stderr and "outside the file" in result.stderr
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []
