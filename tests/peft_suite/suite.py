"""Runs PEFT 0.21.2's VB-LoRA cases in a pytest subprocess, against PEFT or vblora_store, and reads the outcomes.

``python tests/peft_suite/suite.py`` runs both and prints the figure quoted in
docs/engine.md: of the cases PEFT passes, how many pass against vblora_store,
and which do not (listed in ``differences.toml`` or not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIFFERENCES = HERE / "differences.toml"

#: PEFT's test modules holding VB-LoRA cases; a case is selected when its id names VB-LoRA (``-k vblora``).
FILES = (
    "test_vblora.py", "test_custom_models.py", "test_decoder_models.py", "test_encoder_decoder_models.py",
    "test_feature_extraction_models.py", "test_seq_classifier.py", "test_config.py",
)  # fmt: skip
SELECTION = "vblora"
TARGETS = ("peft", "vblora_store")


@dataclass(frozen=True)
class Outcome:
    """One case's result: ``passed``, ``failed``, ``error``, ``skipped`` or ``xfailed``, and why."""

    outcome: str
    reason: str


def run(target: str, root: Path, work: Path, *, timeout: float = 1800) -> dict[str, Outcome]:
    """Run the selection against ``target`` (``"peft"`` or ``"vblora_store"``); outcome by test id.

    Args:
        target: What PEFT's public entry points call.
        root: The fetched suite (:func:`sdist.suite_root`).
        work: A folder for the stand-in models, the Hub cache and the outcome file.
        timeout: Seconds before the run is stopped.

    Returns:
        Test id (``tests/test_x.py::Class::test[params]``) -> :class:`Outcome`.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    outcomes = work / f"outcomes-{target}.json"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        VBLORA_PEFT_SUITE_TARGET=target,
        VBLORA_PEFT_SUITE_HUB=str(work / "stand-ins"),
        VBLORA_PEFT_SUITE_OUTCOMES=str(outcomes),
        HF_HOME=str(work / "hf-home"),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # a Hub call PEFT's tests force online fails at once: nothing is downloaded
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"), "--rootdir", str(root),
               "-p", "plugin", "-p", "no:cacheprovider", "-q", "--no-header", "-k", SELECTION,
               *(f"tests/{name}" for name in FILES)]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if not outcomes.is_file():
        raise RuntimeError(f"the PEFT suite against {target} wrote no outcomes:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return {case: Outcome(**o) for case, o in json.loads(outcomes.read_text()).items()}


def listed_differences() -> tuple[dict[str, str], dict[str, str]]:
    """``differences.toml``: (test id -> reason key, reason key -> the row of engine.md's table it names)."""
    data = tomllib.loads(DIFFERENCES.read_text(encoding="utf-8"))
    return dict(data.get("cases", {})), dict(data.get("reasons", {}))


def figure(peft: dict[str, Outcome], ours: dict[str, Outcome]) -> tuple[int, int]:
    """(cases PEFT and vblora_store both pass, cases PEFT passes)."""
    baseline = {case for case, o in peft.items() if o.outcome == "passed"}
    both = {case for case in baseline if ours.get(case, Outcome("missing", "")).outcome == "passed"}
    return len(both), len(baseline)


def main() -> None:
    import sdist

    root = sdist.suite_root()
    with tempfile.TemporaryDirectory() as tmp:
        peft = run("peft", root, Path(tmp))
        ours = run("vblora_store", root, Path(tmp))
    passed, baseline = figure(peft, ours)
    cases, _ = listed_differences()
    print(f"selected: {len(peft)}; PEFT {PEFT_VERSION_NOTE} passes {baseline}; vblora_store passes {passed} of them "
          f"({100 * passed / max(baseline, 1):.1f}%); listed differences: {len(cases)}")  # fmt: skip
    for case in sorted(peft):
        if peft[case].outcome == "passed" and ours.get(case, Outcome("missing", "")).outcome != "passed":
            mark = cases.get(case, "UNLISTED")
            print(f"{mark}\t{case}\t{ours.get(case, Outcome('missing', '')).reason}")


PEFT_VERSION_NOTE = "0.21.2"

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
