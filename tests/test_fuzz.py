"""Fuzzing: damaged and hostile adapters never crash a command, never leave a partial destination.

Every example starts from real files (the PEFT-made fixture, and its top-k,
packed, compressed (lossless and int4) and ``.bin`` forms), damages them
(truncation, byte overwrites in the header and the data, hostile header JSON,
hostile config values, damaged packed and compressed metadata) and runs ``inspect``, ``report``, ``convert`` and ``verify``.  Each
must exit 0 (or 1 for ``verify``: the values changed) or 2 with a one-line
message: never a traceback, never "unexpected" (a check the library missed).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import ROOT, SINGLE_FIXTURE, leftovers, run_cli, snapshot
from vblora_store import VBLoRAStoreError, convert, read_adapters
from vblora_store.format.codecs import compressed
from vblora_store.format.codecs.packed_metadata import METADATA_KEY
from vblora_store.usage import bank_usage

CONFIG, WEIGHTS, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
FORMS = ("full", "topk", "packed", "compressed", "compressed-int4", "bin")
FUZZ = settings(
    max_examples=25,
    deadline=10_000,  # ms per example: a hang fails the test
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The fixture in each form: PEFT's full save, our top-k and packed conversions, and a ``.bin`` copy."""
    root = tmp_path_factory.mktemp("fuzz-sources")
    shutil.copytree(SINGLE_FIXTURE, root / "full")
    convert(root / "full", root / "topk", to="topk")
    convert(root / "full", root / "packed", to="packed")
    convert(root / "full", root / "compressed", to="compressed")
    convert(
        root / "full", root / "compressed-int4", to="compressed", bank_dtype="int4", weights_dtype="fixed8"
    )
    (root / "bin").mkdir()
    shutil.copy(SINGLE_FIXTURE / CONFIG, root / "bin" / CONFIG)
    torch.save(load_file(str(SINGLE_FIXTURE / WEIGHTS)), root / "bin" / WEIGHTS_BIN)
    return {form: root / form for form in FORMS}


def weights_file(folder: Path) -> Path:
    return folder / (WEIGHTS_BIN if (folder / WEIGHTS_BIN).exists() else WEIGHTS)


def damaged_copy(sources: dict[str, Path], form: str, work: Path) -> Path:
    """A fresh copy of one form under ``work`` (emptied first: hypothesis reuses the test's tmp_path)."""
    shutil.rmtree(work, ignore_errors=True)
    return Path(shutil.copytree(sources[form], work / "adapter"))


def assert_commands_behave(adapter: Path, reference: Path) -> None:
    """inspect, report, convert (both targets) and verify: clean exit codes, clean messages, no partial output."""
    before = snapshot(adapter)
    out = adapter.parent / "out"
    commands = [("inspect", adapter), ("report", adapter, "--format", "json"), ("verify", reference, adapter)]
    commands += [("convert", adapter, out / to, "--to", to) for to in ("topk", "packed", "compressed")]
    for command in commands:
        result = run_cli(*command)
        allowed = {0, 1, 2} if command[0] == "verify" else {0, 2}
        assert result.exit_code in allowed, (command, result.output)
        missed_check = "Traceback" in result.stderr or "unexpected" in result.stderr
        assert not missed_check, (command, result.stderr)
        if result.exit_code == 2:
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        if command[0] == "convert":
            dst = Path(command[2])
            assert dst.exists() == (result.exit_code == 0), command
            if dst.parent.exists():
                assert leftovers(dst.parent) == []
    try:  # bank usage (report --plot) reads every index: the library call, without matplotlib
        for stored in read_adapters(adapter):
            bank_usage(stored)
    except VBLoRAStoreError:
        pass
    assert snapshot(adapter) == before, "an input file was modified"


# -- byte damage of the weights file ---------------------------------------------------------------


@FUZZ
@given(form=st.sampled_from(FORMS), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_weights_file(sources, tmp_path, form, cut):
    adapter = damaged_copy(sources, form, tmp_path)
    path = weights_file(adapter)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    assert_commands_behave(adapter, sources["full"])


@FUZZ
@given(
    form=st.sampled_from(FORMS),
    where=st.floats(0, 1, exclude_max=True),
    in_header=st.booleans(),
    junk=st.binary(min_size=1, max_size=16),
)
def test_overwritten_bytes_in_header_or_data(sources, tmp_path, form, where, in_header, junk):
    adapter = damaged_copy(sources, form, tmp_path)
    path = weights_file(adapter)
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0] if form != "bin" else len(data) // 4
    start, stop = (0, header_end) if in_header else (header_end, len(data))
    offset = start + int(where * (stop - start))
    data[offset : offset + len(junk)] = junk
    path.write_bytes(bytes(data))
    assert_commands_behave(adapter, sources["full"])


# -- hostile safetensors headers -------------------------------------------------------------------

