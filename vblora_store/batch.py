"""Batch conversion: every adapter folder under a tree, converted into the same layout elsewhere.

An *adapter root* is a folder holding ``adapter_config.json`` that lies under
no other adapter root: PEFT's layout puts a root's other adapters in its
immediate sub-folders, so they are converted with their root, and nothing
inside a root is searched further.  Hidden folders (such as vblora_store's own
``.vblora-store-tmp-*``) and symbolic links to folders are never entered, so
discovery cannot loop or leave the tree.

Each root is converted by :func:`vblora_store.precision.convert` into the same
relative path under the destination tree, atomically on its own; a broken
adapter is reported by its path and stops none of the others.  With
``jobs > 1`` the roots are shared among worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .config import CONFIG_NAME
from .errors import AdapterNotFoundError, VBLoRAStoreError
from .format import StorageForm, check_destination
from .precision import convert
from .choices import BankDtype, WeightsDtype
from .results import EXIT_BAD_INPUT, EXIT_OK, Result
from .sources import resolve_source

__all__ = ["BatchItem", "BatchResult", "find_adapter_roots", "convert_tree"]


@dataclass(frozen=True)
class BatchItem:
    """The outcome of one adapter root: ``error`` is ``None`` when it converted."""

    src: Path
    dst: Path
    error: Optional[str] = None


@dataclass
class BatchResult(Result):
    """Every root's outcome, in discovery order; ``exit_code`` 2 when an adapter failed."""

    items: list[BatchItem] = field(default_factory=list)

    @property
    def converted(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is None]

    @property
    def failed(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is not None]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_BAD_INPUT

    def text(self) -> str:
        """The summary line (the command line prints each failure on stderr before it)."""
        return f"converted {len(self.converted)}, failed {len(self.failed)}"

    def json(self) -> str:
        items = [{"src": str(i.src), "dst": str(i.dst), "error": i.error} for i in self.items]
        return json.dumps(
            {"items": items, "converted": len(self.converted), "failed": len(self.failed), "passed": self.passed},
            indent=2,
        )

    def markdown(self) -> str:
        lines = ["| source | destination | result |", "|---|---|---|"]
        lines += [
            f"| `{i.src}` | `{i.dst}` | {'converted' if i.error is None else i.error} |" for i in self.items
        ]
        return "\n".join(lines + ["", self.text()])


#: Called after each root with ``(done, total, item)``.
Progress = Callable[[int, int, BatchItem], None]


def find_adapter_roots(src_root: Union[str, Path]) -> list[Path]:
    """Every adapter root under ``src_root`` (``src_root`` itself included), sorted.

    Args:
        src_root: A folder (a symbolic link to one is followed; links inside are not).

    Returns:
        The roots, as paths under ``src_root``.

    Raises:
        AdapterNotFoundError: ``src_root`` is not a folder.

    Example:
        >>> [str(p) for p in find_adapter_roots("fixtures")]
        ['fixtures/tiny-llama-vblora', 'fixtures/tiny-llama-vblora-multi']
    """
    src_root = Path(src_root)
    if not src_root.is_dir():
        raise AdapterNotFoundError(
            f"{src_root}: not a folder; pass the folder that holds the adapter folders."
        )
    roots = []
    for folder, subfolders, _ in os.walk(src_root):  # os.walk never enters a linked folder
        if (Path(folder) / CONFIG_NAME).is_file():
            roots.append(Path(folder))
            subfolders.clear()  # its sub-folders are its own adapters
        else:
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    return sorted(roots)


def convert_tree(
    src_root: Union[str, Path],
    dst_root: Union[str, Path],
    *,
    to: Union[StorageForm, str] = StorageForm.TOPK,
    jobs: int = 1,
    force: bool = False,
    weights_dtype: Union[WeightsDtype, str, None] = None,
    bank_dtype: Union[BankDtype, str, None] = None,
    max_error: Optional[float] = None,
    progress: Optional[Progress] = None,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> BatchResult:
    """Convert every adapter root under ``src_root`` into the same relative path under ``dst_root``.

    ``dst_root`` may exist (it is a tree); each adapter's destination follows
    ``force``.  A failure is recorded with its message and the others go on.

    Args:
        src_root: The tree to search (see :func:`find_adapter_roots`).
        dst_root: The tree to write; neither inside ``src_root`` nor holding it.
        to, force, weights_dtype, bank_dtype, max_error: As for :func:`vblora_store.precision.convert`.
        jobs: Worker processes; 1 converts in this process.
        progress: Called after each adapter root, in completion order.
        revision, subfolder: Of a Hub repo id given as ``src_root`` (or a sub-folder of a local one).

    Returns:
        The :class:`BatchResult`, items in discovery order.

    Raises:
        AdapterNotFoundError: ``src_root`` is not a folder, or holds no adapter.
        DestinationExistsError: ``dst_root`` and ``src_root`` overlap.

    Example:
        >>> result = convert_tree("fixtures", tmp / "packed", to="packed")
        >>> len(result.converted), len(result.failed), result.exit_code
        (2, 0, 0)
    """
    src_root, dst_root = resolve_source(src_root, revision=revision, subfolder=subfolder), Path(dst_root)
    roots = find_adapter_roots(src_root)
    if not roots:
        raise AdapterNotFoundError(f"{src_root}: no {CONFIG_NAME} anywhere under it; check the path.")
    check_destination(dst_root, force=True, sources=(src_root,))
    tasks = [(root, dst_root / root.relative_to(src_root)) for root in roots]
    given = dict(weights_dtype=weights_dtype, bank_dtype=bank_dtype, max_error=max_error)
    options = dict(to=StorageForm(to), force=force, **{k: v for k, v in given.items() if v is not None})
    outcomes: dict[Path, BatchItem] = {}

    def record(item: BatchItem) -> None:
        outcomes[item.src] = item
        if progress is not None:
            progress(len(outcomes), len(tasks), item)

    if jobs <= 1:
        for src, dst in tasks:
            record(BatchItem(src, dst, _convert_one(src, dst, options)))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker) as pool:
            futures: dict[Future, tuple[Path, Path]] = {
                pool.submit(_convert_one, src, dst, options): (src, dst) for src, dst in tasks
            }
            for future in as_completed(futures):
                src, dst = futures[future]
                error = future.exception()
                message = (
                    future.result() if error is None else f"worker process failed ({type(error).__name__})"
                )
                record(BatchItem(src, dst, message))
    return BatchResult([outcomes[src] for src, _ in tasks])


def _convert_one(src: Path, dst: Path, options: dict) -> Optional[str]:
    """Convert one adapter root; the error message, or ``None`` on success (strings cross processes)."""
    try:
        convert(src, dst, **options)
    except VBLoRAStoreError as e:
        return str(e)
    except Exception as e:  # a bug, or input no check caught: reported, and the batch goes on
        return f"unexpected {type(e).__name__}: {e}; report it."
    return None


def _init_worker() -> None:
    """One torch thread per worker: the workers already use every core between them."""
    import torch

    torch.set_num_threads(1)
