"""Storage beyond the floor: the compressed form, the smaller precisions, precision chosen by measured error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import SINGLE_FIXTURE, peft_logits, run_cli, snapshot
from vblora_store import convert, read_adapter, read_adapters
from vblora_store.choices import BankDtype, WeightsDtype
from vblora_store.errors import InvalidAdapterError, UnsupportedConversionError
from vblora_store.format.codecs import compressed
from vblora_store.hub.card import model_card
from vblora_store.format.codecs.precision import decode_bank, decode_weights, encode_bank, encode_weights
from vblora_store.precision import candidates, choose_precision, convert_choosing, measured_error
from vblora_store.storage_forms import StorageForm
from vblora_store.verify import verify_adapters

WEIGHTS = "adapter_model.safetensors"


def _tensors(folder):
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- lossless, entropy-coded ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["full", "topk"])
def test_compressed_decodes_to_peft_topk_bit_for_bit(peft_saves, tmp_path, source):
    convert(getattr(peft_saves, source), tmp_path / "z", to="compressed")
    convert(tmp_path / "z", tmp_path / "topk", to="topk")
    assert (tmp_path / "topk" / WEIGHTS).read_bytes() == (peft_saves.topk / WEIGHTS).read_bytes()
    assert torch.equal(peft_logits(tmp_path / "topk"), peft_logits(peft_saves.topk))
    (adapter,) = read_adapters(tmp_path / "z")
    assert adapter.form is StorageForm.COMPRESSED and adapter.packing.info()["codec"] == "zstd-19 byte planes"


def test_compressed_is_smaller_than_packed_and_deterministic(tmp_path):
    for name in ("a", "b"):
        convert(SINGLE_FIXTURE, tmp_path / name, to="compressed")
    convert(SINGLE_FIXTURE, tmp_path / "packed", to="packed")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert (tmp_path / "a" / WEIGHTS).stat().st_size < (tmp_path / "packed" / WEIGHTS).stat().st_size
    tensors, metadata = _tensors(tmp_path / "a")
    assert "vblora_compressed.vblora_packed.bank" in tensors and "vblora_packed.indices" in tensors
    assert "vblora_packed.bank" not in tensors  # the bank is stored only as its planes
    description = json.loads(metadata[compressed.METADATA_KEY])
    assert description["codec"] == "zstd" and description["level"] == compressed.LEVEL
    assert [kind for _, kind in description["tensors"]["vblora_packed.bank"]["planes"]].count("zstd") >= 1


def test_the_engine_loads_the_compressed_form(tmp_path):
    from conftest import EVAL_IDS, logits_of, tiny_llama

    from vblora_store.engine import VBLoRAModel

    convert(SINGLE_FIXTURE, tmp_path / "z", to="compressed")
    convert(SINGLE_FIXTURE, tmp_path / "topk", to="topk")  # lossless: the same values as PEFT's top-k file
    ours = logits_of(VBLoRAModel.from_pretrained(tiny_llama(), tmp_path / "z"), EVAL_IDS)
    assert torch.equal(
        ours, logits_of(VBLoRAModel.from_pretrained(tiny_llama(), tmp_path / "topk"), EVAL_IDS)
    )


def test_a_top_1_adapter_stores_no_weight_and_round_trips(tmp_path):
    import shutil

    shutil.copytree(SINGLE_FIXTURE, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps({**config, "topk": 1}))
    convert(tmp_path / "full", tmp_path / "z", to="compressed")
    convert(tmp_path / "z", tmp_path / "back", to="topk")
    convert(tmp_path / "full", tmp_path / "direct", to="topk")
    assert (tmp_path / "back" / WEIGHTS).read_bytes() == (tmp_path / "direct" / WEIGHTS).read_bytes()


def test_byte_planes_as_the_spec_gives_them():
    """docs/format.md's example: float32 values 1.0 and -2.5 are 00 00 80 3f and 00 00 20 c0."""
    planes = compressed._planes(torch.tensor([1.0, -2.5]))
    assert planes == [b"\x00\x00", b"\x00\x00", b"\x80\x20", b"\x3f\xc0"]
    assert torch.equal(compressed._join(planes, torch.float32, (2,)), torch.tensor([1.0, -2.5]))


def _damaged(tmp_path, change):
    """A compressed copy of the fixture, its header or one of its tensors changed by ``change``."""
    folder = tmp_path / "z"
    convert(SINGLE_FIXTURE, folder, to="compressed")
    tensors, metadata = _tensors(folder)
    description = json.loads(metadata[compressed.METADATA_KEY])
    change(tensors, description)
    metadata[compressed.METADATA_KEY] = json.dumps(description, sort_keys=True, separators=(",", ":"))
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)
    return folder


