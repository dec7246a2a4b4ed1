"""Defects found by trying the toolkit as a new user would, each fixed and pinned here."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("proc", [True, False], ids=["proc-self-status", "set-and-reset"])
def test_the_umask_is_read_without_opening_a_window_on_other_threads(monkeypatch, proc):
    """Setting the umask to read it lets another thread create files under the mask set meanwhile.

    Linux shows it in ``/proc/self/status``; elsewhere the moment's mask is 077 (private), never 0.
    """
    import os
    from pathlib import Path

    from vblora_store.format import atomic

    real_umask, masks_set = os.umask, []

    def umask(mask):
        if proc:
            raise AssertionError("the umask was set to read it, though /proc/self/status shows it")
        masks_set.append(mask)
        return real_umask(mask)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/status")

    status = Path("/proc/self/status")
    if proc and not (status.exists() and "Umask:" in status.read_text()):
        pytest.skip("this system's /proc/self/status does not show the umask")
    previous = os.umask(0o027)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(atomic.os, "umask", umask)
            if not proc:
                patch.setattr(atomic, "open", no_proc, raising=False)
            assert atomic._umask() == 0o027 and atomic.plain_file_mode() == 0o640
        assert masks_set == ([] if proc else [0o077, 0o027, 0o077, 0o027])
        assert os.umask(0o027) == 0o027  # left as it was
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


@contextlib.contextmanager
def _small_tmpfs(folder, options: str):
    """A 64 KiB tmpfs mounted at ``folder`` with ``options`` for the block (skips where mounting needs root)."""
    import subprocess

    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options}size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the mapping is also tested without it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_one_plain_line(tmp_path, single_copy):
    from conftest import leftovers, run_module

    with _small_tmpfs(tmp_path / "small", "") as small:
        result = run_module("convert", single_copy, small / "out", "--to", "full")
        _one_line_error(result, f"cannot write {small / 'out'}", "no space left on device", "free space")
        assert leftovers(small) == [] and not (small / "out").exists()


def test_a_read_only_file_system_is_said_once(tmp_path, single_copy):
    from conftest import run_module

    with _small_tmpfs(tmp_path / "ro", "ro,") as readonly:
        result = run_module("convert", single_copy, readonly / "out")
        line = _one_line_error(result, f"cannot write {readonly / 'out'}")
    assert line.endswith(": read-only file system; choose another destination."), line


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

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("vblora_store.format.conversion.save_file", read_only)
    with pytest.raises(WriteError) as caught:
        convert(single_copy, tmp_path / "out")
    expected = f"cannot write {tmp_path / 'out'}: read-only file system; choose another destination."
    assert str(caught.value) == expected


#: Run a command as root without the capabilities that let root read any file: mode 000 then refuses it.
_NO_READ_OVERRIDE = [
    "setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"
]  # fmt: skip


def _unreadable_files_are_refused_here(tmp_path) -> bool:
    """Whether a file of mode 000 is unreadable to a command run under ``_NO_READ_OVERRIDE``."""
    import os
    import shutil
    import subprocess

    if os.name != "posix" or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        return subprocess.run([*_NO_READ_OVERRIDE, "cat", str(probe)], capture_output=True).returncode != 0
    finally:
        probe.unlink()


@pytest.mark.parametrize(
    "unreadable, verb",
    [
        ("adapter_config.json", "read"),
        ("adapter_model.safetensors", "read"),
        ("adapter_model.bin", "read"),
        ("second", "read"),  # a sub-folder that cannot be listed
    ],
)
def test_a_file_the_system_will_not_let_us_read_is_not_called_damaged(tmp_path, multi_copy, unreadable, verb):
    """Permission denied is said as such, with a reader's fix; never "damaged, fetch it again"."""
    import subprocess
    import sys

    from conftest import ROOT

    if not _unreadable_files_are_refused_here(tmp_path):
        pytest.skip("needs root and setpriv to make a file unreadable; the mapping is tested without too")
    if unreadable.endswith(".bin"):
        weights = multi_copy / "adapter_model.safetensors"
        torch.save(load_file(str(weights)), multi_copy / unreadable)
        weights.unlink()
    (multi_copy / unreadable).chmod(0)
    command = [*_NO_READ_OVERRIDE, sys.executable, "-m", "vblora_store", "inspect", str(multi_copy)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = _one_line_error(result, f"cannot {verb} {multi_copy / unreadable}: permission denied")
    assert line.endswith("; check its permissions, or run as a user who may read it."), line
    assert "damaged" not in line and "destination" not in line

    if unreadable in ("adapter_model.safetensors", "second"):  # the Python API: a typed error, also an OSError
        probe = (
            "from vblora_store import read_adapters\n"
            "from vblora_store.errors import ReadError\n"
            f"try:\n    read_adapters({str(multi_copy)!r})\n"
            "except ReadError as e:\n    print(isinstance(e, OSError), e)\n"
        )
        command = [*_NO_READ_OVERRIDE, sys.executable, "-c", probe]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        expected = f"True cannot read {multi_copy / unreadable}: permission denied"
        assert result.stdout.startswith(expected), result


def test_a_read_refused_by_the_system_is_mapped_without_root(single_copy, monkeypatch):
    """The same mapping, the refusal simulated: plain ``open``, safetensors' "(os error N)", the config."""
    import errno
    import pathlib

    from safetensors import safe_open

    from vblora_store.errors import ReadError

    weights = single_copy / "adapter_model.safetensors"

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("vblora_store.format.reading.open", denied, raising=False)
    with pytest.raises(ReadError, match="^cannot read .*: permission denied; check its perm") as raised:
        read_adapter(single_copy)
    assert isinstance(raised.value, OSError) and str(weights) in str(raised.value)
    monkeypatch.undo()

    def io_error(*args, **kwargs):
        raise OSError("Input/output error (os error 5)")

    monkeypatch.setattr("vblora_store.format.reading.safe_open", io_error)
    with pytest.raises(ReadError, match="input/output error; the device reported an I/O error"):
        read_adapter(single_copy)
    monkeypatch.setattr("vblora_store.format.reading.safe_open", safe_open)
    read_text = pathlib.Path.read_text

    def config_denied(self, *args, **kwargs):
        if self.name == "adapter_config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", config_denied)
    result = run_cli("inspect", single_copy)
    assert result.exit_code == 2 and result.stderr == (
        f"error: cannot read {single_copy / 'adapter_config.json'}: permission denied; "
        "check its permissions, or run as a user who may read it.\n"
    )


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


