"""``modules_to_save``: modules trained in full, one copy per adapter, saved with it.

PEFT's ``ModulesToSaveWrapper`` in small: the original module is kept frozen
as ``original_module`` and each adapter gets a trainable deep copy in
``modules_to_save[adapter]``; the forward runs the active adapter's copy.
"""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Wraps a module that adapters train in full.

    Args:
        original_module: The module to wrap (left untouched).
        name: Its name in the model, for messages.

    Example:
        >>> wrapper = ModulesToSave(nn.Linear(4, 2), name="score")
        >>> wrapper.add_adapter("default")
        >>> sorted(n for n, p in wrapper.named_parameters() if p.requires_grad)
        ['modules_to_save.default.bias', 'modules_to_save.default.weight']
    """

    def __init__(self, original_module: nn.Module, *, name: str):
        super().__init__()
        self.original_module = original_module.requires_grad_(False)  # only the copies train
        self.modules_to_save = nn.ModuleDict()
        self.module_name = name
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False

    def add_adapter(self, adapter: str) -> None:
        """Give ``adapter`` its own trainable copy of the original module."""
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module).requires_grad_(True)
        if self.active_adapter is None:
            self.active_adapter = adapter

    def delete_adapter(self, adapter: str) -> None:
        """Drop ``adapter``'s copy."""
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]
        if self.active_adapter == adapter:
            self.active_adapter = next(iter(self.modules_to_save), None)

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, else the original."""
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)  # e.g. ``model.score.weight``
