"""Crash safety: ``kill -9`` at any moment of convert, export-lora or merge never leaves a partial destination.

Each command runs as a real process (``python -m vblora_store``) on an adapter
large enough that writing takes a while, and is killed while its temporary
folder exists.  The destination is then either absent or byte-identical to
an uninterrupted run's; everything else beside it is a recognisable
``.vblora-store-tmp-*`` leftover, which the next run of the command removes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, SINGLE_FIXTURE, leftovers, run_cli, snapshot
from vblora_store import VBLoRAConfig
from vblora_store.format.atomic import TMP_PREFIX

MODULES, FEATURES, NUM_VECTORS, LENGTH, R = 32, 256, 4096, 64, 4


def make_inputs(root: Path) -> dict[str, Path]:
    """A full-form adapter (about 17 MB of logits) and a base checkpoint it fits (about 8 MB)."""
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.proj" for i in range(MODULES)]
    adapter, base = root / "adapter", root / "base"
    VBLoRAConfig(r=R, num_vectors=NUM_VECTORS, vector_length=LENGTH, target_modules=["proj"]).save_pretrained(
        adapter
    )
    tensors = {"base_model.vblora_vector_bank": torch.rand(NUM_VECTORS, LENGTH, generator=generator)}
    for name in names:
        prefix = f"base_model.model.{name}.vblora_logits_"
        tensors[prefix + "A"] = torch.randn(R, FEATURES // LENGTH, NUM_VECTORS, generator=generator)
        tensors[prefix + "B"] = torch.randn(FEATURES // LENGTH, R, NUM_VECTORS, generator=generator)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    base.mkdir()
    weights = {f"{name}.weight": torch.randn(FEATURES, FEATURES, generator=generator) for name in names}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}\n")
    return {"adapter": adapter, "base": base}


COMMANDS = {
    "convert": lambda i, dst: ["convert", i["adapter"], dst, "--to", "packed"],
    "export-lora": lambda i, dst: ["export-lora", i["adapter"], dst],
    "merge": lambda i, dst: ["merge", i["base"], i["adapter"], dst],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The inputs, and each command's output from an uninterrupted run (``reference-<command>``)."""
    root = tmp_path_factory.mktemp("crash")
    paths = make_inputs(root)
    for name, args in COMMANDS.items():
        result = run_cli(*args(paths, root / f"reference-{name}"))
        assert result.exit_code == 0, result.output
    return {**paths, "root": root}


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vblora_store", *map(str, args)],
        cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def kill_while_building(process: subprocess.Popen, parent: Path, *, then_wait: float = 0.0) -> None:
    """SIGKILL ``process`` once a temporary folder appears in ``parent`` (plus ``then_wait`` seconds)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if parent.is_dir() and leftovers(parent):
            time.sleep(then_wait)
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_absent_or_complete(dst: Path, reference: Path) -> None:
    """The destination is absent or equal to an uninterrupted run's; all else beside it is a leftover."""
    assert not dst.exists() or snapshot(dst) == snapshot(reference), "partial destination"
    others = {p.name for p in dst.parent.iterdir()} - {dst.name}
    assert others == set(leftovers(dst.parent)), others


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kill_while_building_leaves_no_destination_and_the_next_run_cleans_up(inputs, tmp_path, command):
    dst = tmp_path / "out" / "result"
    kill_while_building(start(COMMANDS[command](inputs, dst)), dst.parent)
    assert not dst.exists()
    assert leftovers(dst.parent), "the kill came too late to test anything"
    assert_absent_or_complete(dst, inputs["root"] / f"reference-{command}")

    assert run_cli(*COMMANDS[command](inputs, dst)).exit_code == 0  # the killed process's pid is dead now
    assert snapshot(dst) == snapshot(inputs["root"] / f"reference-{command}")
    assert leftovers(dst.parent) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kill_at_random_moments_of_the_write(inputs, tmp_path, command):
    """A kill at a random point after the temporary folder appears: before, during or after the rename."""
    dst = tmp_path / "out" / "result"
    wait = random.Random(command).uniform(0, 0.4)
    kill_while_building(start(COMMANDS[command](inputs, dst)), dst.parent, then_wait=wait)
    assert_absent_or_complete(dst, inputs["root"] / f"reference-{command}")


def test_cleanup_removes_only_dead_processes_temps_of_that_destination(tmp_path):
    """Two runs writing one destination at once never delete each other's work."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    out = tmp_path / "out"
    names = {
        "stale": f"{TMP_PREFIX}result-{dead_pid}-abcd1234",  # killed run of this destination: removed
        "live": f"{TMP_PREFIX}result-{live_pid}-abcd1234",  # a run still going: kept
        "other": f"{TMP_PREFIX}result-2-{dead_pid}-abcd1234",  # another destination, "result-2": kept
        "foreign": f"{TMP_PREFIX}result-notapid",  # not a name we write: kept
    }
    for name in names.values():
        (out / name).mkdir(parents=True)
    assert run_cli("convert", SINGLE_FIXTURE, out / "result").exit_code == 0
    assert sorted(leftovers(out)) == sorted(names[k] for k in ("live", "other", "foreign"))
