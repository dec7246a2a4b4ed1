"""Hostile packed and compressed files: each refused in one line by every command and the engine.

Every file here is made by the test from the PEFT-made fixture: its packed and
compressed forms with one thing forged (a number that is no integer, a restore
dtype the encoder never writes, weights off the simplex, a duplicate module, a
mixed file, a trailing frame, a decompression bomb, ...).  Each goes through
``inspect``, ``report``, ``convert`` to every form, ``verify``, ``export-lora``
and ``VBLoRAModel.from_pretrained``: exit code 2, one line naming the file,
never "unexpected", nothing left beside the destination, the input unchanged.
The bomb runs in a subprocess under an address-space limit
(docs/reliability.md, "Memory").
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, SINGLE_FIXTURE, leftovers, run_cli, snapshot, tiny_llama
from vblora_store import VBLoRAStoreError, convert, read_adapters
from vblora_store.format.codecs import compressed, packed_metadata
from vblora_store.storage_forms import StorageForm

WEIGHTS = "adapter_model.safetensors"
BIG = "__1e400__"  # stands for the JSON number 1e400, which Python's json cannot write


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The fixture in the forms the cases damage."""
    root = tmp_path_factory.mktemp("hostile-sources")
    shutil.copytree(SINGLE_FIXTURE, root / "full")
    config = json.loads((root / "full" / "adapter_config.json").read_text())
    shutil.copytree(SINGLE_FIXTURE, root / "full-k3")
    (root / "full-k3" / "adapter_config.json").write_text(json.dumps({**config, "topk": 3}))
    made = {
        "z": ("full", dict(to="compressed")),
        "packed": ("full", dict(to="packed")),
        "packed-f16": ("full", dict(to="packed", weights_dtype="float16")),
        "packed-fixed8": ("full", dict(to="packed", weights_dtype="fixed8")),
        "packed-k3-fixed16": ("full-k3", dict(to="packed", weights_dtype="fixed16")),
        "packed-int4": ("full", dict(to="packed", bank_dtype="int4")),
        "packed-int8": ("full", dict(to="packed", bank_dtype="int8")),
    }
    for name, (source, options) in made.items():
        convert(root / source, root / name, **options)
    return {name: root / name for name in (*made, "full")}


def forged(source: Path, work: Path, change) -> Path:
    """A copy of ``source`` whose tensors and metadata ``change(tensors, outer, packed)`` edited in place.

    ``outer`` is the file's own metadata (the compressed form's, or the packed form's), ``packed`` the
    packed form's (inside the compressed form's, or the same).  ``BIG`` anywhere becomes ``1e400``.
    """
    folder = Path(shutil.copytree(source, work / "adapter"))
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = compressed.METADATA_KEY if compressed.METADATA_KEY in metadata else packed_metadata.METADATA_KEY
    outer = json.loads(metadata[key])
    inner = json.loads(outer["packed"]) if key == compressed.METADATA_KEY else outer
    change(tensors, outer, inner)
    if key == compressed.METADATA_KEY:
        outer["packed"] = json.dumps(inner, sort_keys=True, separators=(",", ":")).replace(
            f'"{BIG}"', "1e400"
        )
    metadata[key] = json.dumps(outer, sort_keys=True, separators=(",", ":")).replace(f'"{BIG}"', "1e400")
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)
    return folder


# -- the forgeries ------------------------------------------------------------------------------

BANK, BLOB = "vblora_packed.bank", "vblora_compressed.vblora_packed.bank"


def _set(path: str, value):
    """A change setting field ``path`` of ``outer`` or ``packed`` (its first word).

    ``path`` is ``/``-separated; digits index lists.
    """
    where, *keys = path.split("/")

    def change(tensors, outer, packed):
        node = outer if where == "outer" else packed
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        node[int(last) if last.isdigit() else last] = value

    return change


def _first_zstd(outer) -> tuple[int, int, int]:
    """``(plane index, start, size)`` of the bank's first zstd plane."""
    planes = outer["tensors"][BANK]["planes"]
    index = next(i for i, (_, kind) in enumerate(planes) if kind == "zstd")
    return index, sum(size for size, _ in planes[:index]), planes[index][0]