HUGE = 10**9
hostile_shapes = st.sampled_from(
    [[HUGE, HUGE], [-1, 4], [2**64, 1], [0], [], [4, 0, 64], "64", [1.5, 2], None]
)
hostile_offsets = st.sampled_from(
    [[0, 2**62], [-8, 8], [8, 0], [0, 0], [0, 10**12], [4, 8], ["0", "8"], [0], None, [0, 8, 16]]
)
hostile_dtypes = st.sampled_from(["F8_E4M3", "I64", "BOOL", "U8", "C64", "", "F16", 7])


def rewrite_header(path: Path, edit) -> None:
    """Parse the safetensors header, let ``edit`` change the dict, write it back before the same data."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


@FUZZ
@given(
    form=st.sampled_from(("full", "topk", "packed", "compressed")),
    pick=st.integers(0, 10**6),
    field=st.sampled_from(("shape", "data_offsets", "dtype", "drop", "metadata")),
    shape=hostile_shapes,
    offsets=hostile_offsets,
    dtype=hostile_dtypes,
    metadata=st.one_of(
        st.text(max_size=30), st.just("[" * 5000 + "]" * 5000), st.just('{"format": "vblora-packed"}')
    ),
)
@example(form="packed", pick=0, field="metadata", shape=None, offsets=None, dtype="F32", metadata="[" * 5000)
def test_hostile_header_values(sources, tmp_path, form, pick, field, shape, offsets, dtype, metadata):
    adapter = damaged_copy(sources, form, tmp_path)

    def edit(header: dict) -> None:
        keys = [k for k in header if k != "__metadata__"]
        key = keys[pick % len(keys)]
        if field == "drop":
            del header[key]
        elif field == "metadata":
            key = {"packed": METADATA_KEY, "compressed": compressed.METADATA_KEY}.get(form, "format")
            header["__metadata__"] = {key: metadata}
        else:
            header[key][field] = {"shape": shape, "data_offsets": offsets, "dtype": dtype}[field]

    rewrite_header(adapter / WEIGHTS, edit)
    assert_commands_behave(adapter, sources["full"])


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<Q", 2**63) + b"{}",  # header length past the file
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",  # not UTF-8
        struct.pack("<Q", 20_002) + b"[" * 10_001 + b"]" * 10_001,  # deep JSON
        b"",  # empty file
    ],
    ids=["huge-length", "non-utf8", "deep-json", "empty"],
)
def test_unreadable_header_is_one_line(sources, tmp_path, header):
    adapter = damaged_copy(sources, "full", tmp_path)
    (adapter / WEIGHTS).write_bytes(header)
    assert_commands_behave(adapter, sources["full"])


# -- hostile configs and packed metadata -----------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
    ),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = ("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "peft_type", "bias",
               "vblora_dropout", "target_modules", "init_logits_std", "layers_pattern", "fan_in_fan_out")  # fmt: skip


@FUZZ
@given(
    form=st.sampled_from(FORMS),
    key=st.sampled_from(CONFIG_KEYS),
    value=st.one_of(json_values, st.sampled_from([0, -4, 1, 3, 65, 63, 2**31, 10**12, "4", 4.0, True])),
)
@example(form="full", key="topk", value=1)  # a full adapter fits any topk; packing k - 1 = 0 weights
@example(form="topk", key="num_vectors", value=10**12)
def test_hostile_config_values(sources, tmp_path, form, key, value):
    adapter = damaged_copy(sources, form, tmp_path)
    config = json.loads((adapter / CONFIG).read_text())
    config[key] = value
    (adapter / CONFIG).write_text(json.dumps(config))
    assert_commands_behave(adapter, sources["full"])


@pytest.mark.parametrize(
    "text",
    [b"", b"[]", b"\xff\xfe", b"[" * 100_000, b'{"peft_type": "VBLORA", "r": 1e999}', b"null"],
    ids=["empty", "list", "non-utf8", "deep", "infinite-r", "null"],
)
def test_unreadable_config_is_one_line(sources, tmp_path, text):
    adapter = damaged_copy(sources, "full", tmp_path)
    (adapter / CONFIG).write_bytes(text)
    assert_commands_behave(adapter, sources["full"])


packed_fields = st.sampled_from(
    ("format", "version", "index_bits", "num_slots", "weights_dtype", "bank_dtype", "restore_weights_dtype",
     "restore_bank_dtype", "modules")
)  # fmt: skip
packed_modules = st.one_of(
    json_values,
    st.lists(
        st.tuples(st.text(max_size=5), st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40)), max_size=3
    ),
    st.just([["m", 1e308, 16]]),
)


@FUZZ
@given(field=packed_fields, value=st.one_of(json_values, packed_modules), drop=st.booleans())
@example(field="modules", value=[["m", float("inf"), 16]], drop=False)  # int(inf): OverflowError
def test_hostile_packed_metadata(sources, tmp_path, field, value, drop):
    adapter = damaged_copy(sources, "packed", tmp_path)

    def edit(header: dict) -> None:
        description = json.loads(header["__metadata__"][METADATA_KEY])
        if drop:
            del description[field]
        else:
            description[field] = value
        header["__metadata__"][METADATA_KEY] = json.dumps(description, allow_nan=True)

    rewrite_header(adapter / WEIGHTS, edit)
    assert_commands_behave(adapter, sources["full"])


compressed_fields = st.sampled_from(("format", "version", "codec", "level", "packed", "tensors"))
plane_lists = st.lists(
    st.tuples(st.integers(-(2**40), 2**40), st.sampled_from(("zstd", "raw", "lzma"))), max_size=5
)
tensor_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(("F32", "F16", "U8", "I64", "Z9")), "shape": st.one_of(json_values, st.just([64, 16])),
     "planes": st.one_of(json_values, plane_lists)}
)  # fmt: skip


@FUZZ
@given(
    field=compressed_fields,
    value=st.one_of(json_values, st.dictionaries(st.sampled_from(("vblora_packed.bank", "vblora_packed.weights",
                                                                   "other")), tensor_entries, max_size=2)),
    drop=st.booleans(),
)  # fmt: skip
def test_hostile_compressed_metadata(sources, tmp_path, field, value, drop):
    adapter = damaged_copy(sources, "compressed", tmp_path)

    def edit(header: dict) -> None:
        description = json.loads(header["__metadata__"][compressed.METADATA_KEY])
        if drop:
            del description[field]
        else:
            description[field] = value
        header["__metadata__"][compressed.METADATA_KEY] = json.dumps(description, allow_nan=True)

    rewrite_header(adapter / WEIGHTS, edit)
    assert_commands_behave(adapter, sources["full"])


# -- sizes the file cannot back: refused before any allocation --------------------------------------


def huge_index_topk(sources: dict[str, Path], work: Path) -> Path:
    """A top-k adapter whose int64 indices point 10**12 vectors past the bank (bincount would allocate 8 TB)."""
    adapter = damaged_copy(sources, "topk", work)
    tensors = load_file(str(adapter / WEIGHTS))
    for key in [k for k in tensors if k.endswith("_topk_indices")]:
        tensors[key] = torch.full_like(tensors[key], 10**12, dtype=torch.int64)
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})
    return adapter


def forged_zip_sizes(sources: dict[str, Path], work: Path) -> Path:
    """A ``.bin`` whose zip central directory declares a 4 GiB tensor record."""
    adapter = damaged_copy(sources, "bin", work)
    path = adapter / WEIGHTS_BIN
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(i.filename for i in archive.infolist() if "/data/" in i.filename).encode()
    entry = data.find(b"PK\x01\x02")  # a central directory entry: name at +46, uncompressed size at +24
    while data[entry + 46 : entry + 46 + len(name)] != name:
        entry = data.find(b"PK\x01\x02", entry + 4)
    struct.pack_into("<I", data, entry + 24, 2**32 - 1)
    path.write_bytes(bytes(data))
    return adapter


def huge_shape(sources: dict[str, Path], work: Path) -> Path:
    """A full adapter whose first logits tensor declares (10**9, 10**9) floats, offsets to match."""

    def edit(header: dict) -> None:
        key = next(k for k in header if "logits" in k)
        header[key].update(shape=[HUGE, HUGE], data_offsets=[0, 4 * HUGE * HUGE])

    return _with_header(sources, work, edit)


HOSTILE_SIZES = {
    "shape-1e9x1e9": huge_shape,
    "num_vectors-1e12": lambda sources, work: _with_config(sources, work, num_vectors=10**12),
    "index-1e12": huge_index_topk,
    "zip-size-4GB": forged_zip_sizes,
}


def _with_header(sources, work, edit) -> Path:
    adapter = damaged_copy(sources, "full", work)
    rewrite_header(adapter / WEIGHTS, edit)
    return adapter


def _with_config(sources, work, **values) -> Path:
    adapter = damaged_copy(sources, "full", work)
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, **values}))
    return adapter


@pytest.mark.parametrize("case", sorted(HOSTILE_SIZES))
def test_declared_sizes_are_refused_with_one_line(sources, tmp_path, case):
    adapter = HOSTILE_SIZES[case](sources, tmp_path / case)
    assert_commands_behave(adapter, sources["full"])
    result = run_cli("report", adapter, "--plot", tmp_path / "usage.png")  # bank usage: bincount
    assert result.exit_code == 2 and "unexpected" not in result.stderr, result.stderr


def test_declared_sizes_never_drive_memory(sources, tmp_path):
    """One process runs every command on every hostile-size adapter; its peak RSS stays far below 1 GiB."""
    folders = [HOSTILE_SIZES[case](sources, tmp_path / case) for case in sorted(HOSTILE_SIZES)]
    script = (
        "import resource, sys\n"
        "from click.testing import CliRunner\n"
        "from vblora_store.cli import main\n"
        "for folder in sys.argv[2:]:\n"
        "    for args in (['inspect', folder], ['report', folder, '--plot', folder + '.png'],\n"
        "                 ['verify', sys.argv[1], folder], ['convert', folder, folder + '-out']):\n"
        "        result = CliRunner().invoke(main, args)\n"
        "        assert result.exit_code in (0, 2) and 'unexpected' not in result.output, (args, result.output)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(sources["full"]), *map(str, folders)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
