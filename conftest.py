"""The doctests of the package (``--doctest-modules``) run against tiny, real objects; nothing is downloaded.

Each docstring's example may use: ``tmp`` (a fresh folder), ``base`` (a 2-layer
random Llama, as the fixtures were made on), ``model`` (``base`` with the
``fixtures/tiny-llama-vblora`` adapter loaded), ``ids`` (token ids for it),
``checkpoint`` (a saved transformers checkpoint of ``base``), and ``torch``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
collect_ignore = [] if importlib.util.find_spec("triton") else ["vblora_store/engine/triton_kernels.py"]


@pytest.fixture(autouse=True)
def _doctest_objects(request, tmp_path, monkeypatch):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import torch

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    namespace = request.getfixturevalue("doctest_namespace")
    monkeypatch.chdir(ROOT)
    base = fixtures.tiny_llama()
    from vblora_store.engine import VBLoRAModel

    model = VBLoRAModel.from_pretrained(fixtures.tiny_llama(), ROOT / "fixtures" / "tiny-llama-vblora")
    base.save_pretrained(tmp_path / "checkpoint")
    namespace.update(
        tmp=tmp_path, base=base, model=model, ids=fixtures.random_batch(seed=1, batch=2, length=5),
        checkpoint=tmp_path / "checkpoint", torch=torch,
    )  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
