"""Files come from strangers: symbolic links that lead out of an adapter folder, and forged zip sizes.

A link inside an adapter folder may lead only inside it (huggingface_hub's
cache, whose snapshot files link to its ``blobs`` folder, excepted); a
``.bin`` must be a ``torch.save`` zip archive whose declared sizes fit in the
file before ``torch.load(weights_only=True)`` may see it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import AdapterNotFoundError, InvalidAdapterError, UnsafePathError
from ..folders import is_within

__all__ = ["check_link", "check_zip_sizes"]


def check_link(file: Path, folder: Path) -> None:
    """Refuse ``file`` if it is a symbolic link whose target lies outside ``folder``.

    A huggingface_hub cache snapshot (``<repo>/snapshots/<rev>/...``) links each
    file to ``<repo>/blobs``; targets there are allowed.
    """
    if not file.is_symlink():
        return
    try:
        base, target = folder.resolve(), file.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # dangling, or a loop (RuntimeError before Python 3.13)
        raise AdapterNotFoundError(
            f"{file}: is a symbolic link that leads to no file ({e}); replace it with the file."
        ) from e
    if is_within(target, base):
        return
    for snapshot in (base, *base.parents):
        blobs = snapshot.parent.parent / "blobs"
        if snapshot.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            if is_within(target, blobs):
                return
            break
    raise UnsafePathError(
        f"{file}: is a symbolic link to {target}, outside the adapter folder {folder}; not followed. "
        "Copy the file into the folder if it is meant to be there."
    )


def check_zip_sizes(path: Path) -> None:
    """Refuse a ``.bin`` that is not a ``torch.save`` zip archive whose entries fit in the file.

    torch's reader allocates each entry's declared size before reading it, so a
    forged size would drive an allocation the file cannot back; ``torch.save``
    stores entries uncompressed, so their sizes can never exceed the file's.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise InvalidAdapterError(
            f"{path}: not a torch.save zip archive ({e}); re-save it with torch.save or as safetensors."
        ) from e
    declared = sum(e.file_size for e in entries)
    if declared > path.stat().st_size or any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise InvalidAdapterError(
            f"{path}: its zip entries declare {declared:,} bytes (or compression) that the file cannot hold; "
            "the file is damaged or forged, fetch it again."
        )
