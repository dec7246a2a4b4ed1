"""The packed form: bit packing, lossless round trips against PEFT's files, lossy options, verify."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from conftest import SINGLE_FIXTURE, peft_logits, run_cli, snapshot
from vblora_store.format import StorageForm, convert, read_adapter, read_adapters
from vblora_store.format.bitpack import bits_for, pack, packed_size, unpack
from vblora_store.format.codecs.packed import _fit_simplex
from vblora_store.topk import complete_weights
from vblora_store.verify import verify_adapters

# -- bit packing ---------------------------------------------------------------------


def test_pack_docstring_example():
    """[5, 2, 7] at 3 bits, LSB first: 101 010 111 -> 0xd5 0x01."""
    assert pack(torch.tensor([5, 2, 7]), 3).tolist() == [0xD5, 0x01]
    assert unpack(torch.tensor([0xD5, 0x01], dtype=torch.uint8), 3, 3).tolist() == [5, 2, 7]


@pytest.mark.parametrize("bits", range(1, 33))
def test_round_trip_every_bit_width(bits):
    """Every width from 1 to 32 bits, including each width's largest value and odd counts."""
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (997,), dtype=torch.int64)
    values[0], values[-1] = 2**bits - 1, 0
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(997 * bits / 8)
    assert torch.equal(unpack(packed, bits, 997), values)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40_000).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=300))
    )
)
def test_round_trip_property(case):
    """Any values below N pack at ceil(log2 N) bits and come back unchanged."""
    n, values = case
    bits = bits_for(n)
    assert 2 ** (bits - 1) < n <= 2 ** bits or (n == 1 and bits == 1)
    tensor = torch.tensor(values, dtype=torch.int64)
    packed = pack(tensor, bits)
    assert packed.numel() == packed_size(len(values), bits)
    assert torch.equal(unpack(packed, bits, len(values)), tensor)


def test_pack_refuses_values_that_do_not_fit():
    """A value at or above 2**bits, or negative, is an error, not silent truncation."""
    with pytest.raises(ValueError):
        pack(torch.tensor([8]), 3)
    with pytest.raises(ValueError):
        pack(torch.tensor([-1]), 3)
    with pytest.raises(ValueError):
        unpack(torch.tensor([1], dtype=torch.uint8), 3, 3)


# -- lossless against PEFT ---------------------------------------------------------------


def _tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("source", ["full", "topk"])
def test_packed_back_to_topk_is_peft_topk_bit_for_bit(peft_saves, tmp_path, source):
    """full -> packed -> top-k, and PEFT's top-k -> packed -> top-k, give PEFT's own top-k tensors."""
    convert(getattr(peft_saves, source), tmp_path / "packed", to="packed")
    convert(tmp_path / "packed", tmp_path / "topk", to="topk")
    ours, peft = _tensors(tmp_path / "topk"), _tensors(peft_saves.topk)
    assert ours.keys() == peft.keys()
    for key in peft:
        assert ours[key].dtype == peft[key].dtype and torch.equal(ours[key], peft[key]), key
    assert (tmp_path / "topk" / "adapter_model.safetensors").read_bytes() == (
        peft_saves.topk / "adapter_model.safetensors"
    ).read_bytes()


def test_packed_is_smaller_than_peft_topk(peft_saves, tmp_path):
    """One tensor per kind and bit-packed indices: the file shrinks."""
    convert(peft_saves.topk, tmp_path / "packed", to="packed")
    packed = (tmp_path / "packed" / "adapter_model.safetensors").stat().st_size
    assert packed < (peft_saves.topk / "adapter_model.safetensors").stat().st_size


def test_peft_loads_topk_recovered_from_packed(peft_saves, tmp_path):
    """PEFT loads the top-k files unpacked from a packed adapter, with its own top-k's outputs."""
    convert(peft_saves.full, tmp_path / "packed", to="packed")
    convert(tmp_path / "packed", tmp_path / "topk", to="topk")
    assert torch.equal(peft_logits(tmp_path / "topk"), peft_logits(peft_saves.topk))