def _reframe(make):
    """A change replacing the bank's first zstd frame by ``make(frame, plane)``, its stated size updated."""
    import zstandard

    def change(tensors, outer, packed):
        index, start, size = _first_zstd(outer)
        blob = tensors[BLOB].numpy().tobytes()
        frame = blob[start : start + size]
        new = make(frame, zstandard.ZstdDecompressor().decompress(frame))
        tensors[BLOB] = torch.frombuffer(
            bytearray(blob[:start] + new + blob[start + size :]), dtype=torch.uint8
        )
        outer["tensors"][BANK]["planes"][index][0] = len(new)

    return change


def _no_content_size(frame, plane):
    import zstandard

    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(plane)


def _tensor(key, value):
    def change(tensors, outer, packed):
        tensors[key] = value

    return change


def _edit(key, edit):
    def change(tensors, outer, packed):
        edit(tensors[key])

    return change


def _row_to(value):
    def edit(weights):
        weights[0] = value

    return edit


def _i8_blob(tensors, outer, packed):
    tensors[BLOB] = tensors[BLOB].view(torch.int8)


def _row_of_ones(tensors, outer, packed):
    """A fixed-point row decoding to all ones, within a valid range ``[0, 1]``: the row sums to k - 1."""
    tensors["vblora_packed.weights_range"] = torch.tensor([0.0, 1.0])
    tensors["vblora_packed.weights"][0] = torch.iinfo(tensors["vblora_packed.weights"].dtype).max


