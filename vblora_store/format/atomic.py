"""Atomic destinations: build a result in a temporary folder, then rename it into place.

The temporary folder sits beside the destination (same file system, so the
final rename is atomic) and is named ``.vblora-store-tmp-<name>-<pid>-<random>``,
so a crash's leftovers are recognisable and say which process made them.
Before the rename its folders and files get the modes the umask gives a plain
``mkdir`` or ``open`` (0755 and 0644 under umask 022).  On
any error it is removed and the destination is left as it was.  A process
killed outright (``kill -9``, power loss) cannot clean up: the next write to
the same destination removes the temporary siblings whose process is gone
(:func:`remove_stale_temps`), never those of a process still running.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from ..errors import DestinationExistsError, VBLoRAStoreError, WriteError, os_problem

__all__ = [
    "TMP_PREFIX",
    "check_destination",
    "atomic_folder",
    "atomic_file",
    "remove_stale_temps",
    "plain_file_mode",
]

TMP_PREFIX = ".vblora-store-tmp-"
# <prefix><destination name>-<pid>-<tempfile's 8 random characters>; the name may hold "-" itself.
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(?P<dst>.+)-(?P<pid>\d{1,10})-[a-z0-9_]{8}")


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
        raise DestinationExistsError(
            f"{dst}: already exists; pass --force to replace it, or choose another path."
        )
    return dst


def remove_stale_temps(dst: Union[str, Path]) -> list[Path]:
    """Remove the temporary siblings of ``dst`` left by processes that no longer run.

    Only names this module makes for the same destination name are touched,
    and only when the process id they carry is not alive, so two runs writing
    the same destination at once never delete each other's work.

    Args:
        dst: A destination folder or file.

    Returns:
        The paths removed.

    Example:
        >>> (tmp / ".vblora-store-tmp-adapter-topk-999999999-k2j9x0aq").mkdir()  # a dead process's
        >>> [p.name for p in remove_stale_temps(tmp / "adapter-topk")]
        ['.vblora-store-tmp-adapter-topk-999999999-k2j9x0aq']
    """
    dst = Path(dst)
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _TMP_NAME.fullmatch(path.name)
        if match is None or match["dst"] != dst.name or _process_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def atomic_folder(dst: Union[str, Path], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it becomes ``dst``.

    Stale temporary folders of ``dst`` (from killed runs) are removed first.

    Args:
        dst: The final folder.
        force: Replace ``dst`` if it exists (it is moved aside, the new folder is
            renamed in, then the old one is deleted).

    Example:
        >>> with atomic_folder(tmp / "out") as work:
        ...     _ = (work / "a.txt").write_text("hello")
        >>> (tmp / "out" / "a.txt").read_text()
        'hello'
    """
    dst = check_destination(dst, force=force)
    with _write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dst)
        work = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), dir=dst.parent))
    try:
        with _write_errors(dst, work):
            yield work
        with _write_errors(dst):
            _default_modes(work)
            _fsync_tree(work)
            if dst.exists() or dst.is_symlink():
                check_destination(dst, force=force)
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), dir=dst.parent))
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
        >>> with atomic_file(tmp / "note.txt") as work:
        ...     _ = work.write_text("done")
        >>> (tmp / "note.txt").read_text()
        'done'
    """
    dst = Path(dst)
    with _write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dst)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(dst), dir=dst.parent)
        os.close(fd)
        work = Path(name)
        os.chmod(work, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        with _write_errors(dst, work):
            yield work
        with _write_errors(dst):
            with open(work, "rb") as f:
                os.fsync(f.fileno())
            os.replace(work, dst)
    finally:
        work.unlink(missing_ok=True)


@contextmanager
def _write_errors(dst: Path, work: Optional[Path] = None) -> Iterator[None]:
    """Turn the operating system's refusals while writing ``dst`` into one :class:`WriteError` naming ``dst``.

    Inside the caller's block (``work`` given), an ``OSError`` about another
    file (a source that cannot be read, say) is left as it is.
    """
    try:
        yield
    except VBLoRAStoreError:
        raise
    except Exception as e:
        problem = os_problem(e)
        filename = getattr(e, "filename", None)
        elsewhere = work is not None and filename is not None and not _is_under(Path(filename), dst.parent)
        if problem is None or elsewhere:
            raise
        raise WriteError(problem.message("write", dst)) from e


def _is_under(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux (4.7+) shows it.

    Elsewhere it is read by setting it and setting it back; a file another thread creates in that
    moment gets the private mask 077, never a world-writable mode.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a plain ``open`` gives a new file under the current umask (0644 under 022)."""
    return 0o666 & ~_umask()


def _default_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` or ``open`` gets under the umask.

    ``mkdtemp`` makes 0700 folders and safetensors writes 0600 files, so a
    converted adapter would be unreadable by a serving account or a container
    with another uid; PEFT's own saves are 0755/0644 under umask 022.
    """
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _temp_prefix(dst: Path) -> str:
    """``.vblora-store-tmp-<name>-<pid>-``: tempfile appends 8 random characters."""
    return f"{TMP_PREFIX}{dst.name}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (``True`` when that cannot be known)."""
    if os.name != "posix" or pid == os.getpid():
        return True  # signal 0 means something else on Windows: never guess there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we wrote: leave it alone
    return True


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