def _fixture_in(dtype: torch.dtype, folder):
    """``fixtures/tiny-llama-vblora`` copied to ``folder`` with its bank and logits cast to ``dtype``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(SINGLE_FIXTURE, folder)
    tensors = {k: v.to(dtype) for k, v in _tensors(folder).items()}  # the full form holds only floats
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("form", ["packed", "compressed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_any_float_dtype_round_trips_through_the_packed_forms(tmp_path, form, dtype):
    """full -> packed/compressed -> top-k gives the direct full -> top-k tensors, in the source's dtype.

    The default stores the weights and bank as float32: float16 and bfloat16 come back bit for
    bit; float64 comes back as its values rounded to float32 (the one rounding the format makes).
    """
    full = _fixture_in(dtype, tmp_path / "full")
    convert(full, tmp_path / "direct", to="topk")
    convert(full, tmp_path / form, to=form)
    convert(tmp_path / form, tmp_path / "back", to="topk")
    direct, back = _tensors(tmp_path / "direct"), _tensors(tmp_path / "back")
    assert back.keys() == direct.keys()
    for key, value in direct.items():
        expected = value.float().to(dtype) if value.is_floating_point() else value
        assert back[key].dtype == value.dtype and torch.equal(back[key], expected), key
    precision = read_adapters(tmp_path / form)[0].form.codec.precision(read_adapters(tmp_path / form)[0].packing)
    if dtype is not torch.float64:
        assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "direct" / "adapter_model.safetensors"
        ).read_bytes()
        assert precision == "lossless"
    else:  # the rounding is said, never called lossless
        assert precision == "weights float32, bank float32 (rounded from float64)"
        report = json.loads(run_cli("report", tmp_path / form, "--format", "json").stdout)["adapters"][0]
        assert report["precision"] == precision
        # and the report of the float64 source says what the packed forms would round
        text = run_cli("report", full).stdout
        lines = [line.lstrip() for line in text.splitlines()]
        would = [line for line in lines if line.startswith(("packed form", "compressed"))]
        assert len(would) == 2 and all("float64 rounded to float32" in line for line in would), text
        assert "lossless" not in "".join(would)


def test_max_error_measures_the_rounding_of_a_float64_adapter(tmp_path):
    """Float32 storage rounds a float64 adapter: --max-error measures it rather than call it 0, and a bound
    below it is refused with the fix, nothing written."""
    from vblora_store import precision

    full = _fixture_in(torch.float64, tmp_path / "full")
    convert(full, tmp_path / "topk", to="topk")
    (chosen,) = precision.convert_choosing(full, tmp_path / "packed", to="packed", max_error=1e-6)
    measured = verify_adapters(read_adapters(tmp_path / "topk")[0], read_adapters(tmp_path / "packed")[0])
    assert 0 < chosen.max_rel_error <= 1e-6
    assert chosen.max_rel_error == pytest.approx(measured.max_rel_error, rel=0.1)  # Gram matrices: ~1e-8 resolution
    refused = run_cli("convert", full, tmp_path / "exact", "--to", "packed", "--max-error", "0")
    assert refused.exit_code == 2 and not (tmp_path / "exact").exists()
    assert "no precision of the packed form is within --max-error 0" in refused.stderr
    assert "the adapter is float64" in refused.stderr and "--to topk" in refused.stderr


def test_verify_tol_0_fails_on_the_smallest_difference(tmp_path):
    """verify's relative error is not rounded: a 1e-12 change of one float64 bank value still fails --tol 0."""
    from safetensors.torch import load_file, save_file

    full = _fixture_in(torch.float64, tmp_path / "a")
    convert(full, tmp_path / "b", to="full")
    weights = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vblora_vector_bank"][0, 0] += 1e-12
    save_file(tensors, str(weights))
    same = run_cli("verify", full, full, "--tol", "0")
    changed = run_cli("verify", full, tmp_path / "b", "--tol", "0", "--format", "json")
    assert same.exit_code == 0 and changed.exit_code == 1, changed.stdout
    assert 0 < json.loads(changed.stdout)["max_rel_error"] < 1e-9