@pytest.mark.parametrize("max_error", [None, "0"])
def test_convert_whose_report_cannot_be_printed_writes_nothing(single_copy, tmp_path, max_error):
    """Exit 2 means nothing written: the report is printed before the destination appears."""
    import subprocess
    import sys

    from conftest import leftovers

    dst = tmp_path / "out" / "packed"
    extra = [] if max_error is None else ["--max-error", max_error]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "vblora_store", "convert", single_copy, dst, "--to", "packed", *extra],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    _one_line_error(result, "cannot write standard output", "no space left on device")
    assert not dst.exists() and leftovers(dst.parent) == []


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


def test_no_arguments_prints_the_help_unchanged_and_exits_2():
    """A bare ``vblora-store`` is a usage error (exit 2, stdout empty) answered with the help itself.

    click 8.2+ raises the help as a ``UsageError``; it must not be lowercased, cut and suffixed.
    """
    from conftest import run_module

    bare, asked = run_module(), run_module("--help")
    assert (bare.returncode, bare.stdout) == (2, ""), bare.stderr
    assert bare.stderr == asked.stdout and asked.returncode == 0
    assert bare.stderr.startswith("Usage: ") and "error:" not in bare.stderr and "  verify  " in bare.stderr


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
        [],
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


def test_a_training_step_on_dropped_logits_is_refused_however_they_became_trainable(minus_inf_adapter):
    """Loaded for inference, then given gradients (``set_requires_grad``): PEFT's training forward refuses
    the -inf logits, and so does ours, before any gradient flows."""
    from vblora_store.errors import AdapterStateError

    base, tmp = minus_inf_adapter
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "full")
    theirs = peft_load(base, tmp / "full")
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            param.requires_grad = "vblora_logits" in name
        model.train()
    with pytest.raises(RuntimeError, match="infinity"):
        theirs(input_ids=inputs()).logits.sum().backward()
    ours.set_requires_grad("default", True)
    with pytest.raises(AdapterStateError, match="-inf logits.*cannot be trained"):
        ours(input_ids=inputs()).logits.sum().backward()
    ours.eval()  # as the refusal advises: inference runs, gradients on or not, as in PEFT
    theirs.eval()
    assert torch.allclose(ours(input_ids=inputs()).logits, theirs(input_ids=inputs()).logits, atol=1e-5)


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