def _first_zstd(description):
    planes = description["tensors"]["vblora_packed.bank"]["planes"]
    index = next(i for i, (_, kind) in enumerate(planes) if kind == "zstd")
    return sum(size for size, _ in planes[:index]), planes[index][0]


def _flip_frame(tensors, description):
    start, size = _first_zstd(description)
    blob = tensors["vblora_compressed.vblora_packed.bank"]
    blob[start + size // 2 :: 7][: size // 14] ^= 0x5A


def _replace_first_frame(tensors, description, frame_of):
    """Put ``frame_of(plane bytes)`` in place of the bank's first zstd frame, its stated size updated."""
    import zstandard

    start, size = _first_zstd(description)
    blob = bytes(tensors["vblora_compressed.vblora_packed.bank"].tolist())
    new_frame = frame_of(zstandard.ZstdDecompressor().decompress(blob[start : start + size]))
    new = blob[:start] + new_frame + blob[start + size :]
    tensors["vblora_compressed.vblora_packed.bank"] = torch.frombuffer(bytearray(new), dtype=torch.uint8)
    planes = description["tensors"]["vblora_packed.bank"]["planes"]
    planes[next(i for i, (_, kind) in enumerate(planes) if kind == "zstd")][0] = len(new_frame)


def _bomb(tensors, description):
    """A frame that declares far more bytes than the plane holds: decompression is never tried."""
    import zstandard

    bomb = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"\x00" * (1 << 24))
    _replace_first_frame(tensors, description, lambda plane: bomb)


def _no_checksum(tensors, description):
    """The same plane, framed without zstd's checksum: damage in it could not be told."""
    import zstandard

    _replace_first_frame(
        tensors, description, zstandard.ZstdCompressor(level=3, write_checksum=False).compress
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (_flip_frame, "cannot be decompressed|gave|declares"),
        (_bomb, "declares 16777216 bytes, not"),
        (_no_checksum, "carries no checksum"),
        (
            lambda t, d: d["tensors"]["vblora_packed.bank"]["planes"][0].__setitem__(0, 1),
            "but its planes declare",
        ),
        (lambda t, d: d["tensors"]["vblora_packed.bank"].__setitem__("shape", [64, 17]), "the config gives"),
        (
            lambda t, d: d["tensors"]["vblora_packed.bank"]["planes"][0].__setitem__(1, "lzma"),
            r"not \[stored bytes, \"zstd\" or \"raw\"\]",
        ),
        (lambda t, d: d.__setitem__("version", "9"), "Upgrade vblora_store"),
        (lambda t, d: d.pop("packed"), "incomplete or malformed"),
    ],
    ids=["flipped", "bomb", "no-checksum", "sizes", "shape", "kind", "version", "no-packed"],
)
def test_damaged_or_hostile_compressed_files_are_refused(tmp_path, change, message):
    folder = _damaged(tmp_path, change)
    before = snapshot(folder)
    with pytest.raises(InvalidAdapterError, match=message):
        read_adapter(folder).check_values()
    result = run_cli("convert", folder, tmp_path / "out", "--to", "topk")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


# -- smaller precisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, bound", [("float8_e4m3", 0.07), ("int8", 0.005), ("int4", 0.08), ("bfloat16", 0.004)]
)
def test_bank_precisions_round_trip_within_their_step(dtype, bound):
    bank = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    bank[3] = 0  # an all-zero vector keeps scale 1 and comes back zero
    back = decode_bank(encode_bank(bank, BankDtype(dtype)), BankDtype(dtype), (40, 32))
    assert back.dtype == torch.float32 and torch.equal(back[3], torch.zeros(32))
    assert float(((back - bank).abs().amax(1) / bank.abs().amax(1).clamp(min=1e-9)).max()) <= bound


def test_fixed_point_weights_use_the_weights_own_range():
    weights = 0.5 + 0.5 * torch.rand(100, 1, generator=torch.Generator().manual_seed(1))
    for dtype, levels in (("fixed8", 255), ("fixed16", 65535)):
        stored = encode_weights(weights, WeightsDtype(dtype))
        low, high = stored["vblora_packed.weights_range"].tolist()
        assert low == pytest.approx(float(weights.min())) and high == pytest.approx(float(weights.max()))
        back = decode_weights(stored, WeightsDtype(dtype))
        assert float((back - weights).abs().max()) <= (high - low) / levels / 2 + 1e-7


