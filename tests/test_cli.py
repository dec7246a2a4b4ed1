"""The ``vblora-store`` command line: inspect, report, thresholds, and clean refusals of bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import MULTI_FIXTURE, SINGLE_FIXTURE, leftovers, run_cli, run_module, snapshot

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

# The single fixture, derived by hand (see fixtures/make_fixtures.py): 2 layers of
# q/k/v/o (64 -> 64) and gate/up (64 -> 128), down (128 -> 64); r=4, N=64, L=16, k=2.
MODULES = [
    f"model.layers.{i}.{block}.{name}"
    for i in range(2)
    for block, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for name in names
]
SLOTS = 2 * (4 * 4 * (64 + 64) // 16 + 3 * 4 * (64 + 128) // 16)  # r*(in+out)/L summed = 544
FULL_PARAMS = 64 * 16 + SLOTS * 64
TOPK_PARAMS = 64 * 16 + SLOTS * (2 - 1) + SLOTS * 2 // 4  # uint8 indices count 1/4
LORA_PARAMS = SLOTS * 16  # r*(in+out) = slots * L

REPORT_KEYS = {
    "path", "adapter_name", "form", "r", "num_vectors", "vector_length", "topk", "num_modules", "file_bytes",
    "vblora_params", "other_params", "full_vblora_params", "topk_vblora_params", "lora_params",
    "compression_vs_full", "compression_vs_lora",
}  # fmt: skip


@pytest.fixture(scope="module")
def topk_folder(tmp_path_factory) -> Path:
    """The single fixture converted to top-k form."""
    dst = tmp_path_factory.mktemp("cli") / "topk"
    assert run_cli("convert", SINGLE_FIXTURE, dst).exit_code == 0
    return dst


# -- inspect -----------------------------------------------------------------------------------------------


def test_inspect_text_lists_form_every_module_and_tensor():
    """``inspect`` prints the form, each adapted module with its features, and each tensor."""
    result = run_cli("inspect", SINGLE_FIXTURE)
    assert result.exit_code == 0, result.stderr
    assert "full form" in result.stdout
    for name in MODULES:
        assert name in result.stdout
    assert "base_model.vblora_vector_bank" in result.stdout
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\s+in=128\s+out=64", result.stdout)


def test_inspect_json_parses_and_describes_each_adapter():
    """``inspect --json`` is one JSON object with an entry per adapter, modules and tensors included."""
    result = run_cli("inspect", MULTI_FIXTURE, "--json")
    assert result.exit_code == 0, result.stderr
    adapters = json.loads(result.stdout)["adapters"]
    assert [a["adapter_name"] for a in adapters] == ["default", "second"]
    default, second = adapters
    assert default["form"] == "full" and default["config"]["num_vectors"] == 64
    assert second["config"]["num_vectors"] == 300 and second["config"]["modules_to_save"] == ["norm"]
    assert {m["name"] for m in default["modules"]} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    on_disk = load_file(str(MULTI_FIXTURE / WEIGHTS))
    shapes = {t["key"]: t["shape"] for t in default["tensors"]}
    assert shapes == {k: list(v.shape) for k, v in on_disk.items()}
    assert default["file_bytes"] == (MULTI_FIXTURE / WEIGHTS).stat().st_size


# -- report ------------------------------------------------------------------------------------------------


def test_report_json_has_the_schema_and_hand_derived_numbers(topk_folder):
    """JSON report rows carry the documented keys; the numbers match the hand derivation above."""
    result = run_cli("report", SINGLE_FIXTURE, topk_folder, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["checks"] == []
    full, topk = data["adapters"]
    assert REPORT_KEYS <= set(full)
    assert full["form"] == "full" and topk["form"] == "topk"
    for row in (full, topk):
        assert (row["r"], row["num_vectors"], row["vector_length"], row["topk"]) == (4, 64, 16, 2)
        assert row["num_modules"] == 14
        assert (row["full_vblora_params"], row["topk_vblora_params"]) == (FULL_PARAMS, TOPK_PARAMS)
        assert row["lora_params"] == LORA_PARAMS
        assert row["other_params"] == 0
    assert full["vblora_params"] == FULL_PARAMS and topk["vblora_params"] == TOPK_PARAMS
    assert full["file_bytes"] == (SINGLE_FIXTURE / WEIGHTS).stat().st_size
    assert topk["file_bytes"] == (topk_folder / WEIGHTS).stat().st_size
    assert topk["compression_vs_full"] == pytest.approx(FULL_PARAMS / TOPK_PARAMS, abs=1e-4)
    assert topk["compression_vs_lora"] == pytest.approx(LORA_PARAMS / TOPK_PARAMS, abs=1e-4)


def test_report_text_shows_counts_per_adapter():
    """The text report has a header per adapter and the counts with thousands separators."""
    result = run_cli("report", SINGLE_FIXTURE)
    assert result.exit_code == 0, result.stderr
    assert f"{SINGLE_FIXTURE} [default]: full form" in result.stdout
    assert f"{FULL_PARAMS:,}" in result.stdout and f"{TOPK_PARAMS:,}" in result.stdout


def test_report_markdown_has_one_table_row_per_adapter():
    """Markdown output is a table with a row for each adapter of a multi-adapter folder."""
    result = run_cli("report", MULTI_FIXTURE, "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| adapter |") and set(lines[1]) <= set("|-: ")
    rows = [line for line in lines if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows[:2]] == ["`default`", "`second`"]


@pytest.mark.parametrize(
    "option, value, exit_code",
    [
        ("--max-bytes", "size", 0),  # equal to the file size: passes (<=)
        ("--max-bytes", "size-1", 1),
        ("--min-compression", "4.7", 0),  # LORA_PARAMS / TOPK_PARAMS = 8704 / 1840 = 4.73
        ("--min-compression", "4.8", 1),
    ],
)
def test_report_thresholds_set_the_exit_code(topk_folder, option, value, exit_code):
    """A threshold that every adapter meets exits 0; one that an adapter misses exits 1 and says FAIL."""
    size = (topk_folder / WEIGHTS).stat().st_size
    value = {"size": str(size), "size-1": str(size - 1)}.get(value, value)
    result = run_cli("report", topk_folder, option, value)
    assert result.exit_code == exit_code, result.output
    assert ("FAIL" in result.stdout) == (exit_code == 1)
    assert result.stderr == ""


def test_one_failing_adapter_fails_the_report():
    """With several paths, one adapter over the limit is enough for exit 1 (JSON: passed false)."""
    limit = (MULTI_FIXTURE / WEIGHTS).stat().st_size  # default passes, second (bigger) fails
    result = run_cli("report", MULTI_FIXTURE, "--max-bytes", limit, "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["passed"] is False
    assert [c["passed"] for c in data["checks"]] == [True, False]


# -- python -m vblora_store ----------------------------------------------------------------------------------


def test_python_m_runs_the_cli_end_to_end(tmp_path):
    """``python -m vblora_store`` converts and reports in a real process, exit 0."""
    convert = run_module("convert", SINGLE_FIXTURE, tmp_path / "out")
    assert convert.returncode == 0, convert.stderr
    report = run_module("report", tmp_path / "out", "--format", "json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["adapters"][0]["vblora_params"] == TOPK_PARAMS


def test_python_m_bad_input_exits_2_without_traceback(tmp_path):
    """In a real process too, a bad path gives exit 2 and one clean line on stderr."""
    result = run_module("inspect", tmp_path / "nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'nope'}: ")


def test_debug_flag_shows_the_traceback(tmp_path):
    """``--debug`` keeps exit 2 but adds the traceback, for bug reports."""
    result = run_cli("--debug", "inspect", tmp_path / "nope")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


# -- bad inputs: exit 2, a clear message, nothing written, input untouched ----------------------------------


def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data, indent=2))


def _edit_tensor(folder: Path, suffix: str, edit) -> None:
    """Apply ``edit`` to the first tensor whose key ends in ``suffix``, and save the file again."""
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors[next(k for k in tensors if k.endswith(suffix))])
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


# Each maker damages the good full (or top-k) copy and returns (source, extra CLI args, the
# path the message must name).


def missing_path(full, topk):
    return full.parent / "does-not-exist", [], full.parent / "does-not-exist"


def folder_without_config(full, topk):
    (full / CONFIG).unlink()
    return full, [], full


def config_not_json(full, topk):
    (full / CONFIG).write_text("{r: 4,")
    return full, [], full / CONFIG


def peft_type_lora(full, topk):
    _edit_config(full, peft_type="LORA")
    return full, [], full / CONFIG


def missing_weights_file(full, topk):
    (full / WEIGHTS).unlink()
    return full, [], full


def truncated_safetensors(full, topk):
    data = (full / WEIGHTS).read_bytes()
    (full / WEIGHTS).write_bytes(data[: len(data) // 3])  # the header survives, the tensor data does not
    return full, [], full / WEIGHTS


def garbage_safetensors(full, topk):
    (full / WEIGHTS).write_bytes(bytes(range(256)) * 8)
    return full, [], full / WEIGHTS


def num_vectors_edited(full, topk):
    _edit_config(full, num_vectors=65)  # the bank and logits say 64
    return full, [], full / WEIGHTS


def rank_edited(full, topk):
    _edit_config(full, r=8)  # the logits say 4
    return full, [], full / WEIGHTS


def nan_in_logits(full, topk):
    _edit_tensor(full, "vblora_logits_A", lambda t: t[0, 0].fill_(float("nan")))
    return full, [], full / WEIGHTS


def index_out_of_range_in_topk(full, topk):
    _edit_tensor(topk, "vblora_logits_B_topk_indices", lambda t: t[0, 0].fill_(200))  # num_vectors is 64
    return topk, [], topk / WEIGHTS


def topk_to_full(full, topk):
    return topk, ["--to", "full"], topk


def flag_says_topk_tensors_are_full(full, topk):
    _edit_config(full, save_only_topk_weights=True)
    return full, [], full / WEIGHTS


def flag_says_full_tensors_are_topk(full, topk):
    _edit_config(topk, save_only_topk_weights=False)
    return topk, [], topk / WEIGHTS


BAD_INPUTS = [
    missing_path, folder_without_config, config_not_json, peft_type_lora, missing_weights_file,
    truncated_safetensors, garbage_safetensors, num_vectors_edited, rank_edited, nan_in_logits,
    index_out_of_range_in_topk, topk_to_full, flag_says_topk_tensors_are_full,
    flag_says_full_tensors_are_topk,
]  # fmt: skip
# Found only when tensor data is read (convert), or only a conversion can get wrong.
DATA_OR_CONVERSION = (nan_in_logits, index_out_of_range_in_topk, topk_to_full)
HEADER_CASES = [make for make in BAD_INPUTS if make not in DATA_OR_CONVERSION]

ADVICE = re.compile(
    r"\b(check|point|restore|fetch|set|pass|choose|convert|copy|retrain|write|re-save|lower)\b", re.IGNORECASE
)


@pytest.fixture
def good_sources(tmp_path, topk_folder) -> tuple[Path, Path]:
    """Private copies of a good full adapter and a good top-k adapter."""
    src = tmp_path / "src"
    src.mkdir()
    full = Path(shutil.copytree(SINGLE_FIXTURE, src / "full"))
    return full, Path(shutil.copytree(topk_folder, src / "topk"))


def assert_clean_refusal(result, named: Path) -> None:
    """Exit 2; one or two lines on stderr naming ``named`` and advising a fix; no traceback, no stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert "unexpected" not in result.stderr, result.stderr  # a library error, not a caught bug
    assert str(named) in result.stderr, result.stderr
    assert ADVICE.search(result.stderr), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_to_convert_is_refused_cleanly(good_sources, tmp_path, make):
    """Each bad input: exit 2 with a clear message naming the file, nothing at DST, the input untouched."""
    src, args, named = make(*good_sources)
    before = snapshot(src)
    dst = tmp_path / "out" / "dst"
    result = run_cli("convert", src, dst, *args)
    assert_clean_refusal(result, named)
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    assert snapshot(src) == before


