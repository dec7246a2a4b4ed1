"""``convert`` full -> top-k gives exactly PEFT's own top-k save, PEFT loads it, and it is atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (
    MULTI_FIXTURE,
    SINGLE_FIXTURE,
    leftovers,
    load_peft,
    logits_of,
    peft_logits,
    run_cli,
    snapshot,
    tiny_llama,
)
from vblora_store import (
    DestinationExistsError,
    InvalidAdapterError,
    UnsupportedConversionError,
    convert,
    read_adapters,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def assert_same_adapter_files(ours: Path, theirs: Path) -> None:
    """Tensor for tensor (names, dtypes, shapes, values), metadata, bytes and config dict all equal."""
    a, b = load_file(str(ours / WEIGHTS)), load_file(str(theirs / WEIGHTS))
    assert list(a) == list(b)  # names, in file order
    for key in b:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key
    with safe_open(str(ours / WEIGHTS), "pt") as fa, safe_open(str(theirs / WEIGHTS), "pt") as fb:
        assert fa.metadata() == fb.metadata()
    # safetensors writes deterministically, so equal tensors and metadata give equal bytes
    assert (ours / WEIGHTS).read_bytes() == (theirs / WEIGHTS).read_bytes()
    assert config_dict(ours) == config_dict(theirs)


def config_dict(folder: Path) -> dict:
    """``adapter_config.json`` as a dict; PEFT holds target_modules in a set, so its order is arbitrary."""
    data = json.loads((folder / CONFIG).read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return data


# -- single adapter: equal to PEFT's top-k save -----------------------------------------------------


@pytest.fixture(scope="module")
def converted(peft_saves, tmp_path_factory) -> Path:
    """Our top-k conversion of PEFT's full-form save."""
    dst = tmp_path_factory.mktemp("converted") / "topk"
    convert(peft_saves.full, dst, to="topk")
    return dst


def test_convert_full_to_topk_equals_peft_topk_save(peft_saves, converted):
    """Converting PEFT's full save gives the files PEFT writes with save_only_topk_weights=True."""
    assert_same_adapter_files(converted, peft_saves.topk)


def test_converted_adapter_loads_in_peft_with_peft_topk_outputs(peft_saves, converted):
    """``PeftModel.from_pretrained`` on our folder gives the same logits as on PEFT's top-k save."""
    ours = peft_logits(converted)
    theirs = peft_logits(peft_saves.topk)
    assert torch.equal(ours, theirs)


def test_converted_adapter_is_close_to_the_full_adapter(peft_saves, converted):
    """Top-k storage loses nothing PEFT's forward uses (it mixes only the top-k anyway): logits agree to 1e-5.

    The residual is float32 rounding of softmax -> log -> softmax; measured below 1e-6 here.
    """
    full = peft_logits(peft_saves.full)
    ours = peft_logits(converted)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    # and the adapter does something: the outputs differ from the bare base model
    assert (ours - logits_of(tiny_llama())).abs().max() > 1e-3


def test_convert_of_committed_fixture_equals_peft_topk_save(tmp_path):
    """The committed ``tiny-llama-vblora``, loaded by PEFT and re-saved top-k, equals our conversion."""
    model = load_peft(SINGLE_FIXTURE)
    model.peft_config["default"].save_only_topk_weights = True
    model.save_pretrained(str(tmp_path / "peft"))
    convert(SINGLE_FIXTURE, tmp_path / "ours")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft")


def test_full_to_full_copies_tensors_unchanged(peft_saves, tmp_path):
    """``--to full`` of a full adapter writes the same tensors and config (a checked copy)."""
    convert(peft_saves.full, tmp_path / "copy", to="full")
    assert_same_adapter_files(tmp_path / "copy", peft_saves.full)


# -- two adapters -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_peft_topk(tmp_path_factory) -> Path:
    """PEFT's own top-k save of the committed two-adapter fixture (both adapters loaded, then saved)."""
    model = load_peft(MULTI_FIXTURE)
    model.load_adapter(str(MULTI_FIXTURE / "second"), adapter_name="second")
    for config in model.peft_config.values():
        config.save_only_topk_weights = True
    out = tmp_path_factory.mktemp("multi-peft") / "topk"
    model.save_pretrained(str(out))
    for card in out.rglob("README.md"):
        card.unlink()
    return out