@pytest.mark.parametrize("form", ["packed", "compressed"])
@pytest.mark.parametrize(
    "bank, weights", [("int4", "fixed8"), ("float8_e4m3", "fixed16"), ("int8", "float16")]
)
def test_lossy_forms_are_stated_and_stay_close(tmp_path, form, bank, weights):
    convert(SINGLE_FIXTURE, tmp_path / "x", to=form, bank_dtype=bank, weights_dtype=weights)
    report = json.loads(run_cli("report", tmp_path / "x", "--format", "json").stdout)["adapters"][0]
    assert report["precision"] == f"weights {weights}, bank {bank}"
    assert f"| weights {weights}, bank {bank} |" in model_card(
        [read_adapter(tmp_path / "x")], repo_id="acme/x"
    )
    error = verify_adapters(read_adapter(SINGLE_FIXTURE), read_adapter(tmp_path / "x")).max_rel_error
    assert 0 < error < 0.2
    convert(tmp_path / "x", tmp_path / "topk", to="topk")  # back to PEFT's form: PEFT reads it
    peft_logits(tmp_path / "topk")


# -- precision chosen by measured error ------------------------------------------------------------


@pytest.mark.parametrize("form", ["packed", "compressed"])
@pytest.mark.parametrize("bound", [0.0, 1e-4, 3e-3, 2e-2, 1.0])
def test_max_error_picks_the_fewest_bytes_within_the_bound(tmp_path, bound, form):
    adapter = read_adapter(SINGLE_FIXTURE)
    choice = choose_precision(adapter, bound, form)
    assert choice.max_rel_error <= bound
    ordered = candidates(adapter, form)
    position = ordered.index((choice.bank, choice.weights))
    assert choice.tried == position + 1
    for bank, weights in ordered[:position]:  # every smaller candidate was measured over the bound
        assert measured_error(adapter, bank, weights) > bound
    if bound == 0.0:
        assert (choice.bank, choice.weights) == (BankDtype.FLOAT32, WeightsDtype.FLOAT32)
    (chosen,) = convert_choosing(SINGLE_FIXTURE, tmp_path / "x", to=form, max_error=bound)
    assert chosen == choice
    written = read_adapter(tmp_path / "x")
    assert written.form.value == form and (written.packing.bank, written.packing.weights) == (
        choice.bank,
        choice.weights,
    )
    assert verify_adapters(read_adapter(SINGLE_FIXTURE), written).max_rel_error <= bound + 1e-6


@pytest.mark.parametrize("bank, weights", [("int8", "fixed8"), ("float16", "float16"), ("int4", "fixed8")])
def test_max_error_measures_what_verify_reports(tmp_path, bank, weights):
    """One metric: the error ``--max-error`` measures is the one ``verify`` prints for the written file."""
    convert(SINGLE_FIXTURE, tmp_path / "topk", to="topk")
    convert(SINGLE_FIXTURE, tmp_path / "lossy", to="compressed", bank_dtype=bank, weights_dtype=weights)
    reported = verify_adapters(read_adapter(tmp_path / "topk"), read_adapter(tmp_path / "lossy")).max_rel_error
    measured = measured_error(read_adapter(SINGLE_FIXTURE), BankDtype(bank), WeightsDtype(weights))
    assert reported > 0 and measured == pytest.approx(reported, rel=1e-6)


def test_candidates_are_ordered_by_the_bytes_of_the_target_form(tmp_path):
    adapter = read_adapter(SINGLE_FIXTURE)
    lossless, smallest = (BankDtype.FLOAT32, WeightsDtype.FLOAT32), (BankDtype.INT4, WeightsDtype.FIXED8)
    for form in ("packed", "compressed"):
        ordered = candidates(adapter, form)
        assert len(ordered) == len(BankDtype) * len(WeightsDtype) == len(set(ordered))
        assert ordered.index(smallest) < ordered.index(lossless)
        sizes = []
        for bank, weights in (smallest, lossless):  # the files agree with the order
            folder = tmp_path / f"{form}-{bank.value}-{weights.value}"
            convert(SINGLE_FIXTURE, folder, to=form, bank_dtype=bank, weights_dtype=weights)
            sizes.append(read_adapter(folder).file_bytes)
        assert sizes[0] < sizes[1]
    assert candidates(adapter, "packed")[0] == smallest and candidates(adapter, "packed")[-1] == lossless


def test_max_error_on_the_command_line(tmp_path):
    result = run_cli("convert", SINGLE_FIXTURE, tmp_path / "x", "--to", "compressed", "--max-error", "0.01")
    assert result.exit_code == 0, result.output
    assert "chose" in result.stderr and "<= 0.01" in result.stderr
    for args, message in (
        (["--to", "topk", "--max-error", "0.01"], "--max-error applies to the forms with a precision"),
        (["--to", "packed", "--max-error", "0.01", "--bank-dtype", "int8"], "chooses --bank-dtype"),
        (["--to", "packed", "--max-error", "0.01", "--weights-dtype", "float32"], "chooses --bank-dtype"),
    ):
        failed = run_cli("convert", SINGLE_FIXTURE, tmp_path / "y", *args)
        assert failed.exit_code == 2 and message in failed.stderr
    with pytest.raises(UnsupportedConversionError):
        convert(SINGLE_FIXTURE, tmp_path / "z", to="full", max_error=0.1)