@pytest.mark.parametrize("make", HEADER_CASES, ids=lambda f: f.__name__)
def test_bad_input_to_inspect_and_report_is_refused_cleanly(good_sources, make):
    """Problems visible without reading tensor data stop ``inspect`` and ``report`` the same way."""
    src, _, named = make(*good_sources)
    before = snapshot(src)
    for command in (["inspect", src], ["report", src]):
        assert_clean_refusal(run_cli(*command), named)
    assert snapshot(src) == before


def test_existing_destination_is_refused_without_force(good_sources, tmp_path):
    """DST that exists: exit 2, the message names DST and --force, DST and SRC keep their bytes."""
    full, _ = good_sources
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    before_src, before_dst = snapshot(full), snapshot(dst)
    result = run_cli("convert", full, dst)
    assert_clean_refusal(result, dst)
    assert "--force" in result.stderr
    assert snapshot(dst) == before_dst and snapshot(full) == before_src
    assert leftovers(tmp_path) == []
    assert run_cli("convert", full, dst, "--force").exit_code == 0
    assert sorted(p.name for p in dst.iterdir()) == [CONFIG, WEIGHTS]


def test_destination_inside_source_is_refused(good_sources):
    """DST inside SRC: exit 2 even with --force, SRC untouched."""
    full, _ = good_sources
    before = snapshot(full)
    result = run_cli("convert", full, full / "topk", "--force")
    assert_clean_refusal(result, full / "topk")
    assert snapshot(full) == before


