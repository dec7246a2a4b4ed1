"""Safety: pickles never run code, links never lead out of an adapter folder, repo ids are checked first."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SINGLE_FIXTURE, leftovers, run_cli
from vblora_store import read_adapters

CONFIG, WEIGHTS, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


class Exploit:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bin_adapter(folder: Path) -> Path:
    """The fixture with its weights as a torch.save ``.bin``."""
    folder.mkdir()
    shutil.copy(SINGLE_FIXTURE / CONFIG, folder / CONFIG)
    torch.save(load_file(str(SINGLE_FIXTURE / WEIGHTS)), folder / WEIGHTS_BIN)
    return folder


def with_pickle(path: Path, payload: bytes) -> None:
    """Replace the ``data.pkl`` record of a torch.save archive, keeping every other record."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, payload if name.endswith("/data.pkl") else data)


@pytest.mark.parametrize("wrapping", ["torch-zip", "bare-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, wrapping):
    adapter = bin_adapter(tmp_path / "adapter")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"base_model.vblora_vector_bank": Exploit(marker)}, protocol=2)
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    if wrapping == "torch-zip":
        with_pickle(adapter / WEIGHTS_BIN, payload)  # reaches torch.load(weights_only=True)
    else:
        (adapter / WEIGHTS_BIN).write_bytes(payload)  # refused before torch.load
    for command in (("inspect", adapter), ("convert", adapter, tmp_path / "out")):
        result = run_cli(*command)
        assert result.exit_code == 2, result.output
        assert "unexpected" not in result.stderr and str(adapter / WEIGHTS_BIN) in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_plain_bin_still_reads(tmp_path):
    adapter = bin_adapter(tmp_path / "adapter")
    assert run_cli("inspect", adapter).exit_code == 0


# -- symbolic links ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_file_linked_outside_the_adapter_folder_is_refused(tmp_path, name):
    outside = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "elsewhere"))
    adapter = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "adapter"))
    (adapter / name).unlink()
    (adapter / name).symlink_to(outside / name)
    for command in (("inspect", adapter), ("convert", adapter, tmp_path / "out")):
        result = run_cli(*command)
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: {adapter / name}: is a symbolic link to {outside / name}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["loop", "missing"])
def test_looping_or_dangling_link_is_one_line(tmp_path, target):
    adapter = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "adapter"))
    (adapter / WEIGHTS).unlink()
    (adapter / WEIGHTS).symlink_to(WEIGHTS if target == "loop" else "missing.safetensors")
    result = run_cli("inspect", adapter)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {adapter / WEIGHTS}: is a symbolic link that leads to no file")


def test_links_inside_the_folder_and_a_linked_root_are_followed(tmp_path):
    adapter = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "adapter"))
    (adapter / "weights").mkdir()
    (adapter / WEIGHTS).rename(adapter / "weights" / "real.safetensors")
    (adapter / WEIGHTS).symlink_to(Path("weights") / "real.safetensors")
    (tmp_path / "link").symlink_to(adapter, target_is_directory=True)
    assert run_cli("inspect", tmp_path / "link").exit_code == 0


def test_subfolder_linked_outside_is_skipped(tmp_path):
    adapter = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "adapter"))
    other = Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "other"))
    (adapter / "second").symlink_to(other, target_is_directory=True)
    assert [a.name for a in read_adapters(adapter)] == ["default"]


def test_huggingface_cache_snapshot_links_to_its_blobs_are_followed(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>."""
    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy(SINGLE_FIXTURE / name, repo / "blobs" / f"hash-{name}")
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / f"hash-{name}")
    assert run_cli("inspect", snapshot).exit_code == 0


# -- repo ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repo_id", ["../../etc", "acme/x--y", "a/b/c", "acme", "acme/" + "x" * 100, "acme/ba d"]
)
def test_push_refuses_a_bad_repo_id_before_any_work(tmp_path, monkeypatch, repo_id):
    """Checked before the token, the adapter or the network: nothing is needed to refuse it."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = run_cli("push", tmp_path / "no-such-adapter", repo_id)
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: {repo_id}: not a Hub repo id; use namespace/name, such as your-user/no-such-adapter.\n"
    )
