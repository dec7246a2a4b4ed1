"""The pytest plugin PEFT's selection runs under (``-p peft_suite.plugin``, ``tests/`` on ``sys.path``).

Configured by environment variables that :mod:`suite` sets:

- ``VBLORA_PEFT_SUITE_TARGET``: ``peft`` runs PEFT's cases against PEFT itself (the
  baseline); ``vblora_store`` first points PEFT's public entry points at ours (:mod:`shim`).
- ``VBLORA_PEFT_SUITE_HUB``: where the tiny stand-ins for Hub ids are saved (:mod:`hub_models`).
- ``VBLORA_PEFT_SUITE_OUTCOMES``: the JSON file the per-case outcomes are written to.

PEFT's ``testing_common`` imports diffusers and datasets at the top; where they are
not installed, a stand-in module takes their place that fails when used (no VB-LoRA
case uses either).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest

_outcomes: dict[str, dict[str, str]] = {}


def _absent_package(name: str, classes: tuple[str, ...] = (), functions: tuple[str, ...] = ()) -> None:
    if importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{name} is not installed; the PEFT suite runs without it")

    for attribute in classes:  # a class, so that isinstance() checks against it simply say no
        setattr(module, attribute, type(attribute, (), {"__init__": unavailable, "from_pretrained": unavailable}))
    for attribute in functions:
        setattr(module, attribute, unavailable)
    sys.modules[name] = module


def pytest_configure(config: pytest.Config) -> None:
    _absent_package("diffusers", classes=("StableDiffusionPipeline",))
    _absent_package("datasets", functions=("load_dataset",))
    from peft_suite import hub_models

    hub_models.install(Path(os.environ["VBLORA_PEFT_SUITE_HUB"]))
    if os.environ.get("VBLORA_PEFT_SUITE_TARGET") == "vblora_store":
        from peft_suite import shim

        shim.install()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keeps each case's outcome: its first failing phase, else passed or skipped."""
    seen = _outcomes.get(report.nodeid)
    if seen is not None and seen["outcome"] != "passed":
        return  # a failure in setup or call is the case's outcome; teardown cannot improve it
    if report.when == "call" or report.outcome != "passed" or seen is None:
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        _outcomes[report.nodeid] = {"outcome": outcome, "reason": _reason(report)}


def _reason(report: pytest.TestReport) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message.splitlines()[0][:300] if crash is not None and crash.message else str(report.longrepr)[-300:]


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("VBLORA_PEFT_SUITE_OUTCOMES")
    if path:
        Path(path).write_text(json.dumps(_outcomes, indent=0, sort_keys=True))
