"""Batch conversion: ``convert SRC_ROOT DST_ROOT --recursive [--jobs N]`` over a tree of adapter folders."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MULTI_FIXTURE, ROOT, SINGLE_FIXTURE, leftovers, run_cli, snapshot
from vblora_store import DestinationExistsError, StorageForm, read_adapters
from vblora_store.batch import convert_tree, find_adapter_roots

GOOD = ["team-a/user-1", "team-a/user-2/final", "team-b/multi", "user-3"]


@pytest.fixture
def tree(tmp_path) -> Path:
    """Adapter roots at several depths, a multi-adapter root, a broken one, a hidden one and a link loop."""
    root = tmp_path / "runs"
    for rel in GOOD:
        shutil.copytree(MULTI_FIXTURE if "multi" in rel else SINGLE_FIXTURE, root / rel)
    broken = root / "team-b" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text("{not json")
    shutil.copytree(SINGLE_FIXTURE, root / ".cache" / "hidden")
    (root / "team-a" / "loop").symlink_to(root, target_is_directory=True)  # never followed
    (root / "notes.txt").write_text("not an adapter")
    return root


def test_roots_are_found_at_any_depth_without_entering_roots_links_or_hidden_folders(tree):
    found = [p.relative_to(tree).as_posix() for p in find_adapter_roots(tree)]
    assert found == sorted(GOOD + ["team-b/broken"])  # team-b/multi/second belongs to its root


def test_batch_converts_every_root_into_the_same_layout_and_reports_the_broken_one(tree, tmp_path):
    dst = tmp_path / "packed"
    seen = []
    result = convert_tree(
        tree, dst, to="packed", progress=lambda done, total, item: seen.append((done, total))
    )
    assert [item.src.relative_to(tree).as_posix() for item in result.converted] == GOOD
    assert [item.src for item in result.failed] == [tree / "team-b" / "broken"]
    assert "adapter_config.json: not valid JSON" in result.failed[0].error
    assert seen == [(n, 5) for n in range(1, 6)]
    for rel in GOOD:
        adapters = read_adapters(dst / rel)
        assert {a.form for a in adapters} == {StorageForm.PACKED}
        assert [a.name for a in adapters] == [a.name for a in read_adapters(tree / rel)]
    assert not (dst / "team-b" / "broken").exists() and leftovers(dst / "team-b") == []
    assert not (dst / ".cache").exists() and not (dst / "team-a" / "loop").exists()


def test_cli_exits_2_with_the_failure_by_path_and_a_summary(tree, tmp_path):
    before = snapshot(tree)
    result = run_cli("convert", tree, tmp_path / "out", "--recursive")
    assert result.exit_code == 2
    assert result.stdout.splitlines()[-1] == "converted 4, failed 1"
    assert f"converted {tree / 'user-3'}" in result.stdout.splitlines()  # not a terminal: a line per adapter
    assert (
        result.stderr.startswith(f"error: {tree / 'team-b' / 'broken'}: ") and result.stderr.count("\n") == 1
    )
    assert snapshot(tree) == before
    as_json = json.loads(run_cli("convert", tree, tmp_path / "again", "--recursive", "--format", "json").stdout)
    assert (as_json["converted"], as_json["failed"], as_json["passed"]) == (4, 1, False)


def test_existing_destinations_follow_force_one_by_one(tree, tmp_path):
    shutil.rmtree(tree / "team-b" / "broken")
    dst = tmp_path / "out"
    assert run_cli("convert", tree, dst, "--recursive").exit_code == 0
    again = run_cli("convert", tree, dst, "--recursive")
    assert again.exit_code == 2 and again.stdout.splitlines()[-1] == "converted 0, failed 4"
    assert "already exists; pass --force" in again.stderr
    forced = run_cli("convert", tree, dst, "--recursive", "--force", "--to", "packed")
    assert forced.exit_code == 0 and forced.stdout.splitlines()[-1] == "converted 4, failed 0"
    assert {a.form for rel in GOOD for a in read_adapters(dst / rel)} == {StorageForm.PACKED}


def test_destination_tree_inside_the_source_tree_is_refused(tree):
    with pytest.raises(DestinationExistsError, match="inside it"):
        convert_tree(tree, tree / "converted")
    result = run_cli("convert", tree, tree / "converted", "--recursive")
    assert result.exit_code == 2 and not (tree / "converted").exists()


def test_tree_without_adapters_is_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_cli("convert", tmp_path / "empty", tmp_path / "out", "--recursive")
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: {tmp_path / 'empty'}: no adapter_config.json anywhere under it; check the path.\n"
    )


def test_jobs_without_recursive_is_a_usage_error(tmp_path):
    result = run_cli("convert", SINGLE_FIXTURE, tmp_path / "out", "--jobs", "2")
    assert result.exit_code == 2 and "--jobs applies to --recursive" in result.output


def test_worker_processes_write_the_same_bytes_with_a_progress_bar_on_a_terminal(tree, tmp_path):
    """--jobs 2 in a real process whose stderr is a terminal: a progress bar, and the in-process bytes."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    convert_tree(tree, serial, to="packed")
    main, terminal = pty.openpty()
    result = subprocess.run(
        [sys.executable, "-m", "vblora_store", "convert", tree, parallel, "--recursive", "--jobs", "2", "--to",
         "packed"],
        cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE, stderr=terminal,
        text=True, timeout=180,
    )  # fmt: skip
    os.close(terminal)
    shown = _read_all(main)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        "converted 4, failed 1"
    ]  # no per-adapter lines: the bar shows progress
    assert "converting" in shown and "100%" in shown
    assert f"error: {tree / 'team-b' / 'broken'}: " in shown
    assert snapshot(parallel) == snapshot(serial)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
