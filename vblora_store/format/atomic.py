"""Atomic destinations: build a result in a temporary folder, then rename it into place.

The temporary folder sits beside the destination (same file system, so the
final rename is atomic) and is named ``.vblora-store-tmp-<name>-<random>`` so a
crash's leftovers are recognisable.  On any error it is removed and the
destination is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from ..errors import DestinationExistsError

__all__ = ["TMP_PREFIX", "check_destination", "atomic_folder", "atomic_file"]

TMP_PREFIX = ".vblora-store-tmp-"


def check_destination(dst: Union[str, Path], *, force: bool, sources: tuple[Path, ...] = ()) -> Path:
    """Refuse a destination that exists (unless ``force``) or that is, or holds, a source.

    Call it before any work, so a refusal costs nothing.

    Raises:
        DestinationExistsError: with the fix (``--force`` or another path).
    """
    dst = Path(dst)
    resolved = dst.resolve()
    for src in sources:
        src = src.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise DestinationExistsError(
                f"{dst}: is the source {src} or inside it; write to another folder, the input is never modified."
            )
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationExistsError(f"{dst}: already exists; pass --force to replace it, or choose another path.")
    return dst


@contextmanager
def atomic_folder(dst: Union[str, Path], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it becomes ``dst``.

    Args:
        dst: The final folder.
        force: Replace ``dst`` if it exists (it is moved aside, the new folder is
            renamed in, then the old one is deleted).

    Example:
        >>> with atomic_folder(tmp / "out") as work:  # doctest: +SKIP
        ...     (work / "a.txt").write_text("hello")
    """
    dst = check_destination(dst, force=force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-", dir=dst.parent))
    try:
        yield work
        _fsync_tree(work)
        if dst.exists() or dst.is_symlink():
            check_destination(dst, force=force)
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(work, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dst)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def atomic_file(dst: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on a clean exit it replaces ``dst``.

    Example:
        >>> with atomic_file("usage.png") as tmp:  # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dst.name}-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    work = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield work
        with open(work, "rb") as f:
            os.fsync(f.fileno())
        os.replace(work, dst)
    finally:
        work.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
