"""``modules_to_save``: modules trained in full, one copy per adapter, saved with it.

PEFT's ``ModulesToSaveWrapper`` in small: the original module is kept frozen
as ``original_module`` and each adapter gets a trainable deep copy in
``modules_to_save[adapter]``; the forward runs the active adapter's copy,
or, in a mixed-adapter call, each row's adapter's copy (``"__base__"`` and
adapters without a copy here: the original).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..errors import AdapterNamesError
from .routing import BASE_ADAPTER, BatchRoute

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Wraps a module that adapters train in full.

    Args:
        original_module: The module to wrap (left untouched).
        name: Its name in the model, for messages.
        route: The model's :class:`~vblora_store.engine.routing.BatchRoute` (shared).

    Example:
        >>> wrapper = ModulesToSave(nn.Linear(4, 2), name="score")
        >>> wrapper.add_adapter("default")
        >>> sorted(n for n, p in wrapper.named_parameters() if p.requires_grad)
        ['modules_to_save.default.bias', 'modules_to_save.default.weight']
    """

    adapter_layer_names = ("modules_to_save",)  # PEFT's: the per-adapter copies, by adapter name
    other_param_names = ()

    def __init__(self, original_module: nn.Module, *, name: str, route: Optional[BatchRoute] = None):
        super().__init__()
        object.__setattr__(self, "_route", BatchRoute() if route is None else route)
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
    def active_adapters(self) -> list[str]:
        """``[active_adapter]``, or ``[]`` (PEFT's plural form; one copy runs at a time)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, else the original."""
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        if self._route.rows is not None and not self.disable_adapters and args:
            return self._mixed(*args, **kwargs)
        return self.active_module(*args, **kwargs)

    def _mixed(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of ``x`` through its adapter's copy: one call per distinct adapter (PEFT's way).

        The copies are arbitrary modules, so they cannot be stacked like the
        VB-LoRA factors; heads and embeddings are cheap next to the model.
        """
        names = self._route.names_for(x.shape[0], self.module_name)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name if name in self.modules_to_save else BASE_ADAPTER, []).append(row)
        if len(groups) == 1:
            (name,) = groups
            return (self.original_module if name == BASE_ADAPTER else self.modules_to_save[name])(
                x, *args, **kwargs
            )
        out = None
        for name, rows in groups.items():
            module = self.original_module if name == BASE_ADAPTER else self.modules_to_save[name]
            index = torch.tensor(rows, device=x.device)
            part = module(x.index_select(0, index), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise AdapterNamesError(
                    f"module {self.module_name!r} (modules_to_save) returns {type(part).__name__}, not a tensor, "
                    "so its rows cannot be mixed; run such a model one adapter at a time (set_adapter)."
                )
            if out is None:
                out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, index, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)  # e.g. ``model.score.weight``
