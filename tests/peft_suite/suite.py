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
import re
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


def run(targets: tuple[str, ...], root: Path, work: Path, *, timeout: float = 1800) -> dict[str, dict[str, Outcome]]:
    """Run the selection against each target (``"peft"``, ``"vblora_store"``) side by side; outcomes by test id.

    Args:
        targets: What PEFT's public entry points call, one subprocess each, run at the same time.
        root: The fetched suite (:func:`sdist.suite_root`).
        work: A folder for the stand-in models, the Hub cache and the outcome files.
        timeout: Seconds before a run is stopped.

    Returns:
        Target -> test id (``tests/test_x.py::Class::test[params]``) -> :class:`Outcome`.
    """
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"targets must be among {TARGETS}, got {sorted(unknown)}")
    runs = {}
    for target in targets:
        log = (work / f"log-{target}.txt").open("w")
        runs[target] = (subprocess.Popen(_command(root), cwd=root, env=_environment(target, work), stdout=log,
                                         stderr=subprocess.STDOUT), log)  # fmt: skip
    outcomes: dict[str, dict[str, Outcome]] = {}
    for target, (process, log) in runs.items():
        try:
            process.wait(timeout=timeout)
        finally:
            process.kill()
            log.close()
        file = work / f"outcomes-{target}.json"
        if not file.is_file():
            tail = (work / f"log-{target}.txt").read_text()[-3000:]
            raise RuntimeError(f"the PEFT suite against {target} wrote no outcomes:\n{tail}")
        outcomes[target] = {case: Outcome(**o) for case, o in json.loads(file.read_text()).items()}
    return outcomes


def _command(root: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"), "--rootdir", str(root),
            "-p", "peft_suite.plugin", "-p", "no:cacheprovider", "-q", "--no-header", "-k", SELECTION,
            *(f"tests/{name}" for name in FILES)]  # fmt: skip


def _environment(target: str, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")])),
        VBLORA_PEFT_SUITE_TARGET=target,
        VBLORA_PEFT_SUITE_HUB=str(work / f"stand-ins-{target}"),
        VBLORA_PEFT_SUITE_OUTCOMES=str(work / f"outcomes-{target}.json"),
        HF_HOME=str(work / f"hf-home-{target}"),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # a Hub call PEFT's tests force online fails at once: nothing is downloaded
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    return env


def listed_differences() -> tuple[dict[str, str], dict[str, str]]:
    """``differences.toml``: (test id -> reason key, reason key -> the row of engine.md's table it names).

    The file is a TOML subset read here line by line (Python 3.10 has no ``tomllib``): ``[section]``
    headers and one ``key = "value"`` a line, the key bare or a double-quoted string.
    """
    sections: dict[str, dict[str, str]] = {}
    current = None
    for number, line in enumerate(DIFFERENCES.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        entry = _ENTRY.fullmatch(line)
        if header:
            current = sections.setdefault(header.group(1), {})
        elif entry and current is not None:
            key = json.loads(entry.group(1)) if entry.group(1).startswith('"') else entry.group(1)
            current[key] = json.loads(entry.group(2))
        else:
            raise ValueError(f"{DIFFERENCES}:{number}: expected [section] or key = \"value\", got {line!r}")
    return sections.get("cases", {}), sections.get("reasons", {})


_ENTRY = re.compile(r'("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*")')


def figure(peft: dict[str, Outcome], ours: dict[str, Outcome]) -> tuple[int, int]:
    """(cases PEFT and vblora_store both pass, cases PEFT passes)."""
    baseline = {case for case, o in peft.items() if o.outcome == "passed"}
    both = {case for case in baseline if ours.get(case, Outcome("missing", "")).outcome == "passed"}
    return len(both), len(baseline)


def main() -> None:
    from peft_suite import sdist

    root = sdist.suite_root()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run(TARGETS, root, Path(tmp))
    peft, ours = outcomes["peft"], outcomes["vblora_store"]
    passed, baseline = figure(peft, ours)
    cases, _ = listed_differences()
    print(f"selected: {len(peft)}; PEFT {sdist.PEFT_VERSION} passes {baseline}; vblora_store passes {passed} of "
          f"them ({100 * passed / max(baseline, 1):.1f}%); listed differences: {len(cases)}")  # fmt: skip
    for case in sorted(peft):
        mine = ours.get(case, Outcome("missing", ""))
        if peft[case].outcome == "passed" and mine.outcome != "passed":
            print(f"{cases.get(case, 'UNLISTED')}\t{case}\t{mine.reason}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
