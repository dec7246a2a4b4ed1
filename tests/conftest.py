"""Shared test fixtures: tiny PEFT models, the committed fixtures, CLI runners, folder snapshots.

Every model is a tiny transformers model built from a config with seeded random
weights; nothing is downloaded.  PEFT is the reference implementation: adapters
are made and saved by PEFT, and our results are compared with PEFT's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vblora_store.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SINGLE_FIXTURE = FIXTURES / "tiny-llama-vblora"
MULTI_FIXTURE = FIXTURES / "tiny-llama-vblora-multi"


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The script that made the committed fixtures: one definition of the base model and adapters.
make_fixtures = _load_make_fixtures()
tiny_llama = make_fixtures.tiny_llama
single_config = make_fixtures.single_config
multi_configs = make_fixtures.multi_configs
train = make_fixtures.train
random_batch = make_fixtures.random_batch

#: Token ids every logits comparison runs on.
EVAL_IDS = random_batch(seed=12345, batch=2, length=12)


# -- models -------------------------------------------------------------------------


def logits_of(model, ids: torch.Tensor = EVAL_IDS) -> torch.Tensor:
    """The model's output logits on ``ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_peft(folder: Path, *, adapter_name: str = "default"):
    """``PeftModel.from_pretrained`` on a fresh copy of the tiny Llama base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name=adapter_name).eval()


def peft_logits(folder: Path) -> torch.Tensor:
    """Logits of the base model with the adapter at ``folder`` loaded by PEFT."""
    return logits_of(load_peft(folder))


@dataclass
class PeftSaves:
    """One trained single-adapter PEFT model and its saves in each form."""

    model: object  # the PeftModel, still in memory
    full: Path  # save_only_topk_weights=False, safetensors
    topk: Path  # save_only_topk_weights=True, safetensors
    full_bin: Path  # save_only_topk_weights=False, adapter_model.bin
    topk_bin: Path  # save_only_topk_weights=True, adapter_model.bin


def save_both_forms(model, folder: Path, *, adapter_name: str = "default", bin_too: bool = False) -> dict:
    """Save ``model`` twice with PEFT: full form, then top-k form (same weights)."""
    config = model.peft_config[adapter_name]
    out = {}
    variants = [("full", False, True), ("topk", True, True)]
    if bin_too:
        variants += [("full_bin", False, False), ("topk_bin", True, False)]
    for name, topk, safe in variants:
        config.save_only_topk_weights = topk
        model.save_pretrained(str(folder / name), safe_serialization=safe)
        out[name] = folder / name
    config.save_only_topk_weights = False
    return out


@pytest.fixture(scope="session")
def peft_saves(tmp_path_factory) -> PeftSaves:
    """The ``tiny-llama-vblora`` recipe, trained again, saved by PEFT in both forms and both file types."""
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), single_config())
    train(model, "default", seed=1)
    paths = save_both_forms(model, tmp_path_factory.mktemp("peft-saves"), bin_too=True)
    return PeftSaves(model=model, **paths)


@pytest.fixture
def single_copy(tmp_path) -> Path:
    """A private copy of ``fixtures/tiny-llama-vblora`` that a test may damage."""
    return Path(shutil.copytree(SINGLE_FIXTURE, tmp_path / "adapter"))


@pytest.fixture
def multi_copy(tmp_path) -> Path:
    """A private copy of ``fixtures/tiny-llama-vblora-multi``."""
    return Path(shutil.copytree(MULTI_FIXTURE, tmp_path / "multi"))


# -- running the command line ----------------------------------------------------------


def run_cli(*args: str):
    """Run ``vblora-store ARGS`` in-process; the result has ``exit_code``, ``stdout``, ``stderr``."""
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def run_module(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m vblora_store ARGS`` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "vblora_store", *[str(a) for a in args]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- proving a folder was not touched ------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), plus every sub-folder (-> b"<dir>")."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def leftovers(parent: Path) -> list[str]:
    """Names under ``parent`` that look like vblora_store's temporary folders."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(".vblora-store-tmp-"))