Z, F16, FIXED8 = "z", "packed-f16", "packed-fixed8"
CASES = {
    # numbers that are no integers, in the compressed form's metadata and the packed form's inside it
    "plane-size-infinity": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", math.inf), "not an integer"),
    "plane-size-1e400": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", BIG), "not an integer"),
    "shape-infinity": (Z, _set(f"outer/tensors/{BANK}/shape/0", math.inf), "not an integer"),
    "shape-1e400": (Z, _set(f"outer/tensors/{BANK}/shape/0", BIG), "not an integer"),
    "plane-size-negative": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", -1), "not an integer"),
    "plane-size-fraction": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", 1024.5), "not an integer"),
    "plane-size-string": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", "1024"), "not an integer"),
    "plane-size-bool": (Z, _set(f"outer/tensors/{BANK}/planes/0/0", True), "not an integer"),
    "level-nan": (Z, _set("outer/level", math.nan), "level is nan, not an integer"),
    "index-bits-fraction": (Z, _set("packed/index_bits", 6.5), "index_bits is 6.5, not an integer"),
    "index-bits-float": (Z, _set("packed/index_bits", 6.0), "index_bits is 6.0, not an integer"),
    "features-fraction": (Z, _set("packed/modules/0/1", 64.5), "in_features is 64.5"),
    "features-infinity": (Z, _set("packed/modules/0/2", math.inf), "out_features is inf"),
    "module-name-integer": (Z, _set("packed/modules/0/0", 7), "with a name string"),
    "num-slots": (Z, _set("packed/num_slots", 1), "num_slots is 1 but"),
    "num-slots-nan": (Z, _set("packed/num_slots", math.nan), "num_slots is nan"),
    "version-integer": (Z, _set("outer/version", 1), 'version is 1, not a string such as "1"'),
    "packed-version-integer": (Z, _set("packed/version", 1), 'version is 1, not a string such as "1"'),
    # restore dtypes the encoder never writes
    "restore-weights-float8-e5m2": (Z, _set("packed/restore_weights_dtype", "float8_e5m2"), "float8_e5m2"),
    "restore-bank-float8-e4m3fn": (Z, _set("packed/restore_bank_dtype", "float8_e4m3fn"), "float8_e4m3fn"),
    "restore-bank-float8-e4m3": (F16, _set("packed/restore_bank_dtype", "float8_e4m3"), "float8_e4m3"),
    # a module twice
    "duplicate-module": (
        Z,
        lambda t, o, p: p["modules"][1].__setitem__(0, p["modules"][0][0]),
        "listed twice",
    ),
    # frames: no content size, trailing bytes, a second frame
    "frame-no-content-size": (Z, _reframe(_no_content_size), "declares no content size"),
    "frame-trailing-bytes": (Z, _reframe(lambda frame, plane: frame + b"junk"), "followed by 4 more bytes"),
    "frame-second-frame": (Z, _reframe(lambda frame, plane: frame + frame), "followed by"),
    # mixed files, unlisted tensors, the wrong blob dtype
    "mixed-plain-packed-bank": (Z, _tensor(BANK, torch.zeros(64, 16)), "uncompressed beside"),
    "mixed-peft-bank": (Z, _tensor("base_model.vblora_vector_bank", torch.zeros(64, 16)), "a mixed file"),
    "mixed-peft-topk": (
        "packed",
        _tensor("base_model.model.x.vblora_logits_A_topk_weights", torch.zeros(4, 1, 1)),
        "a mixed file",
    ),
    "unlisted-compressed-tensor": (
        Z,
        _tensor("vblora_compressed.vblora_packed.extra", torch.zeros(4, dtype=torch.uint8)),
        "does not list",
    ),
    "i8-blob": (Z, _i8_blob, "not a 1-D uint8 tensor"),
    # lossy values off the simplex, out of their range or width
    "f16-weight-50": (F16, _edit("vblora_packed.weights", lambda w: w[0].fill_(50.0)), "summing to 50"),
    "f16-weight-negative": (
        F16,
        _edit("vblora_packed.weights", lambda w: w[0].fill_(-3.0)),
        "negative weight",
    ),
    "f16-row-2": (F16, _edit("vblora_packed.weights", _row_to(2.0)), "summing to 2"),
    "f16-weight-nan": (F16, _edit("vblora_packed.weights", _row_to(math.nan)), "NaN"),
    "fixed8-range-nan": (
        FIXED8,
        _edit("vblora_packed.weights_range", lambda r: r.__setitem__(1, math.nan)),
        "range",
    ),
    "fixed8-range-reversed": (
        FIXED8,
        _tensor("vblora_packed.weights_range", torch.tensor([1.0, 0.0])),
        "range",
    ),
    "fixed8-range-wide": (
        FIXED8,
        _tensor("vblora_packed.weights_range", torch.tensor([0.0, 1000.0])),
        "range",
    ),
    "fixed8-range-negative": (
        FIXED8,
        _tensor("vblora_packed.weights_range", torch.tensor([-5.0, -1.0])),
        "range",
    ),
    "fixed16-k3-row-sum-2": ("packed-k3-fixed16", _row_of_ones, "summing to 2,"),
    "int4-code-0": ("packed-int4", _edit(BANK, lambda b: b.__setitem__(0, 0)), r"code outside \[-7, 7\]"),
    "int8-code-128": (
        "packed-int8",
        _edit(BANK, lambda b: b.__setitem__((0, 0), -128)),
        r"outside \[-127, 127\]",
    ),
    "negative-scale": (
        "packed-int8",
        _edit("vblora_packed.bank_scale", lambda s: s.__setitem__(0, -1.0)),
        "scales",
    ),
    "nan-scale": (
        "packed-int4",
        _edit("vblora_packed.bank_scale", lambda s: s.__setitem__(0, math.nan)),
        "scales",
    ),
}


def _refused_everywhere(adapter: Path, reference: Path) -> None:
    """Every command exits 2 with one line, no "unexpected"; no destination, no leftovers; input unchanged."""
    before = snapshot(adapter)
    out = adapter.parent / "out"
    commands = [("inspect", adapter), ("report", adapter), ("verify", reference, adapter)]
    commands += [("convert", adapter, out / form.value, "--to", form.value) for form in StorageForm]
    commands += [("export-lora", adapter, out / "lora")]
    for command in commands:
        result = run_cli(*command)
        assert result.exit_code == 2, (command, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, result.stderr)
        assert "unexpected" not in lines[0] and str(adapter) in lines[0], (command, lines[0])
    assert not out.exists() or (list(out.iterdir()) == [] and leftovers(out) == [])
    assert leftovers(adapter.parent) == []
    assert snapshot(adapter) == before, "an input file was modified"


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_file_is_refused_by_every_command_and_the_engine(sources, tmp_path, case):
    from vblora_store.engine import VBLoRAModel

    source, change, message = CASES[case]
    adapter = forged(sources[source], tmp_path, change)
    with pytest.raises(VBLoRAStoreError, match=message):
        read_adapters(adapter)
    _refused_everywhere(adapter, sources["full"])
    with pytest.raises(VBLoRAStoreError, match=message):
        VBLoRAModel.from_pretrained(tiny_llama(), adapter)


