"""Bank-vector usage: how often each vector of the bank is selected, and a plot of it.

A vector no slot selects is dead weight in every form; many unused vectors
suggest a smaller ``num_vectors`` would do.  Plotting needs matplotlib
(``pip install 'vblora_store[plot]'``); counting does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from .errors import VBLoRAStoreError
from .format.atomic import atomic_file
from .factors import module_topk
from .format.stored import StoredAdapter

__all__ = ["BankUsage", "bank_usage", "plot_usage"]


@dataclass(frozen=True)
class BankUsage:
    """Selection counts of one adapter's bank vectors."""

    adapter: str  # "<path> [<name>]"
    counts: torch.Tensor  # (N,) int64

    @property
    def unused(self) -> list[int]:
        """Indices of vectors no slot selects."""
        return torch.nonzero(self.counts == 0).flatten().tolist()


def bank_usage(adapter: StoredAdapter) -> BankUsage:
    """Count how many times each bank vector is among a slot's top-k.

    Args:
        adapter: Any form; a full adapter's top-k is taken from its logits.

    Returns:
        Its :class:`BankUsage`.

    Raises:
        InvalidAdapterError: a stored index lies outside ``[0, num_vectors)``.

    Example:
        >>> from vblora_store import read_adapters
        >>> usage = bank_usage(read_adapters("fixtures/tiny-llama-vblora")[0])
        >>> usage.unused, len(usage.counts)
        ([], 64)
    """
    n = adapter.config.num_vectors
    counts = torch.zeros(n, dtype=torch.int64)
    for module in adapter.modules:
        selected = module_topk(adapter, module)  # checked: bincount allocates max + 1
        for indices in (selected.a_indices, selected.b_indices):
            counts += torch.bincount(indices.reshape(-1).long(), minlength=n)  # (..., k) -> (slots·k,)
    return BankUsage(f"{adapter.folder} [{adapter.name}]", counts)


def plot_usage(usages: list[BankUsage], path: Union[str, Path]) -> None:
    """Write a PNG with one bar chart per adapter; unused vectors are marked in red.

    Raises:
        VBLoRAStoreError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise VBLoRAStoreError(
            f"{path}: plotting needs matplotlib; pip install 'vblora_store[plot]', or drop --plot."
        ) from e
    fig, axes = plt.subplots(len(usages), 1, figsize=(10, 2.6 * len(usages)), squeeze=False)
    for ax, usage in zip(axes[:, 0], usages):
        counts = usage.counts.numpy()
        ax.bar(range(len(counts)), counts, width=1.0, color="#3b6ea8")
        for index in usage.unused:
            ax.axvline(index, color="#d62728", linewidth=0.6, alpha=0.6)
        ax.set_title(
            f"{usage.adapter}: {len(usage.unused)} of {len(counts)} vectors unused (red)", fontsize=9
        )
        ax.set_xlabel("bank vector")
        ax.set_ylabel("times selected")
        ax.set_xlim(-0.5, len(counts) - 0.5)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    plt.close(fig)
