"""The README's Quick start: exactly two commands, the first runnable, the second what CI runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    """.ci/run reads its test command from the README, so the README's must be line two."""
    commands = _quick_start()
    assert len(commands) == 2
    assert "[test]" in commands[1] and "pytest" in commands[1]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_main_job_converts_the_fixture_and_prints_a_report(tmp_path):
    """The first command's vblora-store part works on the shipped fixture (with a temporary DST)."""
    job = _quick_start()[0].split("&&", 1)[1].strip()
    argv = shlex.split(job)
    assert argv[:2] == ["vblora-store", "convert"]
    src, dst = argv[2], argv[3]
    assert (ROOT / src / "adapter_config.json").is_file()
    argv[3] = str(tmp_path / Path(dst).name)
    result = subprocess.run(
        [sys.executable, "-m", "vblora_store", *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "topk form" in result.stdout and "compression" in result.stdout
    assert (Path(argv[3]) / "adapter_model.safetensors").is_file()
