"""The format layer reads what PEFT writes: both storage forms, both file types, multi-adapter folders."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import MULTI_FIXTURE, SINGLE_FIXTURE, snapshot
from vblora_store import AdapterNotFoundError, StorageForm, convert, index_dtype, read_adapter, read_adapters
from vblora_store.format import BANK_KEY, find_adapter_folders
from vblora_store.format.keys import indices_key, logits_key, parse_key, weights_key


def peft_vblora_modules(peft_model) -> dict[str, tuple[int, int]]:
    """``{module name without base_model.model.: (in_features, out_features)}`` of PEFT's VB-LoRA layers."""
    from peft.tuners.vblora.layer import VBLoRALayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, VBLoRALayer):
            out[name.removeprefix("base_model.model.")] = (module.in_features, module.out_features)
    return out


# -- reading both forms ------------------------------------------------------------------------


def test_full_form_from_peft_reads_with_peft_modules_and_config(peft_saves):
    """A PEFT full-form save reads as FULL, with exactly PEFT's modules, features and config."""
    (adapter,) = read_adapters(peft_saves.full)
    assert adapter.name == "default"
    assert adapter.form is StorageForm.FULL
    expected = peft_vblora_modules(peft_saves.model)
    assert len(expected) == 14
    assert {m.name: (m.in_features, m.out_features) for m in adapter.modules.values()} == expected
    assert adapter.config.to_dict() == json.loads((peft_saves.full / "adapter_config.json").read_text())


def test_topk_form_from_peft_reads_as_topk_with_peft_shapes(peft_saves):
    """A PEFT top-k save reads as TOPK; the modules are the same as those of the full save."""
    full, topk = read_adapter(peft_saves.full), read_adapter(peft_saves.topk)
    assert topk.form is StorageForm.TOPK
    assert topk.config.save_only_topk_weights is True
    assert topk.modules == full.modules
    for key, spec in topk.specs.items():
        parts = parse_key(key)
        if parts is not None and parts.part == "indices":
            assert spec.dtype == torch.uint8  # num_vectors=64 < 2**8
            assert spec.shape[-1] == 2  # topk


def test_lazy_tensors_equal_the_file_contents(peft_saves):
    """``StoredAdapter.tensor`` returns exactly what safetensors loads, key for key."""
    for folder in (peft_saves.full, peft_saves.topk):
        adapter = read_adapter(folder)
        stored = load_file(str(folder / "adapter_model.safetensors"))
        assert set(adapter.specs) == set(stored)
        for key, value in stored.items():
            assert torch.equal(adapter.tensor(key), value)
            assert (adapter.specs[key].dtype, adapter.specs[key].shape) == (value.dtype, tuple(value.shape))


def test_committed_fixture_is_full_form_of_the_documented_recipe():
    """``fixtures/tiny-llama-vblora`` holds what its script documents: full, N=64, L=16, k=2, 14 modules."""
    (adapter,) = read_adapters(SINGLE_FIXTURE)
    cfg = adapter.config
    assert adapter.form is StorageForm.FULL
    assert (cfg.r, cfg.num_vectors, cfg.vector_length, cfg.topk) == (4, 64, 16, 2)
    assert len(adapter.modules) == 2 * 7
    adapter.check_values()  # finite everywhere


# -- multi-adapter discovery ----------------------------------------------------------------------


def test_multi_adapter_folder_reads_default_at_root_and_second_in_subfolder():
    """PEFT puts ``default`` at the root and ``second`` in ``second/``; both are found with their configs."""
    adapters = read_adapters(MULTI_FIXTURE)
    assert [a.name for a in adapters] == ["default", "second"]
    assert [a.folder for a in adapters] == [MULTI_FIXTURE, MULTI_FIXTURE / "second"]
    default, second = adapters
    assert (default.config.num_vectors, default.config.topk) == (64, 2)
    assert (second.config.num_vectors, second.config.topk, second.config.vector_length) == (300, 3, 32)
    # second's modules_to_save copies are carried as "other" tensors, not as VB-LoRA tensors
    assert second.other_keys and all(k.endswith("norm.weight") for k in second.other_keys)
    assert default.other_keys == []


def test_discovery_ignores_hidden_and_non_adapter_subfolders(multi_copy):
    """Hidden folders (like our own temp folders) and folders without a config are not adapters."""
    hidden = multi_copy / ".vblora-store-tmp-x"
    shutil.copytree(multi_copy / "second", hidden)
    (multi_copy / "notes").mkdir()
    (multi_copy / "notes" / "readme.txt").write_text("not an adapter")
    assert [name for name, _ in find_adapter_folders(multi_copy)] == ["default", "second"]


def test_folder_with_only_subfolder_adapters_has_no_default(multi_copy):
    """A folder whose root has no config still yields its sub-folder adapters."""
    (multi_copy / "adapter_config.json").unlink()
    (multi_copy / "adapter_model.safetensors").unlink()
    assert [a.name for a in read_adapters(multi_copy)] == ["second"]


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_discovery_errors_name_the_path(tmp_path, make):
    """A missing path, a file, or an empty folder raises AdapterNotFoundError naming the path."""
    path = tmp_path / "x"
    if make == "file":
        path.write_text("hi")
    elif make == "empty":
        path.mkdir()
    with pytest.raises(AdapterNotFoundError, match=str(path)):
        read_adapters(path)