def test_verify_builds_the_difference_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """Blocks of a few rows give the errors of the whole (out, in) difference: memory is one block."""
    import vblora_store.verify as verify

    convert(SINGLE_FIXTURE, tmp_path / "lossy", to="packed", bank_dtype="int4", weights_dtype="fixed8")
    whole = verify.verify_adapters(read_adapter(SINGLE_FIXTURE), read_adapter(tmp_path / "lossy"))
    monkeypatch.setattr(verify, "_BLOCK_VALUES", 100)  # a row or two of a 64-wide module per block
    blocks = verify.verify_adapters(read_adapter(SINGLE_FIXTURE), read_adapter(tmp_path / "lossy"))
    assert len(blocks.modules) == len(whole.modules)
    for b, w in zip(blocks.modules, whole.modules):  # the same to float64's rounding (BLAS sums blocks apart)
        assert b.max_abs_error == pytest.approx(w.max_abs_error, rel=1e-12) and b.max_abs_error > 0
        assert b.rel_error == pytest.approx(w.rel_error, rel=1e-12) and b.rel_error > 0


def test_multi_adapter_folder_packs_in_the_same_layout(multi_copy, tmp_path):
    """Both adapters of a PEFT multi-adapter folder become packed, in the same folders."""
    convert(multi_copy, tmp_path / "packed", to="packed")
    adapters = read_adapters(tmp_path / "packed")
    assert [a.name for a in adapters] == [a.name for a in read_adapters(multi_copy)]
    assert all(a.form is StorageForm.PACKED for a in adapters)
    for original, packed in zip(read_adapters(multi_copy), adapters):
        assert verify_adapters(original, packed).max_rel_error < 1e-6


# -- lossy options --------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights_dtype,bank_dtype,bound",
    [("float16", "float32", 2e-3), ("bfloat16", "float32", 1e-2), ("float32", "float16", 2e-3),
     ("float16", "float16", 3e-3), ("float16", "int8", 2e-2)],
)  # fmt: skip
def test_lossy_options_shrink_and_stay_close(peft_saves, tmp_path, weights_dtype, bank_dtype, bound):
    """Lower precision: a smaller file, reported as lossy, and ΔW within the dtype's rounding."""
    convert(peft_saves.full, tmp_path / "lossless", to="packed")
    convert(
        peft_saves.full, tmp_path / "lossy", to="packed", weights_dtype=weights_dtype, bank_dtype=bank_dtype
    )
    lossless, lossy = read_adapters(tmp_path / "lossless")[0], read_adapters(tmp_path / "lossy")[0]
    assert lossy.file_bytes < lossless.file_bytes
    assert lossy.packing.info() == {
        "weights_dtype": weights_dtype,
        "bank_dtype": bank_dtype,
        "index_bits": "6",
    }
    error = verify_adapters(read_adapters(peft_saves.full)[0], lossy).max_rel_error
    assert 0 < error < bound


def test_lossy_weights_never_give_a_negative_last_weight():
    """Rounded weights summing to 1 or more are scaled back below 1: PEFT's log(1 - sum) stays finite."""
    stored = torch.tensor([[0.5, 0.5], [0.7, 0.4], [0.2, 0.3]]).to(torch.float16)
    fitted = _fit_simplex(stored.to(torch.float32))
    assert (fitted >= 0).all() and (fitted.sum(-1) < 1).all()
    assert torch.equal(fitted[2], stored[2].float())  # rows already below 1 are untouched
    assert torch.isfinite(torch.log(1 - fitted.sum(-1))).all()
    assert (complete_weights(torch.tensor([[0.7, 0.4]]))[..., -1] == 0).all()


