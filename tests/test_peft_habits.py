"""Defects found by trying the toolkit as a new user would, each fixed and pinned here."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import run_cli, snapshot
from conftest_engine import BASE_KWARGS, inputs, logits, peft_load, tiny_llama
from safetensors.torch import load_file, save_file

from vblora_store import convert, export_lora, read_adapter
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import InvalidAdapterError


@pytest.fixture(scope="module")
def minus_inf_adapter(tmp_path_factory):
    """A full-form adapter PEFT itself writes with -inf logits, and PEFT's top-k save of the same model."""
    tmp = tmp_path_factory.mktemp("minus-inf")
    base = tiny_llama()
    config = {**BASE_KWARGS, "target_modules": ["q_proj", "v_proj"], "save_only_topk_weights": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config)).save_pretrained(tmp / "topk")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "topk", is_trainable=True)
    loaded.peft_config["default"].save_only_topk_weights = False
    loaded.save_pretrained(tmp / "full")
    loaded.peft_config["default"].save_only_topk_weights = True
    loaded.save_pretrained(tmp / "topk-again")
    return base, tmp


def test_peft_s_minus_inf_logits_are_read_everywhere(minus_inf_adapter, tmp_path):
    base, tmp = minus_inf_adapter
    stored = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    assert any(bool(torch.isneginf(t).any()) for t in stored.values())  # PEFT's own encoding
    convert(tmp / "full", tmp_path / "topk")
    assert (tmp_path / "topk" / "adapter_model.safetensors").read_bytes() == (
        tmp / "topk-again" / "adapter_model.safetensors"
    ).read_bytes()
    result = run_cli("verify", tmp / "full", tmp / "topk")
    assert result.exit_code == 0, result.output
    export_lora(tmp / "full", tmp_path / "lora")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "full")
    assert torch.allclose(logits(ours, inputs()), logits(peft_load(base, tmp / "full"), inputs()), atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.view(-1).__setitem__(0, float("nan")), "holds NaN values"),
        (lambda t: t.view(-1).__setitem__(0, float("inf")), r"holds \+inf values"),
        (lambda t: t[0, 0].fill_(float("-inf")), "fewer than topk=2"),
    ],
    ids=["nan", "plus-inf", "too-few-finite"],
)
def test_damaged_logits_are_still_refused(minus_inf_adapter, tmp_path, damage, message):
    base, tmp = minus_inf_adapter
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tmp / "full" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("vblora_logits_A"))
    damage(tensors[key])
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    before = snapshot(folder)
    with pytest.raises(InvalidAdapterError, match=message):
        convert(folder, tmp_path / "out")
    result = run_cli("convert", folder, tmp_path / "out2")
    assert result.exit_code == 2 and message.replace("\\", "") in result.stderr
    assert snapshot(folder) == before and not (tmp_path / "out").exists()
    with pytest.raises(InvalidAdapterError, match=message):
        read_adapter(folder).check_values()
    with pytest.raises(InvalidAdapterError, match=message):  # the -inf refusal reads through the checks too
        VBLoRAModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_folders_and_files_get_the_umask_s_modes(tmp_path, umask, single_copy):
    import os
    import stat

    previous = os.umask(umask)
    try:
        outputs = {
            "convert": lambda dst: convert(single_copy, dst, to="packed"),
            "export-lora": lambda dst: export_lora(single_copy, dst),
        }
        for name, write in outputs.items():
            dst = tmp_path / name
            write(dst)
            for path in [dst, *dst.rglob("*")]:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (name, path.name, oct(mode))
        plot = tmp_path / "usage.png"
        assert run_cli("report", single_copy, "--plot", plot).exit_code == 0
        assert stat.S_IMODE(plot.stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(previous)


# -- the operating system's refusals: one plain line, exit 2, nothing left behind -------------------


def _one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "unexpected" not in lines[0] and ".vblora-store-tmp-" not in lines[0]
    return lines[0]


def test_a_destination_under_a_file_is_one_plain_line(tmp_path, single_copy):
    from conftest import run_module

    (tmp_path / "afile").write_text("x")
    result = run_module("convert", single_copy, tmp_path / "afile" / "out")
    _one_line_error(result, f"cannot write {tmp_path / 'afile' / 'out'}", "a part of the path is a file")


def test_a_full_disk_is_one_plain_line(tmp_path, single_copy):
    import subprocess

    from conftest import leftovers, run_module

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the mapping is also tested without it")
    try:
        result = run_module("convert", single_copy, small / "out", "--to", "full")
        _one_line_error(result, f"cannot write {small / 'out'}", "no space left on device", "free space")
        assert leftovers(small) == [] and not (small / "out").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_failing_write_is_mapped_whatever_raises_it(tmp_path, single_copy, monkeypatch):
    """safetensors reports a full disk as its own error with "(os error 28)"; a plain OSError maps too."""
    import errno

    from safetensors import SafetensorError

    from vblora_store.errors import WriteError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("vblora_store.format.conversion.save_file", full)
    with pytest.raises(WriteError, match="no space left on device"):
        convert(single_copy, tmp_path / "out")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("vblora_store.format.conversion.save_file", denied)
    result = run_cli("convert", single_copy, tmp_path / "out")
    assert (
        result.exit_code == 2 and "permission denied; choose a destination you may write to" in result.stderr
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".vblora-store-tmp-*"))