@pytest.fixture(scope="module")
def multi_converted(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("multi-ours") / "topk"
    convert(MULTI_FIXTURE, dst)
    return dst


def test_multi_adapter_folder_converts_into_peft_layout(multi_converted, multi_peft_topk):
    """Both adapters convert, ``default`` at the root and ``second`` in ``second/``, each as PEFT saves it."""
    assert sorted(p.name for p in multi_converted.iterdir()) == [CONFIG, WEIGHTS, "second"]
    assert_same_adapter_files(multi_converted, multi_peft_topk)
    assert_same_adapter_files(multi_converted / "second", multi_peft_topk / "second")
    # second keeps its int16 indices (num_vectors=300) and its modules_to_save copies
    second = read_adapters(multi_converted)[1]
    assert {second.specs[k].dtype for k in second.specs if k.endswith("_indices")} == {torch.int16}
    assert second.other_keys == read_adapters(MULTI_FIXTURE)[1].other_keys


def test_peft_loads_both_converted_adapters_with_its_own_outputs(multi_converted, multi_peft_topk):
    """PEFT loads ``default`` (from_pretrained) and ``second`` (load_adapter); each gives PEFT's logits."""

    def outputs(folder: Path) -> dict[str, torch.Tensor]:
        model = load_peft(folder)
        model.load_adapter(str(folder / "second"), adapter_name="second")
        out = {}
        for name in ("default", "second"):
            model.set_adapter(name)
            out[name] = logits_of(model)
        return out

    ours, theirs, full = outputs(multi_converted), outputs(multi_peft_topk), outputs(MULTI_FIXTURE)
    for name in ("default", "second"):
        assert torch.equal(ours[name], theirs[name])
        torch.testing.assert_close(ours[name], full[name], rtol=0, atol=1e-5)
    assert not torch.allclose(ours["default"], ours["second"])  # two different adapters


# -- atomicity and destinations ------------------------------------------------------------------------


def test_convert_leaves_no_temporary_folder_and_does_not_touch_the_source(single_copy, tmp_path):
    """After a conversion only DST is new beside it, and SRC's bytes are unchanged."""
    before = snapshot(single_copy)
    out = tmp_path / "out"
    convert(single_copy, out)
    assert snapshot(single_copy) == before
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]


def test_existing_destination_is_refused_and_kept(single_copy, tmp_path):
    """DST that exists is refused without --force, and stays exactly as it was."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="--force"):
        convert(single_copy, dst)
    assert snapshot(dst) == {"keep.txt": b"mine"}
    assert leftovers(tmp_path) == []


def test_force_replaces_the_destination_entirely(single_copy, tmp_path):
    """With force, DST is replaced as a whole: old files are gone, the new adapter is there."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    convert(single_copy, dst, force=True)
    assert sorted(p.name for p in dst.iterdir()) == [CONFIG, WEIGHTS]
    assert read_adapters(dst)[0].form.value == "topk"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["inside", "same"])
def test_destination_inside_or_equal_to_source_is_refused(single_copy, where):
    """DST inside SRC (or SRC itself) is refused, even with force; SRC is untouched."""
    before = snapshot(single_copy)
    dst = single_copy / "topk" if where == "inside" else single_copy
    with pytest.raises(DestinationExistsError, match="source"):
        convert(single_copy, dst, force=True)
    assert snapshot(single_copy) == before


def test_failure_in_second_adapter_writes_nothing(multi_copy, tmp_path):
    """If the second adapter is bad (NaN logits), nothing appears at DST, not even the good default."""
    weights = multi_copy / "second" / WEIGHTS
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("vblora_logits_A"))
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = snapshot(multi_copy)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        convert(multi_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert snapshot(multi_copy) == before


def test_topk_to_full_is_refused(peft_saves, tmp_path):
    """A top-k adapter cannot become full again (its logits are gone): refused, nothing written."""
    with pytest.raises(UnsupportedConversionError, match="cannot become full"):
        convert(peft_saves.topk, tmp_path / "full", to="full")
    assert not (tmp_path / "full").exists()


def test_cli_convert_prints_the_report_of_the_result(single_copy, tmp_path):
    """``vblora-store convert`` exits 0 and reports the new top-k adapter."""
    result = run_cli("convert", single_copy, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "topk form" in result.stdout
    assert str(tmp_path / "out") in result.stdout
