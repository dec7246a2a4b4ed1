"""``VBLoRAModel``: VB-LoRA adapters on a torch or transformers model, with PEFT's API.

The wrapped model is ``self.model``; targeted layers are replaced in place by
:class:`~vblora_store.engine.layer.VBLoRALinear`, ``modules_to_save`` by
:class:`~vblora_store.engine.trainable.ModulesToSave`; each adapter's vector
bank is registered once, in ``self.vblora_vector_bank``.  Files are read and
written through the format layer, in PEFT's exact layout.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..config import VBLoRAConfig
from ..errors import AdapterStateError, TargetingError
from ..format.conversion import write_adapter
from ..format.keys import BANK_KEY, StorageForm, indices_key, logits_key, weights_key
from ..format.peft import StoredAdapter, read_adapter
from ..hub import resolve_source
from .cache import FactorCache
from .layer import TopKSlice, TopKTensors, VBLoRALinear, check_fits, layer_features
from .routing import BatchRoute
from .serving import close_route, generate_multiples, open_route, routing
from .state import (
    adapter_layers,
    adapter_state_dict,
    load_other_tensors,
    other_parameters,
    savable_parameter_counts,
)
from .targeting import CLASSIFIER_HEADS, conv1d_class, find_targets
from .trainable import ModulesToSave

__all__ = ["VBLoRAModel"]

_WRAPPERS = (VBLoRALinear,)


def _call_wrapped(self: "VBLoRAModel", *args: Any, **kwargs: Any) -> Any:
    """Call the wrapped model."""
    return self._forward(*args, **kwargs)


class _WrappedForward:
    """``VBLoRAModel.forward``: calls the wrapped model and shows its signature.

    ``inspect.signature(model.forward)`` is then the wrapped model's, so
    transformers' Trainer keeps the dataset columns it names (it drops the
    others); on the class it is a plain ``(self, *args, **kwargs)`` function.
    """

    def __get__(self, obj: Optional["VBLoRAModel"], owner: type) -> Callable[..., Any]:
        if obj is None:
            return _call_wrapped

        @functools.wraps(obj.model.forward)
        def call(*args: Any, **kwargs: Any) -> Any:
            return obj._forward(*args, **kwargs)

        return call


class VBLoRAModel(nn.Module):
    """A model with VB-LoRA adapters; PEFT's ``PeftModel`` API for VB-LoRA.

    Args:
        model: A ``torch.nn.Module`` (a transformers model or any other).
        config: The new adapter's config.
        adapter_name: Its name.
        low_cpu_mem_usage: Allocate the new adapter on the ``meta`` device (fill
            it later with :meth:`load_adapter` under the same name).
        max_cached_factors: Most adapters whose dense factors are kept built at
            once (least recently used out first); ``None`` keeps every one run.

    Example:
        >>> model = VBLoRAModel(base, VBLoRAConfig(r=4, num_vectors=256, vector_length=64,
        ...                                        target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
        >>> model.save_pretrained("out", save_only_topk_weights=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        config: VBLoRAConfig,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        *,
        max_cached_factors: Optional[int] = None,
    ):
        self._setup(model, max_cached_factors)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)

    def _setup(self, model: nn.Module, max_cached_factors: Optional[int]) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.vblora_vector_bank = nn.ParameterDict()
        self.vblora_topk = nn.ModuleDict()  # TopKTensors of each adapter held in top-k form
        self.factor_cache = FactorCache(max_cached_factors)
        self._route = BatchRoute()
        self.peft_config: dict[str, VBLoRAConfig] = {}
        self.storage_form: dict[str, StorageForm] = {}
        self.targeted_module_names: list[str] = []
        self.active_adapter: Optional[str] = None
        self._placeholders: set[str] = set()  # adapters allocated on "meta", awaiting load_adapter

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: Union[str, Path],
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        max_cached_factors: Optional[int] = None,
    ) -> "VBLoRAModel":
        """Wrap ``model`` with the adapter saved at ``path`` (full, top-k or packed form).

        Args:
            model: The base model the adapter was trained on.
            path: A folder holding ``adapter_config.json`` and the weights, or a
                Hub repo id (``namespace/name``).
            adapter_name: The name to give the adapter.
            is_trainable: Keep training it (full form only); otherwise the
                adapter is frozen and the model put in eval mode.
            low_cpu_mem_usage: Accepted for PEFT compatibility; loading never
                allocates a random adapter first, so memory is always low.
            revision: Branch, tag or commit of a Hub repo.
            subfolder: The adapter's folder inside the repo or the local folder.
            max_cached_factors: Most adapters whose dense factors are kept
                built at once (see :class:`VBLoRAModel`).

        Returns:
            The wrapped model.

        Raises:
            AdapterStateError: ``is_trainable`` with a top-k adapter.
            TargetingError: the adapter's modules do not fit ``model``.

        Example:
            >>> model = VBLoRAModel.from_pretrained(base, "adapters/topk")  # doctest: +SKIP
        """
        self = cls.__new__(cls)
        self._setup(model, max_cached_factors)
        self.load_adapter(
            path,
            adapter_name,
            is_trainable=is_trainable,
            low_cpu_mem_usage=low_cpu_mem_usage,
            revision=revision,
            subfolder=subfolder,
        )
        return self

    # -- adding adapters ---------------------------------------------------------------

    def add_adapter(
        self, adapter_name: str, config: VBLoRAConfig, *, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a freshly initialised adapter (trainable if it is the first one, like PEFT).

        Example:
            >>> model.add_adapter("second", VBLoRAConfig(target_modules=["q_proj"]))  # doctest: +SKIP
        """
        self._inject(adapter_name, config, None, low_cpu_mem_usage=low_cpu_mem_usage)
        if low_cpu_mem_usage:
            self._placeholders.add(adapter_name)
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._set_requires_grad(adapter_name, adapter_name == self.active_adapter)

    def load_adapter(
        self,
        path: Union[str, Path],
        adapter_name: str,
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
    ) -> None:
        """Load the adapter saved at ``path`` under ``adapter_name`` (it does not become active).

        Args:
            path: A folder holding ``adapter_config.json`` and the weights, or a
                Hub repo id (``namespace/name``).
            adapter_name: The name to give it; may be a ``low_cpu_mem_usage``
                placeholder, which is then replaced.
            is_trainable: Make it trainable (full form only); otherwise the
                model is put in eval mode, as PEFT does.
            low_cpu_mem_usage: Accepted for PEFT compatibility (always low).
            revision: Branch, tag or commit of a Hub repo.
            subfolder: The adapter's folder inside the repo or the local folder.

        Raises:
            AdapterStateError: ``is_trainable`` with a top-k adapter, or the name is taken.
        """
        folder = resolve_source(path, revision=revision, subfolder=subfolder, nested=False)
        stored = read_adapter(folder, name=adapter_name)
        if is_trainable and not stored.form.has_logits:
            raise AdapterStateError(
                f"{stored.folder}: the adapter is stored in {stored.form.value} form, which keeps the "
                "top-k weights but not the logits, so it cannot be trained. Load it with "
                "is_trainable=False, or train from the full-form adapter."
            )
        if adapter_name in self._placeholders:
            self.delete_adapter(adapter_name)
        self._inject(adapter_name, stored.config, stored)
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._set_requires_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()

    def _prepared_config(self, config: VBLoRAConfig) -> VBLoRAConfig:
        """A copy of ``config`` with the task head PEFT adds to ``modules_to_save``."""
        config = dataclasses.replace(config)
        heads = CLASSIFIER_HEADS.get(str(config.task_type), [])
        if heads:
            config.modules_to_save = list(config.modules_to_save or []) + [
                h for h in heads if h not in (config.modules_to_save or [])
            ]
        return config

    def _fan_in_fan_out(self, config: VBLoRAConfig, base: nn.Module, name: str) -> bool:
        """PEFT's correction: False for a Linear, True for a Conv1D, warning if the config disagrees."""
        conv1d = conv1d_class()
        if conv1d is not None and isinstance(base, conv1d):
            if not config.fan_in_fan_out:
                warnings.warn(
                    f"{name}: fan_in_fan_out is False but the target is Conv1D; setting it to True."
                )
                config.fan_in_fan_out = True
        elif config.fan_in_fan_out:
            warnings.warn(f"{name}: fan_in_fan_out is True but the target is nn.Linear; setting it to False.")
            config.fan_in_fan_out = False
        return config.fan_in_fan_out

    def _inject(
        self,
        adapter: str,
        config: VBLoRAConfig,
        stored: Optional[StoredAdapter],
        *,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Wrap the targeted layers with ``adapter``: fresh (PEFT's init and RNG order) or from ``stored``.

        Every check runs before the model changes; if reading the file fails
        half-way, what was added is removed again.
        """
        if adapter in self.peft_config:
            raise AdapterStateError(
                f"an adapter named {adapter!r} exists; delete_adapter() it or pick another name."
            )
        if not adapter or "." in adapter:
            raise AdapterStateError(f"adapter name {adapter!r} is empty or has a '.'; pick a plain name.")
        config = self._prepared_config(config)
        plan = self._plan(config, stored)
        try:
            self._wrap(adapter, config, stored, plan, meta=low_cpu_mem_usage and stored is None)
        except BaseException:
            self._forget(adapter)
            raise

    def _plan(
        self, config: VBLoRAConfig, stored: Optional[StoredAdapter]
    ) -> list[tuple[str, nn.Module, bool]]:
        """``(name, base layer, fan_in_fan_out)`` of every target, all checked; the model is not touched."""
        names = find_targets(
            self.model, config, modules_to_save=list(config.modules_to_save or []), skip=_WRAPPERS
        )
        if stored is not None and set(names) != set(stored.modules):
            missing = sorted(set(stored.modules) - set(names))[:3]
            extra = sorted(set(names) - set(stored.modules))[:3]
            raise TargetingError(
                f"{stored.folder}: the adapter's modules do not match this model's targets (in the file "
                f"only: {missing}; targeted but absent from the file: {extra}); load it on the model it "
                "was trained on."
            )
        plan = []
        for name in names:
            module = self.model.get_submodule(name)
            base = module.base_layer if isinstance(module, VBLoRALinear) else module
            fan = self._fan_in_fan_out(config, base, name)
            check_fits(name, *layer_features(base, fan), config.vector_length)
            plan.append((name, base, fan))
        return plan

    def _wrap(
        self, adapter: str, config: VBLoRAConfig, stored: Optional[StoredAdapter], plan, *, meta: bool
    ) -> None:
        """Add ``adapter`` to every planned layer, its bank, its ``modules_to_save`` copies."""
        self.peft_config[adapter] = config
        self.storage_form[adapter] = StorageForm.FULL if stored is None else stored.form
        n, length, bound = config.num_vectors, config.vector_length, config.init_vector_bank_bound
        bank = torch.zeros(n, length, device="meta" if meta else "cpu")
        topk_indices, topk_weights, start = [], [], 0
        for name, base, fan in plan:
            module = self.model.get_submodule(name)
            if not isinstance(module, VBLoRALinear):
                module = VBLoRALinear(
                    base,
                    self.vblora_vector_bank,
                    name=name,
                    fan_in_fan_out=fan,
                    topk_store=self.vblora_topk,
                    cache=self.factor_cache,
                    route=self._route,
                )
                self._set_child(name, module)
            device = base.weight.device
            if stored is None:
                if not meta:
                    bank.uniform_(-bound, bound)  # PEFT redraws the bank per module; the last draw is kept
                module.add_full(adapter, config, device="meta" if meta else device)
            elif stored.form.has_logits:
                logits = [stored.checked_tensor(logits_key(name, side)).to(device) for side in "AB"]
                module.add_full(adapter, config, *logits)
            else:
                a_idx, a_w, b_idx, b_w = [
                    stored.checked_tensor(key(name, s)) for s in "AB" for key in (indices_key, weights_key)
                ]
                where = TopKSlice(start, tuple(a_idx.shape[:2]), tuple(b_idx.shape[:2]))
                for part in (a_idx, b_idx):
                    topk_indices.append(part.reshape(-1, part.shape[-1]))  # (rows, cols, k) -> (slots, k)
                for part in (a_w, b_w):
                    topk_weights.append(part.reshape(-1, part.shape[-1]))  # (rows, cols, k-1) -> (slots, k-1)
                start = where.b_slots.stop
                module.add_topk(adapter, config, where)
            if name not in self.targeted_module_names:
                self.targeted_module_names.append(name)
        device = plan[0][1].weight.device
        if stored is not None:
            bank = stored.checked_tensor(BANK_KEY)
        if topk_indices:
            self.vblora_topk[adapter] = TopKTensors(
                torch.cat(topk_indices).to(device), torch.cat(topk_weights).to(device)
            )
        self.vblora_vector_bank[adapter] = nn.Parameter(bank if meta else bank.to(device))
        self._add_modules_to_save(adapter, list(config.modules_to_save or []))
        if stored is not None:
            load_other_tensors(self.model, stored, adapter)
        self._activate(self.active_adapter or adapter)

    def _add_modules_to_save(self, adapter: str, names: list[str]) -> None:
        # PEFT's rule (``_set_trainable``): a plain suffix match, so "norm" also takes "input_layernorm".
        for key, module in list(self.model.named_modules()):
            if not key or not any(key.endswith(n) for n in names):
                continue
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, name=key, route=self._route)
                self._set_child(key, module)
            module.add_adapter(adapter)

    def _set_child(self, name: str, module: nn.Module) -> None:
        """Put ``module`` at ``name`` in the wrapped model."""
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    # -- which adapter runs --------------------------------------------------------------

    def _wrappers(self) -> Iterator[nn.Module]:
        return (m for m in self.model.modules() if isinstance(m, (VBLoRALinear, ModulesToSave)))

    def _activate(self, adapter: Optional[str]) -> None:
        for module in self._wrappers():
            module.active_adapter = adapter
        self.active_adapter = adapter

    def _check_known(self, adapter: str) -> None:
        if adapter not in self.peft_config:
            raise AdapterStateError(
                f"no adapter named {adapter!r}; this model has {sorted(self.peft_config)}."
            )

    def _set_requires_grad(self, adapter: str, trainable: bool) -> None:
        """PEFT's trainability: the base frozen; the adapter's bank, logits and copies as asked."""
        trainable = trainable and self.storage_form[adapter].has_logits
        if len(self.peft_config) == 1:
            self.model.requires_grad_(False)
        self.vblora_vector_bank[adapter].requires_grad_(trainable)
        for _, layer in adapter_layers(self.model, adapter):
            for holder in (layer.vblora_logits_A, layer.vblora_logits_B):
                if adapter in holder:
                    holder[adapter].requires_grad_(trainable)
        for module in self.model.modules():
            if isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
                module.modules_to_save[adapter].requires_grad_(trainable)
        if trainable:  # and the biases its bias mode trains: exactly what saving it writes
            for param in other_parameters(self.model, adapter, self.peft_config[adapter]).values():
                param.requires_grad_(True)

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (PEFT's plural form)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter; like PEFT it becomes trainable unless ``inference_mode``.

        Other adapters are frozen.  A merged model is unmerged first, with a warning.
        """
        self._check_known(adapter_name)
        if any(getattr(m, "merged", False) for m in self._wrappers()):
            warnings.warn("set_adapter on a merged model: unmerging first.")
            self.unmerge_adapter()
        for name in self.peft_config:
            self._set_requires_grad(name, name == adapter_name and not inference_mode)
        self._activate(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; if it was active, the first remaining one becomes active."""
        self._check_known(adapter_name)
        self._forget(adapter_name)

    def _forget(self, adapter: str) -> None:
        """Remove whatever part of ``adapter`` exists; unwrap what holds no adapter any more."""
        for module in list(self._wrappers()):
            module.delete_adapter(adapter)
            if isinstance(module, VBLoRALinear) and not module.adapters:
                self._replace(module, module.base_layer)
                self.factor_cache.unregister(module)
            elif isinstance(module, ModulesToSave) and not len(module.modules_to_save):
                self._replace(module, module.original_module)
        if adapter in self.vblora_vector_bank:
            del self.vblora_vector_bank[adapter]
        if adapter in self.vblora_topk:
            del self.vblora_topk[adapter]
        self.factor_cache.release(adapter)
        self.peft_config.pop(adapter, None)
        self.storage_form.pop(adapter, None)
        self._placeholders.discard(adapter)
        held = {n for n, m in self.model.named_modules() if isinstance(m, VBLoRALinear)}
        self.targeted_module_names = [n for n in self.targeted_module_names if n in held]
        if self.active_adapter == adapter:
            self._activate(next(iter(self.peft_config), None))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (a merged adapter is unmerged).

        Example:
            >>> with model.disable_adapter():  # doctest: +SKIP
            ...     base_logits = model(input_ids).logits
        """
        wrappers = list(self._wrappers())
        for module in wrappers:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in wrappers:
                module.disable_adapters = False

    # -- merging and unloading -------------------------------------------------------------

    def _layers(self) -> Iterator[VBLoRALinear]:
        return (m for m in self.model.modules() if isinstance(m, VBLoRALinear))

    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Merge the active adapter into the base weights (undo with :meth:`unmerge_adapter`)."""
        if self.active_adapter is None:
            raise AdapterStateError("no active adapter to merge; set_adapter() one first.")
        for layer in self._layers():
            if self.active_adapter in layer.r:
                layer.merge(self.active_adapter, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for layer in self._layers():
            layer.unmerge()

    def _replace(self, module: nn.Module, new: nn.Module) -> None:
        """Put ``new`` where ``module`` is in the wrapped model."""
        for key, candidate in self.model.named_modules():
            if candidate is module:
                self._set_child(key, new)
                return

    def _unload(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        if merge:
            self.merge_adapter(safe_merge=safe_merge)
        for module in list(self._wrappers()):
            if isinstance(module, VBLoRALinear):
                self._replace(module, module.base_layer)
                self.factor_cache.unregister(module)
            elif isinstance(module, ModulesToSave):
                self._replace(module, module.active_module)
        return self.model

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Merge the active adapter and return the base model itself, with no wrapper left.

        Args:
            safe_merge: Check every merged weight for NaN/inf before writing it.

        Returns:
            The original model object, its targeted weights updated; the
            active adapter's ``modules_to_save`` copies take the originals' places.

        Example:
            >>> merged = model.merge_and_unload()  # doctest: +SKIP
            >>> merged.save_pretrained("merged-model")  # doctest: +SKIP
        """
        return self._unload(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove every wrapper without merging and return the base model."""
        return self._unload(merge=False)

    # -- saving and counting ------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: Union[str, Path],
        save_only_topk_weights: Optional[bool] = None,
        selected_adapters: Optional[list[str]] = None,
    ) -> None:
        """Save adapters in PEFT's layout: ``default`` at the root, others in sub-folders.

        Args:
            save_directory: The folder (created if missing).
            save_only_topk_weights: Override each adapter's config (``True``
                saves indices and weights only: small, inference only).
            selected_adapters: Which adapters (default: all).

        Example:
            >>> model.save_pretrained("out", save_only_topk_weights=True)  # doctest: +SKIP
        """
        root = Path(save_directory)
        for adapter in selected_adapters or list(self.peft_config):
            self._check_known(adapter)
            config = self.peft_config[adapter]
            topk = config.save_only_topk_weights if save_only_topk_weights is None else save_only_topk_weights
            if config.base_model_name_or_path is None:
                name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            else:
                name_or_path = config.base_model_name_or_path
            saved = dataclasses.replace(
                config,
                save_only_topk_weights=bool(topk),
                inference_mode=True,
                base_model_name_or_path=name_or_path,
            )
            tensors = adapter_state_dict(
                self.model, self.vblora_vector_bank[adapter], adapter, saved, topk=topk
            )
            write_adapter(root if adapter == "default" else root / adapter, saved, tensors)

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """``(vblora_params, other_params)`` that saving ``adapter`` writes (float32-equivalent).

        Unlike PEFT, which sums over every adapter, this counts ``adapter`` alone.
        """
        self._check_known(adapter)
        bank = self.vblora_vector_bank[adapter]
        return savable_parameter_counts(self.model, bank, adapter, self.peft_config[adapter])

    def print_savable_parameters(self, adapter: Optional[str] = None) -> None:
        """Print PEFT's line of savable parameters for ``adapter`` (default: the active one)."""
        vblora, other = self.get_nb_savable_parameters(adapter or self.active_adapter)
        print(
            f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
            f"|| total params to-be-saved: {vblora + other:,d}"
        )

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, shared tensors counted once."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable params, all params, trainable%."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # -- behaving like the wrapped model ----------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its layers wrapped)."""
        return self.model

    forward = _WrappedForward()

    def _forward(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; with ``adapter_names``, each row through its own adapter.

        Args:
            adapter_names: One adapter name per row of the batch (``"__base__"``:
                no adapter), as PEFT LoRA's mixed-adapter batches; every other
                argument goes to the wrapped model untouched.

        Raises:
            AdapterNamesError: an unknown name, a list whose length is not the
                batch size, merged adapters, or training mode with gradients on.
        """
        if torch.compiler.is_compiling():  # route every compiled call: no cache logic in the graph
            open_route(self, adapter_names, args, kwargs)
            out = self.model(*args, **kwargs)
            close_route(self)
            return out
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with routing(self, adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` gives each row of the batch its own adapter.

        Each prompt keeps its adapter across beams and returned sequences.

        Example:
            >>> model.generate(input_ids, adapter_names=["a", "b", "__base__"])  # doctest: +SKIP
        """
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with routing(self, adapter_names, args, kwargs, multiples=generate_multiples(self.model, kwargs)):
            return self.model.generate(*args, **kwargs)

    @property
    def max_cached_factors(self) -> Optional[int]:
        """Most adapters whose dense factors are kept built at once (``None``: no bound).

        Setting it lower evicts the least recently used ones now.
        """
        return self.factor_cache.capacity

    @max_cached_factors.setter
    def max_cached_factors(self, value: Optional[int]) -> None:
        self.factor_cache.capacity = value

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Enable the wrapped model's gradient checkpointing, keeping inputs differentiable.

        With a frozen embedding the checkpointed blocks would see no input
        requiring gradients; like PEFT, input gradients are switched on.
        """
        self.model.gradient_checkpointing_enable(**kwargs)
        if hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