@pytest.mark.parametrize("command", ["inspect", "report", "verify", "convert", "export-lora"])
def test_every_result_prints_in_every_format_and_exits_by_its_result(command, tmp_path):
    """One protocol: ``--format text|json|markdown`` on every command that prints a result."""
    args = {
        "inspect": [SINGLE_FIXTURE], "report": [SINGLE_FIXTURE], "verify": [SINGLE_FIXTURE, SINGLE_FIXTURE],
        "convert": [SINGLE_FIXTURE, tmp_path / "out"], "export-lora": [SINGLE_FIXTURE, tmp_path / "out"],
    }[command]  # fmt: skip
    for fmt in ("text", "json", "markdown"):
        result = run_cli(
            command, *args, "--format", fmt, *(["--force"] if command in ("convert", "export-lora") else [])
        )
        assert result.exit_code == 0, result.output
        if fmt == "json":
            json.loads(result.stdout)
        if fmt == "markdown":
            assert "|" in result.stdout or result.stdout.startswith("wrote") or "- " in result.stdout
    assert (
        run_cli("inspect", SINGLE_FIXTURE, "--json").stdout
        == run_cli("inspect", SINGLE_FIXTURE, "--format", "json").stdout
    )
    for other in ("markdown", "text"):
        clash = run_cli("inspect", SINGLE_FIXTURE, "--json", "--format", other)
        assert clash.exit_code == 2 and clash.stdout == "" and clash.stderr.count("\n") == 1
        assert f"--json is --format json; it cannot go with --format {other}" in clash.stderr
