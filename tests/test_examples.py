"""Every script in docs/examples runs to completion on a tiny random model (``--tiny``, no download).

The scripts start together, two at a time, when the first test asks for them;
each test then checks one script's exit status and output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))

# A line each script must print (what the example is about).
EXPECTED = {
    "compare_storage_modes.py": "same outputs: True",
    "create_model.py": "trainable params:",
    "generate_text.py": "generated:",
    "low_cpu_memory.py": "bank before loading: meta",
    "many_adapters.py": "rows match single-adapter runs: True",
    "merge_and_save.py": "same outputs: True",
    "parameter_efficiency.py": "VB-LoRA, top-k form:",
    "regex_targets.py": "gate_proj",
    "save_for_inference.py": "same outputs: True",
    "target_layers.py": "adapted:",
    "train_with_trainer.py": "final training loss:",
    "two_adapters.py": "left: ['chat']",
}


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, str(EXAMPLES / script), "--tiny", "--out", str(out / script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(lambda s: _run(s, out), SCRIPTS)))


def test_every_example_is_checked():
    assert sorted(EXPECTED) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(results, script):
    result = results[script]
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    assert EXPECTED[script] in result.stdout, result.stdout