# -- key parsing ------------------------------------------------------------------------------------


def test_every_peft_key_parses_back_to_its_module_and_side(peft_saves):
    """Each logits/indices/weights key PEFT writes splits into (module, side, part) and rebuilds exactly."""
    modules = set(peft_vblora_modules(peft_saves.model))
    seen = set()
    for folder, builders in (
        (peft_saves.full, {"logits": logits_key}),
        (peft_saves.topk, {"indices": indices_key, "weights": weights_key}),
    ):
        for key in load_file(str(folder / "adapter_model.safetensors")):
            parts = parse_key(key)
            if key == BANK_KEY:
                assert parts is None
                continue
            assert parts is not None, key
            assert parts.module in modules
            assert builders[parts.part](parts.module, parts.side) == key
            seen.add((parts.module, parts.side, parts.part))
    assert len(seen) == len(modules) * 2 * 3  # every module, both sides, logits + indices + weights


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.norm.weight",
        "base_model.model.score.modules_to_save.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
        "base_model.model.x.vblora_logits_C",
        "base_model.model.x.vblora_logits_A_topk_other",
    ],
)
def test_other_keys_do_not_parse(key):
    """Keys that are not VB-LoRA logits-family tensors (copies, biases, look-alikes) parse to None."""
    assert parse_key(key) is None


# -- index dtype: PEFT's rule ------------------------------------------------------------------------

BOUNDARIES = [1, 255, 256, 2**15 - 1, 2**15, 2**31 - 1, 2**31, 2**40]


def peft_index_dtype(num_vectors: int) -> torch.dtype:
    """The dtype PEFT's own ``_get_adapter_state_dict`` gives top-k indices for ``num_vectors``.

    PEFT's rule reads only ``config.num_vectors``; the logits here are a stand-in of width 3,
    so every boundary, even 2**40, costs nothing.
    """
    from peft.tuners.vblora.model import VBLoRAModel

    config = SimpleNamespace(num_vectors=num_vectors, save_only_topk_weights=True, topk=1, bias="none")
    state = {
        "base_model.model.fc.vblora_logits_A": torch.randn(1, 1, 3),
        "base_model.vblora_vector_bank.default": torch.zeros(1, 1),
    }
    out = VBLoRAModel._get_adapter_state_dict(None, config, "default", state, [])
    return out["base_model.model.fc.vblora_logits_A_topk_indices"].dtype


@pytest.mark.parametrize("num_vectors", BOUNDARIES)
def test_index_dtype_follows_peft_at_every_boundary(num_vectors):
    """``index_dtype`` equals the dtype PEFT's saving code picks, on both sides of each boundary."""
    assert index_dtype(num_vectors) == peft_index_dtype(num_vectors)


class _TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("num_vectors", [255, 256, 2**15 - 1, 2**15])
def test_real_peft_topk_save_uses_index_dtype_and_our_convert_matches(tmp_path, num_vectors):
    """PEFT saves a real model with this ``num_vectors``: our dtype rule, our reader and our convert agree."""
    from peft import VBLoRAConfig, get_peft_model

    torch.manual_seed(0)
    cfg = VBLoRAConfig(r=1, num_vectors=num_vectors, vector_length=4, topk=2, target_modules=["fc"])
    model = get_peft_model(_TinyMLP(), cfg)
    model.save_pretrained(str(tmp_path / "full"))
    cfg.save_only_topk_weights = True
    model.save_pretrained(str(tmp_path / "topk"))

    peft_topk = read_adapter(tmp_path / "topk")
    index_keys = [k for k in peft_topk.specs if k.endswith("_topk_indices")]
    assert len(index_keys) == 2
    assert {peft_topk.specs[k].dtype for k in index_keys} == {index_dtype(num_vectors)}

    convert(tmp_path / "full", tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "topk" / "adapter_model.safetensors"))
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -- .bin input ---------------------------------------------------------------------------------------


def test_bin_files_read_like_safetensors(peft_saves):
    """PEFT's ``adapter_model.bin`` saves read with the same form, modules, specs and tensors."""
    pairs = ((peft_saves.full, peft_saves.full_bin), (peft_saves.topk, peft_saves.topk_bin))
    for st_folder, bin_folder in pairs:
        st, binary = read_adapter(st_folder), read_adapter(bin_folder)
        assert binary.weights_path.name == "adapter_model.bin"
        assert binary.form is st.form
        assert binary.modules == st.modules
        assert binary.specs == st.specs
        assert all(torch.equal(binary.tensor(k), st.tensor(k)) for k in st.specs)


def test_bin_input_converts_to_the_same_bytes(peft_saves, tmp_path):
    """Converting the ``.bin`` full save gives byte-identical files to converting the safetensors one."""
    before = snapshot(peft_saves.full_bin)
    convert(peft_saves.full, tmp_path / "from_st")
    convert(peft_saves.full_bin, tmp_path / "from_bin")
    assert snapshot(tmp_path / "from_bin") == snapshot(tmp_path / "from_st")
    assert snapshot(peft_saves.full_bin) == before