def test_the_unforged_sources_are_read(sources):
    """Every forgery starts from a file that reads cleanly: what is refused is the forgery."""
    for folder in sources.values():
        for adapter in read_adapters(folder):
            adapter.check_values()


# -- the decompression bomb, under an address-space limit ---------------------------------------------

#: Virtual memory a command may use beyond what Python, torch and vblora_store take before it reads a byte.
HEADROOM = 512 << 20


def bomb(folder: Path) -> Path:
    """Issue 18's bomb: N=32768, L=8192, one 8192x8192 module; the float32 bank (1 GiB) in 4 zstd frames of
    256 MiB of zeros each, correctly declared and checksummed.  About 40 KB on disk."""
    import zstandard

    from vblora_store.format.bitpack import packed_size

    n, length, r, k = 32768, 8192, 4, 2
    config = json.loads((SINGLE_FIXTURE / "adapter_config.json").read_text())
    config.update(num_vectors=n, vector_length=length, r=r, topk=k, save_only_topk_weights=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    plane = n * length
    stream = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj(size=plane)
    frame = b"".join([*(stream.compress(bytes(1 << 20)) for _ in range(plane >> 20)), stream.flush()])
    slots = 2 * r
    packed = {
        "bank_dtype": "float32", "format": "vblora-packed", "index_bits": 15,
        "modules": [["fc", length, length]], "num_slots": slots, "restore_bank_dtype": "float32",
        "restore_weights_dtype": "float32", "version": "1", "weights_dtype": "float32",
    }  # fmt: skip
    weights = torch.full((slots, k - 1), 0.5)
    weight_planes = [bytes(weights.view(torch.uint8).reshape(-1, 4)[:, j].tolist()) for j in range(4)]
    description = {
        "codec": "zstd", "format": "vblora-compressed", "level": 1, "version": "1",
        "packed": json.dumps(packed, sort_keys=True, separators=(",", ":")),
        "tensors": {
            BANK: {"dtype": "F32", "shape": [n, length], "planes": [[len(frame), "zstd"]] * 4},
            "vblora_packed.weights": {
                "dtype": "F32", "shape": [slots, k - 1], "planes": [[slots, "raw"]] * 4
            },
        },
    }  # fmt: skip
    tensors = {
        BLOB: torch.frombuffer(bytearray(frame * 4), dtype=torch.uint8),
        "vblora_compressed.vblora_packed.weights": torch.frombuffer(
            bytearray(b"".join(weight_planes)), dtype=torch.uint8
        ),
        "vblora_packed.indices": torch.zeros(packed_size(slots * k, 15), dtype=torch.uint8),
    }
    metadata = {compressed.METADATA_KEY: json.dumps(description, sort_keys=True, separators=(",", ":"))}
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)
    return folder


