"""The VB-LoRA layer: a ``Linear``/``Conv1D`` wrapper adding ``B @ A`` built from a shared bank.

Each adapter of a layer is held in one of two forms:

* full: trainable logits ``vblora_logits_A[name]`` ``(r, in/L, N)`` and
  ``vblora_logits_B[name]`` ``(out/L, r, N)``, exactly PEFT's parameters;
* top-k: a :class:`TopKSlice` into the adapter's :class:`TopKTensors`, which
  hold the top-k indices and weights of every module of the adapter in two
  flat tensors on the model (so a thousand resident adapters are a few
  thousand tensors, not millions).

Either way the layer composes the dense factors A ``(r, in)`` and B ``(out, r)``
(:meth:`VBLoRALinear.build_factors`, with :mod:`vblora_store.topk`).  Outside
training they are built once into the adapter's slot of this layer's factor
stacks (``factor_slots``, :mod:`.slots`: ``a`` ``(slots, R, in)``, ``bt``
``(slots, R, out)``) and kept current there (:mod:`.building`).  An unmerged
forward then costs a rank-r LoRA: ``x @ A.T @ B.T``; a mixed-adapter batch
costs one :func:`~vblora_store.engine.batched.add_lora`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VBLoRAConfig
from ..errors import AdapterStateError, UnsafeMergeError, untrainable_dropped_logits, untrainable_topk
from ..topk import delta_weight, lora_factors, mix_weights, subvector_factors
from .batched import add_lora
from .building import slot_factors
from .cache import FactorCache
from .routing import BatchRoute
from .targeting import check_fits, layer_features
from .slots import FactorSlots, source_key
from .topk_store import TopKSlice

__all__ = ["VBLoRALinear"]


class VBLoRALinear(nn.Module):
    """A ``nn.Linear`` or transformers ``Conv1D`` plus VB-LoRA adapters.

    The wrapped layer stays as ``base_layer`` (so state-dict keys are PEFT's,
    e.g. ``q_proj.base_layer.bias``).  One adapter is active at a time; a call
    routed by :class:`~vblora_store.engine.routing.BatchRoute` runs each row
    through its own adapter.

    Args:
        base_layer: The layer to wrap.
        banks: The model's vector banks, by adapter name (shared, not owned:
            they are registered once, on the model).
        name: The module's name in the model, used in error messages.
        fan_in_fan_out: The base weight is stored ``(in, out)`` (``Conv1D``).
        topk_store: The model's :class:`TopKTensors`, by adapter name (shared).
        cache: The model's :class:`~vblora_store.engine.cache.FactorCache` (shared).
        route: The model's :class:`~vblora_store.engine.routing.BatchRoute` (shared).

    Example:
        >>> banks = nn.ParameterDict({"default": nn.Parameter(torch.randn(8, 4))})
        >>> layer = VBLoRALinear(nn.Linear(8, 4), banks, name="fc", fan_in_fan_out=False)
        >>> layer.add_full("default", VBLoRAConfig(r=2, num_vectors=8, vector_length=4))
        >>> layer(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        base_layer: nn.Module,
        banks: nn.ParameterDict,
        *,
        name: str,
        fan_in_fan_out: bool,
        topk_store: Optional[nn.ModuleDict] = None,
        cache: Optional[FactorCache] = None,
        route: Optional[BatchRoute] = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        # References, not sub-modules: registered once, on the model, and absent from this state dict.
        object.__setattr__(self, "_banks", banks)
        object.__setattr__(self, "_topk_store", nn.ModuleDict() if topk_store is None else topk_store)
        object.__setattr__(self, "_cache", FactorCache() if cache is None else cache)
        object.__setattr__(self, "_route", BatchRoute() if route is None else route)
        self.module_name = name
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = layer_features(base_layer, fan_in_fan_out)
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.topk_slices: dict[str, TopKSlice] = {}
        self.vblora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.active_adapter: Union[str, list[str], None] = None  # a name, or several (their updates add up)
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.factor_slots = FactorSlots(self.in_features, self.out_features, like=base_layer.weight)
        self._cache.register(self)

    # -- what PEFT's tuner layers expose ---------------------------------------------

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")  # by adapter name
    other_param_names = ("r", "topk", "vblora_dropout")

    @property
    def vblora_vector_bank(self) -> nn.ParameterDict:
        """The model's banks by adapter name: shared by every layer, in the model's state dict once."""
        return self._banks

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias."""
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """Whether an adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters as a list (PEFT's plural form)."""
        active = self.active_adapter
        return [] if active is None else [active] if isinstance(active, str) else list(active)

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.r)

    def is_topk(self, adapter: str) -> bool:
        """Whether ``adapter`` is held in top-k form (inference only)."""
        return adapter in self.topk_slices

    # -- adding and removing adapters ---------------------------------------------------

    def _add_common(self, adapter: str, config: VBLoRAConfig) -> None:
        check_fits(self.module_name, self.in_features, self.out_features, config.vector_length)
        self.r[adapter] = config.r
        self.topk[adapter] = config.topk
        p = config.vblora_dropout
        if p > 0:  # none for p = 0: a thousand adapters add no thousand modules to every layer
            self.vblora_dropout[adapter] = nn.Dropout(p)
        if self.active_adapter is None:
            self.active_adapter = adapter

    def add_full(
        self,
        adapter: str,
        config: VBLoRAConfig,
        logits_A: Optional[torch.Tensor] = None,
        logits_B: Optional[torch.Tensor] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Add an adapter in full form, from given logits or freshly initialised.

        Args:
            adapter: Its name.
            config: Its config.
            logits_A, logits_B: ``(r, in/L, N)`` and ``(out/L, r, N)``; when
                omitted they are drawn from ``N(0, init_logits_std)`` on the
                CPU in PEFT's order (A then B), then moved to ``device``.
            device: Where fresh logits go (default: the base weight's device;
                ``meta`` allocates nothing).
            dtype: The dtype of fresh logits (drawn in float32, then cast, as PEFT does).
        """
        self._add_common(adapter, config)
        if logits_A is None or logits_B is None:
            n, length, r = config.num_vectors, config.vector_length, config.r
            init_device = "meta" if device is not None and torch.device(device).type == "meta" else "cpu"
            logits_A = torch.zeros(r, self.in_features // length, n, device=init_device)
            logits_B = torch.zeros(self.out_features // length, r, n, device=init_device)
            if init_device == "cpu":
                nn.init.normal_(logits_A, 0.0, config.init_logits_std)
                nn.init.normal_(logits_B, 0.0, config.init_logits_std)
            target = device if device is not None else self.base_layer.weight.device
            logits_A, logits_B = logits_A.to(target, dtype), logits_B.to(target, dtype)
        self.vblora_logits_A[adapter] = nn.Parameter(logits_A)
        self.vblora_logits_B[adapter] = nn.Parameter(logits_B)

    def add_topk(self, adapter: str, config: VBLoRAConfig, where: TopKSlice) -> None:
        """Add an adapter in top-k form (inference and merging only): its slots in ``topk_store[adapter]``."""
        self._add_common(adapter, config)
        self.topk_slices[adapter] = where

    def delete_adapter(self, adapter: str) -> None:
        """Remove ``adapter``; refused while it is merged."""
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"Cannot delete adapter(s) {[adapter]} while they are merged. Please unmerge them first. Call "
                f"unmerge_adapter() (module {self.module_name!r}), then delete it."
            )
        for holder in (self.vblora_logits_A, self.vblora_logits_B, self.vblora_dropout):
            if adapter in holder:
                del holder[adapter]
        self.topk_slices.pop(adapter, None)
        self.r.pop(adapter, None)
        self.topk.pop(adapter, None)
        slot = self._cache.slot_of(adapter)
        if slot is not None:
            self.factor_slots.clear(slot)
        if adapter in self.active_adapters:
            rest = [name for name in self.active_adapters if name != adapter]
            single = isinstance(self.active_adapter, str) or not rest
            self.active_adapter = (rest[0] if rest else next(iter(self.r), None)) if single else rest

    # -- the factors ---------------------------------------------------------------------------

    def _sources(self, adapter: str) -> tuple[torch.Tensor, ...]:
        bank = self._banks[adapter]
        if self.is_topk(adapter):
            held = self._topk_store[adapter]
            return (bank, held.indices, held.weights)
        return (bank, self.vblora_logits_A[adapter], self.vblora_logits_B[adapter])

    def source_key(self, adapter: str) -> tuple:
        """Changes whenever a tensor ``adapter``'s factors in this layer are built from changes."""
        return source_key(self._sources(adapter))

    def build_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(r, in)`` and B ``(out, r)``, composed in at least float32 on the adapter's device."""
        sources = self._sources(adapter)
        if self.is_topk(adapter):
            where, held = self.topk_slices[adapter], self._topk_store[adapter]
            sub_a = held.subvectors(sources[0], where.a_slots.start, where.a_slots.stop)
            sub_b = held.subvectors(sources[0], where.b_slots.start, where.b_slots.stop)
            return subvector_factors(sub_a, sub_b, self.r[adapter])
        device = sources[1].device
        compute = torch.promote_types(sources[0].dtype, torch.float32)
        bank = sources[0].to(device=device, dtype=compute)  # (N, L)
        k = self.topk[adapter]
        a_idx, a_w = mix_weights(sources[1].to(compute), k)  # (r, in/L, N) -> (r, in/L, k)
        b_idx, b_w = mix_weights(sources[2].to(compute), k)  # (out/L, r, N) -> (out/L, r, k)
        return lora_factors(a_idx, a_w, b_idx, b_w, bank)

    def _training_factors(self, adapter: str) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._sources(adapter))

    def _refuse_dropped_logits(self, adapter: str) -> None:
        """Refuse a training step on ``-inf`` logits (PEFT's full save of a top-k adapter), as PEFT does."""
        logits = (self.vblora_logits_A[adapter], self.vblora_logits_B[adapter])
        if any(bool(torch.isneginf(side).any()) for side in logits):
            raise untrainable_dropped_logits(
                f"module {self.module_name!r}: adapter {adapter!r}",
                "call model.eval() for inference, or train from the original full adapter.",
            )

    def factors(
        self, adapter: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(r, in)`` and B ``(out, r)`` of ``adapter`` on ``device`` in ``dtype``.

        Built fresh (with gradients) when autograd is on and the adapter has
        trainable tensors; otherwise served from the adapter's slot of the
        factor stacks, built there first if it is missing or stale.
        """
        if self._training_factors(adapter):
            a, b = self.build_factors(adapter)
            return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        a, bt = slot_factors(self, adapter)
        return a.to(device=device, dtype=dtype), bt.T.to(device=device, dtype=dtype)

    def clear_cache(self) -> None:
        """Forget this layer's built factors (they rebuild on the next forward)."""
        self.factor_slots.forget()
        self._cache.forget_built()

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = B @ A`` in the base weight's layout, composed in float32 (or wider).

        Returns:
            ``(out, in)``, or ``(in, out)`` for ``Conv1D``, on the base weight's device.
        """
        with torch.no_grad():
            a, b = self.build_factors(adapter)
        device = self.base_layer.weight.device
        return delta_weight(a.to(device), b.to(device), fan_in_fan_out=self.fan_in_fan_out)

    # -- merging ------------------------------------------------------------------------------

    def merge(self, adapter: str, *, safe_merge: bool = False) -> None:
        """Add ``adapter``'s ``ΔW`` to the base weight (the sum is computed in float32 or wider).

        Raises:
            UnsafeMergeError: ``safe_merge`` found NaN or infinite values (a
                ``ValueError``, as in PEFT); the base weight is left unchanged.
        """
        if adapter in self.merged_adapters:
            return
        weight = self.base_layer.weight
        delta = self.delta_weight(adapter)
        with torch.no_grad():
            if safe_merge:
                merged = weight.data.clone()
                merged.add_(delta)  # computed in the promoted dtype, stored in the weight's
                if not bool(torch.isfinite(merged).all()):
                    raise UnsafeMergeError(
                        f"module {self.module_name!r}: NaNs detected in the merged weights. The adapter {adapter} "
                        "seems to be broken (NaN or infinite values); nothing was merged. Retrain or reload it."
                    )
                weight.data = merged
            else:
                weight.data.add_(delta)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` from the base weight, last merged first."""
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                self.base_layer.weight.data.sub_(self.delta_weight(adapter))

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base_layer(x)`` plus each active adapter's ``dropout(x) @ A.T @ B.T``, or each row's own."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._route.rows is not None:
            return self._routed(x, result)
        if self.merged:
            return result
        for adapter in self.active_adapters:  # several active adapters: their updates add up (PEFT's)
            if adapter in self.r:
                result = self._add_adapter(adapter, x, result)
        return result

    def _add_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus ``adapter``'s ``dropout(x) @ A.T @ B.T``."""
        if self.training and torch.is_grad_enabled() and self.is_topk(adapter):
            fix = "call model.eval() for inference, or load the full-form adapter."
            raise untrainable_topk(f"module {self.module_name!r}, adapter {adapter!r}", "top-k", fix)
        if adapter in self.vblora_dropout:
            x = self.vblora_dropout[adapter](x)
        if self._training_factors(adapter):
            if self.training and not self.is_topk(adapter):  # PEFT's training forward refuses them too
                self._refuse_dropped_logits(adapter)
            a, b = self.build_factors(adapter)
            return result + F.linear(
                F.linear(x, a.to(x.dtype)), b.to(x.dtype)
            )  # (.., in) -> (.., r) -> (.., out)
        a, bt = slot_factors(self, adapter)
        if a.dtype != x.dtype:
            a, bt = a.to(x.dtype), bt.to(x.dtype)
        return result + F.linear(x, a) @ bt  # (..., in) -> (..., r) -> (..., out)

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row through the adapter the route gives it (its slot; slot 0 adds nothing)."""
        route = self._route
        stacks = self.factor_slots
        slots = route.slots_for(x.shape[0], stacks.a.device, self.module_name)
        keep = route.keep_for(x.shape[0], self.module_name) if self.training else None
        if keep is not None:  # each row's own adapter's dropout
            keep = keep.to(x.device, x.dtype).reshape(
                (-1,) + (1,) * (x.dim() - 1)
            )  # (rows,) -> (rows, 1, ...)
            x = x * torch.bernoulli(keep.expand_as(x)) / keep
        return add_lora(x, result, stacks.a, stacks.bt, stacks.ranks, slots)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"