def test_precision_options_need_the_packed_form(single_copy, tmp_path):
    """--weights-dtype without --to packed is refused: top-k files are PEFT's, always float32."""
    result = run_cli("convert", single_copy, tmp_path / "out", "--weights-dtype", "float16")
    assert result.exit_code == 2 and "--to packed" in result.stderr
    assert not (tmp_path / "out").exists()


# -- commands on packed adapters --------------------------------------------------------


def test_every_command_reads_packed(single_copy, tmp_path):
    """inspect, report and verify take packed folders; the report states the precision."""
    dst = tmp_path / "packed"
    result = run_cli(
        "convert", single_copy, dst, "--to", "packed", "--bank-dtype", "int8", "--weights-dtype", "float16"
    )
    assert result.exit_code == 0 and "weights float16, bank int8" in result.stdout
    described = json.loads(run_cli("inspect", dst, "--json").stdout)["adapters"][0]
    assert described["form"] == "packed"
    assert {t["key"] for t in described["tensors"]} >= {"vblora_packed.indices", "vblora_packed.bank_scale"}
    row = json.loads(run_cli("report", dst, "--format", "json").stdout)["adapters"][0]
    assert row["form"] == "packed" and row["precision"] == "weights float16, bank int8"
    assert row["vblora_params"] < row["packed_vblora_params"] < row["topk_vblora_params"]


def test_verify_command_exit_codes_and_json(single_copy, tmp_path):
    """verify: 0 within --tol, 1 above it, and the JSON names every module."""
    convert(single_copy, tmp_path / "lossless", to="packed")
    convert(single_copy, tmp_path / "lossy", to="packed", bank_dtype="int8")
    ok = run_cli("verify", single_copy, tmp_path / "lossless", "--format", "json")
    assert ok.exit_code == 0
    payload = json.loads(ok.stdout)
    assert payload["max_rel_error"] < 1e-6
    assert {m["module"] for m in payload["modules"]} == set(read_adapters(single_copy)[0].modules)
    before = snapshot(tmp_path)
    assert run_cli("verify", single_copy, tmp_path / "lossy").exit_code == 1
    assert run_cli("verify", single_copy, tmp_path / "lossy", "--tol", "0.1").exit_code == 0
    assert snapshot(tmp_path) == before


def test_verify_refuses_different_adapters(single_copy, multi_copy):
    """Two adapters of different modules: exit 2 with both paths named."""
    result = run_cli("verify", single_copy, multi_copy)
    assert result.exit_code == 2
    assert str(multi_copy) in result.stderr


def test_damaged_packed_metadata_is_a_clean_error(single_copy, tmp_path):
    """A packed file whose module table disagrees with its tensors: exit 2, named, nothing written."""
    from safetensors.torch import save_file

    convert(single_copy, tmp_path / "packed", to="packed")
    path = tmp_path / "packed" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    description = json.loads(metadata["vblora_store.packed"])
    description["modules"] = description["modules"][:-1]
    save_file(tensors, str(path), metadata={"vblora_store.packed": json.dumps(description)})
    result = run_cli("convert", tmp_path / "packed", tmp_path / "out")
    assert result.exit_code == 2 and str(path) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field,value",
    [("restore_weights_dtype", "float128"), ("restore_bank_dtype", "int64"), ("restore_bank_dtype", 32)],
)
def test_unknown_restore_dtype_is_a_clean_error(single_copy, tmp_path, field, value):
    """A restore dtype that names no floating dtype: exit 2, the file and the field named, nothing written."""
    from safetensors.torch import save_file

    convert(single_copy, tmp_path / "packed", to="packed")
    path = tmp_path / "packed" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    description = json.loads(metadata["vblora_store.packed"])
    description[field] = value
    save_file(tensors, str(path), metadata={"vblora_store.packed": json.dumps(description)})
    result = run_cli("convert", tmp_path / "packed", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and f"{field} is {value!r}" in result.stderr
    assert "fetch it again" in result.stderr
    assert not (tmp_path / "out").exists()
