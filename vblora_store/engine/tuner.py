"""``VBLoRATuner``: the adapters inside a model, PEFT's ``BaseTuner`` role (``peft.tuners.vblora.VBLoRAModel``).

It owns the wrapped model (``self.model``), each adapter's vector bank
(``vblora_vector_bank``) and flat top-k tensors (``vblora_topk``), the factor
cache and the batch route; it injects adapters into the targeted layers
(planned, checked and carried out by :mod:`.injection`), switches, merges and
removes them.  It reads no file: :class:`~vblora_store.engine.model.VBLoRAModel`
(PEFT's ``PeftModel`` role) does that and calls it, as ``model.base_model``, so
``model.base_model.model`` is the transformers model, as in PEFT.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..config import VBLoRAConfig
from ..errors import AdapterStateError, untrainable_topk
from ..storage_forms import StorageForm
from ..format.stored import StoredAdapter
from .cache import FactorCache
from .injection import plan_targets, prepared_config, wrap_adapter
from .layer import VBLoRALinear
from .routing import BatchRoute, check_new_name
from .state import adapter_layers, other_parameters
from .trainable import ModulesToSave

__all__ = ["VBLoRATuner"]


class VBLoRATuner(nn.Module):
    """The VB-LoRA adapters of one model: injection, switching, merging (PEFT's ``BaseTuner``).

    Args:
        model: The model to adapt (its layers are wrapped in place).
        max_cached_factors: Most adapters whose dense factors are kept built at once.
    """

    prefix = "vblora_"  # PEFT's: every adapter tensor's attribute name starts with it

    def __init__(self, model: nn.Module, *, max_cached_factors: Optional[int] = None):
        super().__init__()
        self.model = model
        self.vblora_vector_bank = nn.ParameterDict()
        self.vblora_topk = nn.ModuleDict()  # TopKTensors of each adapter held in top-k form
        self.factor_cache = FactorCache(max_cached_factors)
        self._route = BatchRoute()
        self.peft_config: dict[str, VBLoRAConfig] = {}
        self.storage_form: dict[str, StorageForm] = {}
        self.targeted_module_names: list[str] = []
        self.active_adapter: Union[str, list[str], None] = None  # a name, or several (PEFT's)
        self.named_active: Optional[str] = None  # the last single name activated: PeftModel.active_adapter
        self._placeholders: set[str] = set()  # adapters allocated on "meta", awaiting load_adapter
        self._saved_grads: Optional[dict[int, tuple[nn.Parameter, bool]]] = None  # while layers are disabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # as PEFT's BaseTuner: the wrapped model's attributes

    # -- injecting ---------------------------------------------------------------------

    def inject(
        self,
        adapter: str,
        config: VBLoRAConfig,
        stored: Optional[StoredAdapter],
        *,
        meta: bool = False,
        autocast: bool = True,
    ) -> None:
        """Wrap the targeted layers with ``adapter``: fresh (PEFT's init and RNG order) or from ``stored``.

        Every check runs before the model changes; if reading the file fails
        half-way, what was added is removed again.

        Args:
            adapter: Its name.
            config: Its config.
            stored: The adapter's files, or ``None`` for a fresh adapter.
            meta: Allocate a fresh adapter on the ``meta`` device.
            autocast: PEFT's ``autocast_adapter_dtype``: float16/bfloat16 stored tensors become float32;
                off, every stored float takes its layer's dtype.  A stored adapter's tensors go beside
                each layer.

        Raises:
            AdapterStateError: the name is taken; AdapterNameError: reserved or malformed.
            TargetingError: the adapter does not fit the model.
        """
        self.check_new(adapter)
        config = prepared_config(config, self.model)
        plan = plan_targets(self.model, config, stored)
        placeholder = meta and stored is None  # a fresh adapter on "meta", awaiting load_adapter
        try:
            wrap_adapter(
                self, adapter, config, stored, plan, meta=placeholder, autocast=autocast
            )
            self._activate(self.active_adapter or adapter)
        except BaseException:
            self.forget(adapter)
            raise
        if placeholder:
            self._placeholders.add(adapter)

    def check_new(self, adapter: str) -> None:
        """Refuse ``adapter`` as a new adapter's name: taken, reserved or malformed.

        Raises:
            AdapterNameError: reserved (``"__base__"``) or malformed.
            AdapterStateError: the name is taken (a ``ValueError``, as PEFT's).
        """
        check_new_name(adapter)
        if adapter in self.peft_config and adapter not in self._placeholders:
            raise AdapterStateError(
                f"an adapter named {adapter!r} exists; delete_adapter() it or pick another name."
            )

    def _set_child(self, name: str, module: nn.Module) -> None:
        """Put ``module`` at ``name`` in the wrapped model."""
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def _replace(self, module: nn.Module, new: nn.Module) -> None:
        """Put ``new`` where ``module`` is in the wrapped model."""
        for key, candidate in self.model.named_modules():
            if candidate is module:
                self._set_child(key, new)
                return

    def _init_vblora_vector_bank(self, config: VBLoRAConfig, adapter_name: str) -> None:
        """PEFT's: draw ``adapter_name``'s bank afresh, uniform in ``±init_vector_bank_bound``, as at injection.

        The draw is PEFT's (a CPU tensor of the bank's shape, so the same seed
        gives the same bank); it is copied into the existing parameter, so an
        optimizer holding it keeps working.
        """
        bank = self.vblora_vector_bank[adapter_name]
        drawn = torch.zeros(config.num_vectors, config.vector_length)
        drawn.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
        with torch.no_grad():
            bank.copy_(drawn.reshape(bank.shape))  # (N, L), the same shape

    # -- which adapter runs, and what trains ---------------------------------------------

    def wrappers(self) -> Iterator[nn.Module]:
        """Every adapter layer and ``modules_to_save`` wrapper, in model order."""
        return (m for m in self.model.modules() if isinstance(m, (VBLoRALinear, ModulesToSave)))

    def adapted_layers(self) -> Iterator[VBLoRALinear]:
        """Every adapter layer, in model order (not `layers`: PEFT's tuner passes that name to the model)."""
        return (m for m in self.model.modules() if isinstance(m, VBLoRALinear))

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters as a list (PEFT's plural form)."""
        active = self.active_adapter
        return [] if active is None else [active] if isinstance(active, str) else list(active)

    def _check_activatable(self, names: list[str]) -> None:
        """PEFT's rule: of several active adapters, at most one may have a copy of a ``modules_to_save`` module."""
        for module in self.wrappers():
            if isinstance(module, ModulesToSave):
                held = [name for name in names if name in module.modules_to_save]
                if len(held) > 1:
                    raise AdapterStateError(
                        "Only one adapter can be set at a time for ModulesToSaveWrapper: module "
                        f"{module.module_name!r} (modules_to_save) has its own copy in each of {held}, and only one "
                        "copy can run; activate at most one of them."
                    )

    def _activate(self, adapter: Union[str, list[str], None]) -> None:
        names = [] if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
        self._check_activatable(names)
        for module in self.wrappers():
            if isinstance(module, ModulesToSave):
                module.active_adapter = next((n for n in names if n in module.modules_to_save), None)
            else:
                module.active_adapter = adapter
        self.active_adapter = adapter
        if isinstance(adapter, str) or not names or self.named_active not in self.peft_config:
            self.named_active = names[0] if names else None

    def check_known(self, adapters: Union[str, Iterable[str]]) -> list[str]:
        """The names as a list; :class:`AdapterStateError` naming the first unknown one."""
        names = [adapters] if isinstance(adapters, str) else list(adapters)
        for adapter in names:
            if adapter not in self.peft_config:
                raise AdapterStateError(
                    f"Adapter {adapter} does not exist: this model has {sorted(self.peft_config)}; use one of "
                    "those names."
                )
        return names

    def set_trainable(self, adapter: str, trainable: bool) -> None:
        """PEFT's trainability: the base frozen; the adapter's bank, logits and copies as asked."""
        trainable = trainable and self.storage_form[adapter].has_logits
        if len(self.peft_config) == 1:
            self.model.requires_grad_(False)
        self.set_requires_grad(adapter, trainable)

    def _adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter's bank, logits and ``modules_to_save`` copies: what disabling the layers freezes."""
        params = list(self.vblora_vector_bank.values())
        for module in self.wrappers():
            if isinstance(module, VBLoRALinear):
                params += [*module.vblora_logits_A.values(), *module.vblora_logits_B.values()]
            else:
                params += list(module.modules_to_save.parameters())
        return params

    def _require_grad(self, param: nn.Parameter, flag: bool) -> None:
        """Set ``requires_grad``; while the layers are disabled (all frozen), record it for the re-enabling."""
        if self._saved_grads is not None and id(param) in self._saved_grads:
            self._saved_grads[id(param)] = (param, flag)
        else:
            param.requires_grad_(flag)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' tensors (PEFT's ``set_requires_grad``).

        Raises:
            AdapterStateError: an unknown adapter, or gradients asked of a top-k adapter (no logits).
        """
        for adapter in self.check_known(adapter_names):
            if requires_grad and not self.storage_form[adapter].has_logits:
                form = self.storage_form[adapter].value
                raise untrainable_topk(
                    f"adapter {adapter!r}", form, "load its full-form adapter to train it."
                )
            self._require_grad(self.vblora_vector_bank[adapter], requires_grad)
            for _, layer in adapter_layers(self.model, adapter):
                for holder in (layer.vblora_logits_A, layer.vblora_logits_B):
                    if adapter in holder:
                        self._require_grad(holder[adapter], requires_grad)
            for module in self.wrappers():
                if isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
                    for param in module.modules_to_save[adapter].parameters():
                        self._require_grad(param, requires_grad)
            if requires_grad:  # and the biases its bias mode trains: exactly what saving it writes
                for param in other_parameters(self.model, adapter, self.peft_config[adapter]).values():
                    param.requires_grad_(True)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter, or several (their updates add up), as PEFT's.

        Like PEFT, the active adapters become trainable unless ``inference_mode``;
        the others are frozen.

        Raises:
            AdapterStateError: an unknown name (a ``ValueError``), or two of the
                names have their own copy of one ``modules_to_save`` module.
        """
        names = self.check_known(adapter_name)
        self._check_activatable(names)
        if any(layer.merged for layer in self.adapted_layers()):
            warnings.warn("set_adapter on a merged model: unmerging first.")
            self.unmerge_adapter()
        for name in self.peft_config:
            self.set_trainable(name, name in names and not inference_mode)
        self._activate(adapter_name if isinstance(adapter_name, str) else names)

    def forget(self, adapter: str) -> None:
        """Remove whatever part of ``adapter`` exists; unwrap what holds no adapter any more."""
        for module in list(self.wrappers()):
            module.delete_adapter(adapter)
            if isinstance(module, VBLoRALinear) and not module.adapters:
                self._replace(module, module.base_layer)
                self.factor_cache.unregister(module)
            elif isinstance(module, ModulesToSave) and not len(module.modules_to_save):
                self._replace(module, module.original_module)
        for holder in (self.vblora_vector_bank, self.vblora_topk):
            if adapter in holder:
                del holder[adapter]
        self.factor_cache.release(adapter)
        self.peft_config.pop(adapter, None)
        self.storage_form.pop(adapter, None)
        self._placeholders.discard(adapter)
        held = {n for n, m in self.model.named_modules() if isinstance(m, VBLoRALinear)}
        self.targeted_module_names = [n for n in self.targeted_module_names if n in held]
        if adapter in self.active_adapters:
            rest = [name for name in self.active_adapters if name != adapter]
            if isinstance(self.active_adapter, list) and rest:
                self._activate(rest)
            else:
                self._activate(rest[0] if rest else next(iter(self.peft_config), None))
        if self._saved_grads is not None:
            kept = {id(p) for p in self._adapter_parameters()}
            self._saved_grads = {k: v for k, v in self._saved_grads.items() if k in kept}

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; if it was active, the first remaining one becomes active.

        Raises:
            AdapterStateError: an unknown adapter, or a merged one (a ``ValueError``, as PEFT's).
        """
        self.check_known(adapter_name)
        merged = [layer.module_name for layer in self.adapted_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise AdapterStateError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
                f"Call unmerge_adapter() (module {merged[0]!r} holds it merged), then delete it."
            )
        self.forget(adapter_name)

    def enable_adapter_layers(self) -> None:
        """Switch the adapters back on after :meth:`disable_adapter_layers`, their gradients as they were."""
        for module in self.wrappers():
            module.disable_adapters = False
        saved, self._saved_grads = self._saved_grads, None
        for param, flag in (saved or {}).values():
            param.requires_grad_(flag)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers` (a merged adapter is unmerged).

        As in PEFT, every adapter tensor stops requiring gradients meanwhile; unlike
        PEFT, re-enabling restores each one's flag as it was (PEFT makes the active
        adapters trainable).
        """
        for adapter in self.active_adapters:
            bias = self.peft_config[adapter].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                    "the same output as the base model would without adaption."
                )
        if self._saved_grads is None:
            params = self._adapter_parameters()
            self._saved_grads = {id(p): (p, p.requires_grad) for p in params}
            for param in params:
                param.requires_grad_(False)
        for module in self.wrappers():
            module.disable_adapters = True

    # -- merging and unloading -------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Add ``ΔW`` of ``adapter_names`` (default: the active adapters) to the base weights.

        Undo with :meth:`unmerge_adapter`; ``safe_merge`` checks every merged weight for NaN/inf first.
        """
        if adapter_names is None:
            if not self.active_adapters:
                raise AdapterStateError("no active adapter to merge; set_adapter() one first.")
            adapter_names = self.active_adapters
        names = self.check_known(adapter_names)
        merged = list(dict.fromkeys(a for layer in self.adapted_layers() for a in layer.merged_adapters))
        todo = [name for name in names if name not in merged]
        if merged and todo:  # PEFT's warnings, once per call rather than once per layer
            warnings.warn(
                f"Already following adapters were merged {','.join(merged)}. "
                f"You are now additionally merging {','.join(todo)}."
            )
        elif merged:
            warnings.warn("All adapters are already merged, nothing to do.")
        for adapter in todo:
            for layer in self.adapted_layers():
                if adapter in layer.r:
                    layer.merge(adapter, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for layer in self.adapted_layers():
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
    ) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapter) and return the base model itself.

        Args:
            progressbar: Show a progress bar over the modules.
            safe_merge: Check every merged weight for NaN/inf before writing it.
            adapter_names: The adapters to merge.

        Returns:
            The original model object, its targeted weights updated; the
            active adapter's ``modules_to_save`` copies take the originals' places.

        Example:
            >>> merged = model.merge_and_unload()
            >>> type(merged).__name__
            'LlamaForCausalLM'
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap(progressbar, "Unloading and merging model")

    def unload(self) -> nn.Module:
        """Remove every wrapper without merging and return the base model."""
        return self._unwrap(False, "Unloading model")

    def _unwrap(self, progressbar: bool, description: str) -> nn.Module:
        modules = list(self.wrappers())
        if progressbar:
            from tqdm.auto import tqdm  # huggingface_hub's dependency, as in PEFT

            modules = tqdm(modules, desc=description)
        for module in modules:
            if isinstance(module, VBLoRALinear):
                self._replace(module, module.base_layer)
                self.factor_cache.unregister(module)
            elif isinstance(module, ModulesToSave):
                self._replace(module, module.active_module)
        return self.model
