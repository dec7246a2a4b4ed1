"""PEFT 0.21.2's ``tests/`` folder, fetched with pip once and kept in a cache folder.

``pip download --no-deps --no-binary :all: peft==0.21.2`` gives the source
distribution, which holds PEFT's test suite; only its ``tests/`` folder is
extracted. A second call finds it in the cache and downloads nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PEFT_VERSION = "0.21.2"
_SDIST_ROOT = f"peft-{PEFT_VERSION}"

#: PEFT's pytest configuration adds coverage options we do not install; ours declares its markers only.
_PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""


class FetchError(RuntimeError):
    """pip could not download PEFT's source distribution (offline, or no such release)."""


def cache_dir() -> Path:
    """Where the extracted suite lives: ``$VBLORA_PEFT_SUITE_CACHE``, else the user's cache folder."""
    explicit = os.environ.get("VBLORA_PEFT_SUITE_CACHE")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vblora-store" / "peft-suite"


def suite_root() -> Path:
    """The folder holding PEFT's ``tests/`` (and our ``pytest.ini``), fetched on first use.

    Returns:
        ``<cache>/peft-0.21.2``, with ``tests/`` a package (``__init__.py`` added: PEFT's
        test modules import their helpers relatively).

    Raises:
        FetchError: pip could not download the source distribution.
    """
    root = cache_dir() / _SDIST_ROOT
    if (root / "tests" / "test_vblora.py").is_file() and (root / "pytest.ini").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = _download(Path(tmp))
        staged = Path(tmp) / "staged"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"{_SDIST_ROOT}/tests/") and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuses links and paths out
                tar.extractall(staged, members=members, filter="data")
            else:
                tar.extractall(staged, members=[m for m in members if m.isfile() or m.isdir()])
        (staged / _SDIST_ROOT / "tests" / "__init__.py").touch()
        (staged / _SDIST_ROOT / "pytest.ini").write_text(_PYTEST_INI)
        if not root.exists():
            os.replace(staged / _SDIST_ROOT, root)  # whole or absent, for the next run
    return root


def _download(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"peft=={PEFT_VERSION}", "-d", str(into), "-q", "--timeout", "30", "--retries", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    archives = sorted(into.glob(f"peft-{PEFT_VERSION}.tar.gz"))
    if done.returncode != 0 or not archives:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download peft=={PEFT_VERSION} failed: {last}")
    return archives[0]