def test_plot_into_proc_and_stdout_on_dev_full_are_plain_lines(single_copy):
    import subprocess
    import sys

    from conftest import run_module

    _one_line_error(
        run_module("report", single_copy, "--plot", "/proc/usage.png"), "cannot write /proc/usage.png"
    )
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "vblora_store", "inspect", str(single_copy)],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    _one_line_error(result, "cannot write standard output", "no space left on device")


# -- usage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["convert", "a", "b", "--to", "zip"], "'zip' is not one of 'full', 'topk', 'packed', 'compressed'; see"),
        (["convert", "a", "b", "--recursive", "--jobs", "0"], "invalid value for '--jobs'"),
        (["nope"], "no such command 'nope'"),
        (["verify", "a", "b", "--tol", "nan"], "'nan' is not a number >= 0"),
        (["report", "a", "--min-compression", "nan"], "'nan' is not a number >= 0"),
        (["inspect"], "missing argument 'PATH'"),
    ],
    ids=["choice", "range", "command", "tol-nan", "min-compression-nan", "missing"],
)
def test_usage_errors_are_one_line_and_exit_2(args, fragment):
    from conftest import run_module

    _one_line_error(run_module(*args), fragment, "--help")


def test_verify_tol_inf_never_fails(single_copy, tmp_path):
    convert(single_copy, tmp_path / "packed", to="packed", bank_dtype="int8")
    assert run_cli("verify", single_copy, tmp_path / "packed", "--tol", "inf").exit_code == 0
    assert run_cli("verify", single_copy, tmp_path / "packed", "--tol", "0").exit_code == 1


def test_help_version_and_usage_errors_do_not_import_torch():
    import subprocess
    import sys

    probe = (
        "import sys, runpy\n"
        "sys.argv = ['vblora-store'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('vblora_store', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'safetensors' in sys.modules, 'huggingface_hub' in sys.modules, file=sys.stderr)\n"
    )
    for args in (
        ["--help"],
        ["--version"],
        ["convert", "--help"],
        ["convert", "a", "b", "--to", "zip"],
        ["nope"],
    ):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
        )
        assert result.stderr.strip().splitlines()[-1] == "False False False", (args, result.stderr)


def test_markdown_report_of_several_folders_names_each_folder(single_copy, multi_copy):
    result = run_cli("report", single_copy, multi_copy, "--format", "markdown")
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert f"| `{single_copy}` `default` |" in rows[0] and f"| `{multi_copy}` `default` |" in rows[1]
    single = run_cli(
        "report", single_copy, "--format", "markdown"
    ).stdout  # one folder: no path (model cards)
    assert str(single_copy) not in single


def test_training_from_dropped_logits_is_refused_like_peft(minus_inf_adapter):
    from vblora_store.errors import AdapterStateError

    base, tmp = minus_inf_adapter
    with pytest.raises(AdapterStateError, match="-inf logits.*cannot be trained"):
        VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "full", is_trainable=True)
    VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "full")  # inference: fine


def test_engine_saves_get_the_umask_s_modes(tmp_path):
    import os
    import stat

    from conftest_engine import twins

    _, model = twins(tiny_llama(), target_modules=["q_proj"])
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "adapter_model.safetensors").stat().st_mode) == 0o644


def test_package_exports_stay_functions_after_their_submodules_load():
    import vblora_store
    import vblora_store.merge  # noqa: F401  (the submodule of the same name)

    assert callable(vblora_store.merge) and vblora_store.merge.__name__ == "merge"
    assert sorted(set(vblora_store.__all__)) == sorted(vblora_store.__all__)
    for name in vblora_store.__all__:
        assert getattr(vblora_store, name) is not None