def factor_bomb(folder: Path) -> Path:
    """PEFT's own top-k form, one module of r = 2**14 slots a side and L = 2**16 (N = 2, k = 2): under 1 MB
    on disk, but its dense factors A (r, in) and B (out, r) would take 16 GiB in float64."""
    n, length, r, k = 2, 1 << 16, 1 << 14, 2
    config = json.loads((SINGLE_FIXTURE / "adapter_config.json").read_text())
    config.update(num_vectors=n, vector_length=length, r=r, topk=k, save_only_topk_weights=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.fc.vblora_logits_"
    tensors = {"base_model.vblora_vector_bank": torch.zeros(n, length)}
    for side, shape in (("A", (r, 1)), ("B", (1, r))):
        tensors[f"{prefix}{side}_topk_indices"] = torch.tensor([0, 1], dtype=torch.uint8).repeat(*shape, 1)
        tensors[f"{prefix}{side}_topk_weights"] = torch.full((*shape, k - 1), 0.5)
    save_file(tensors, str(folder / WEIGHTS))
    return folder


def test_a_genuine_topk_one_adapter_is_not_taken_for_a_factor_bomb(tmp_path):
    """k = 1 stores one uint8 index a slot and builds L float64 values from it: PEFT's top-k form of such an
    adapter has factors 8·L times its file (8192x at L = 1024), and must read (the bound is 16384x)."""
    n, length, r, k = 2, 1 << 10, 1 << 15, 1
    config = json.loads((SINGLE_FIXTURE / "adapter_config.json").read_text())
    config.update(num_vectors=n, vector_length=length, r=r, topk=k, save_only_topk_weights=True)
    folder = tmp_path / "k1"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.fc.vblora_logits_"
    tensors = {"base_model.vblora_vector_bank": torch.rand(n, length)}
    for side, shape in (("A", (r, 1)), ("B", (1, r))):
        tensors[f"{prefix}{side}_topk_indices"] = torch.randint(0, n, (*shape, k), dtype=torch.uint8)
        tensors[f"{prefix}{side}_topk_weights"] = torch.zeros((*shape, k - 1))
    save_file(tensors, str(folder / WEIGHTS))
    factors = 8 * r * 2 * length
    assert factors > 4096 * folder.joinpath(WEIGHTS).stat().st_size + (16 << 20)  # refused by a 4096x bound
    result = run_cli("inspect", folder)
    assert result.exit_code == 0, result.stderr


#: Runs each command (JSON argv lists) in turn under RLIMIT_AS = (virtual memory after the imports) +
#: HEADROOM, and prints their exit codes and stderr as JSON.
LIMITED = """
import json, resource, sys
import torch, vblora_store, vblora_store.cli, vblora_store.engine, vblora_store.format
from click.testing import CliRunner
from vblora_store.engine import VBLoRAModel
peak = int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (peak + {headroom}, resource.RLIM_INFINITY))
results = []
for args in json.loads(sys.argv[1]):
    if args[0] == "from_pretrained":
        base = torch.nn.Sequential()
        base.add_module("fc", torch.nn.Linear(8, 8))
        try:
            VBLoRAModel.from_pretrained(base, args[1])
            results.append((0, ""))
        except vblora_store.VBLoRAStoreError as e:
            results.append((2, f"error: {{e}}\\n"))
        continue
    result = CliRunner().invoke(vblora_store.cli.main, args)
    results.append((result.exit_code, result.stderr))
print(json.dumps(results))
"""


@pytest.mark.parametrize(
    "make, size, message",
    [(bomb, 64 << 10, "bytes of decoded data"), (factor_bomb, 1 << 20, "bytes of dense factors")],
    ids=["zstd-bomb", "factor-bomb"],
)
def test_a_bomb_is_refused_within_bounded_memory(sources, tmp_path, make, size, message):
    adapter = make(tmp_path / "bomb")
    assert adapter.joinpath(WEIGHTS).stat().st_size < size
    before = snapshot(adapter)
    out = tmp_path / "out"
    runs = [("inspect", adapter), ("report", adapter), ("verify", sources["full"], adapter)]
    runs += [("convert", adapter, out / form.value, "--to", form.value) for form in StorageForm]
    runs += [("export-lora", adapter, out / "lora"), ("from_pretrained", adapter)]
    argv = json.dumps([list(map(str, args)) for args in runs])
    process = subprocess.run(
        [sys.executable, "-c", LIMITED.format(headroom=HEADROOM), argv],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    for args, (code, stderr) in zip(runs, json.loads(process.stdout)):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, stderr[-2000:])
        assert message in lines[0] and "unexpected" not in lines[0], lines[0]
    assert not out.exists() or leftovers(out) == []
    assert snapshot(adapter) == before
