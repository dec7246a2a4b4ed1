"""The VB-LoRA layer: a ``Linear``/``Conv1D`` wrapper adding ``B @ A`` built from a shared bank.

Each adapter of a layer is held in one of two forms:

* full: trainable logits ``vblora_logits_A[name]`` ``(r, in/L, N)`` and
  ``vblora_logits_B[name]`` ``(out/L, r, N)``, exactly PEFT's parameters;
* top-k: buffers ``vblora_topk[name].indices_X`` ``(..., k)`` and
  ``weights_X`` ``(..., k - 1)``, as stored by ``save_only_topk_weights``.

Either way the dense factors A ``(r, in)`` and B ``(out, r)`` are built by
:func:`vblora_store.topk.lora_factors`.  Outside training they are built once
and cached per adapter for the device and dtype of the input; the cache key
holds the version counters of every source tensor, so an optimizer step, a
``load_state_dict`` or any in-place edit rebuilds them on the next call.  An
unmerged forward then costs a rank-r LoRA: ``x @ A.T @ B.T``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VBLoRAConfig
from ..errors import AdapterStateError, TargetingError
from ..topk import complete_weights, delta_weight, lora_factors, mix_weights

__all__ = ["VBLoRALinear", "TopKFactors", "layer_features", "check_fits"]


def layer_features(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer.

    A ``Linear`` stores its weight ``(out, in)``, a ``Conv1D`` (``fan_in_fan_out``) ``(in, out)``.
    """
    rows, cols = base_layer.weight.shape  # Linear: (out, in); Conv1D: (in, out)
    return (rows, cols) if fan_in_fan_out else (cols, rows)


def check_fits(module: str, in_features: int, out_features: int, vector_length: int) -> None:
    """Raise :class:`TargetingError` naming ``module`` if a size is not a multiple of ``vector_length``."""
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size % vector_length:
            raise TargetingError(
                f"module {module!r}: {what}={size} is not divisible by vector_length={vector_length}; "
                "pick a vector_length dividing every targeted layer's sizes, or exclude this module "
                "(exclude_modules)."
            )


class TopKFactors(nn.Module):
    """One adapter's stored top-k form, as buffers (no N-wide logits).

    Args:
        indices_A: ``(r, in/L, k)`` bank rows of A's sub-vectors.
        weights_A: ``(r, in/L, k - 1)`` their first k-1 softmax weights.
        indices_B: ``(out/L, r, k)`` bank rows of B's sub-vectors.
        weights_B: ``(out/L, r, k - 1)``.
    """

    def __init__(self, indices_A, weights_A, indices_B, weights_B):
        super().__init__()
        self.register_buffer("indices_A", indices_A)
        self.register_buffer("weights_A", weights_A)
        self.register_buffer("indices_B", indices_B)
        self.register_buffer("weights_B", weights_B)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(indices_A, weights_A, indices_B, weights_B)``, in one cheap lookup (the forward's hot path)."""
        return tuple(self._buffers.values())


def _cache_key(tensors: tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype) -> tuple:
    """Identifies the factors built from ``tensors``: changes on any in-place edit, move or cast.

    Tensors created under ``torch.inference_mode()`` have no version counter;
    for them only a move or cast is seen (call ``clear_cache()`` after editing one).
    """
    return (device, dtype) + tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


class VBLoRALinear(nn.Module):
    """A ``nn.Linear`` or transformers ``Conv1D`` plus VB-LoRA adapters.

    The wrapped layer stays as ``base_layer`` (so state-dict keys are PEFT's,
    e.g. ``q_proj.base_layer.bias``).  One adapter is active at a time.

    Args:
        base_layer: The layer to wrap.
        banks: The model's vector banks, by adapter name (shared, not owned:
            they are registered once, on the model).
        name: The module's name in the model, used in error messages.
        fan_in_fan_out: The base weight is stored ``(in, out)`` (``Conv1D``).

    Example:
        >>> banks = nn.ParameterDict({"default": nn.Parameter(torch.randn(8, 4))})
        >>> layer = VBLoRALinear(nn.Linear(8, 4), banks, name="fc", fan_in_fan_out=False)
        >>> layer.add_full("default", VBLoRAConfig(r=2, num_vectors=8, vector_length=4))
        >>> layer(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, base_layer: nn.Module, banks: nn.ParameterDict, *, name: str, fan_in_fan_out: bool):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_banks", banks)  # a reference: not a sub-module, not in this state dict
        self.module_name = name
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = layer_features(base_layer, fan_in_fan_out)
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.vblora_topk = nn.ModuleDict()
        self.vblora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.active_adapter: Optional[str] = None
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    # -- what PEFT's tuner layers expose ---------------------------------------------

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
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.r)

    def is_topk(self, adapter: str) -> bool:
        """Whether ``adapter`` is held in top-k form (inference only)."""
        return adapter in self.vblora_topk

    # -- adding and removing adapters ---------------------------------------------------

    def _add_common(self, adapter: str, config: VBLoRAConfig) -> None:
        check_fits(self.module_name, self.in_features, self.out_features, config.vector_length)
        self.r[adapter] = config.r
        self.topk[adapter] = config.topk
        p = config.vblora_dropout
        self.vblora_dropout[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()
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
            logits_A, logits_B = logits_A.to(target), logits_B.to(target)
        self.vblora_logits_A[adapter] = nn.Parameter(logits_A)
        self.vblora_logits_B[adapter] = nn.Parameter(logits_B)

    def add_topk(self, adapter: str, config: VBLoRAConfig, factors: TopKFactors) -> None:
        """Add an adapter in top-k form (inference and merging only)."""
        self._add_common(adapter, config)
        self.vblora_topk[adapter] = factors

    def delete_adapter(self, adapter: str) -> None:
        """Remove ``adapter``; refused while it is merged."""
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"module {self.module_name!r}: adapter {adapter!r} is merged; call unmerge_adapter() first."
            )
        for holder in (self.vblora_logits_A, self.vblora_logits_B, self.vblora_topk, self.vblora_dropout):
            if adapter in holder:
                del holder[adapter]
        self.r.pop(adapter, None)
        self.topk.pop(adapter, None)
        self._cache.pop(adapter, None)
        if self.active_adapter == adapter:
            self.active_adapter = next(iter(self.r), None)

    # -- the factors ---------------------------------------------------------------------------

    def _sources(self, adapter: str) -> tuple[torch.Tensor, ...]:
        bank = self._banks[adapter]
        if self.is_topk(adapter):
            return (bank, *self.vblora_topk[adapter].tensors())
        return (bank, self.vblora_logits_A[adapter], self.vblora_logits_B[adapter])

    def _build_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(r, in)`` and B ``(out, r)``, composed in at least float32 on the adapter's device."""
        sources = self._sources(adapter)
        device = sources[1].device
        compute = torch.promote_types(sources[0].dtype, torch.float32)
        bank = sources[0].to(device=device, dtype=compute)  # (N, L)
        if self.is_topk(adapter):
            _, a_idx, a_w, b_idx, b_w = sources
            a_w, b_w = complete_weights(a_w.to(compute)), complete_weights(
                b_w.to(compute)
            )  # (..., k-1) -> (..., k)
        else:
            k = self.topk[adapter]
            a_idx, a_w = mix_weights(sources[1].to(compute), k)  # (r, in/L, N) -> (r, in/L, k)
            b_idx, b_w = mix_weights(sources[2].to(compute), k)  # (out/L, r, N) -> (out/L, r, k)
        return lora_factors(a_idx, a_w, b_idx, b_w, bank)

    def factors(
        self, adapter: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(r, in)`` and B ``(out, r)`` of ``adapter`` on ``device`` in ``dtype``.

        Built fresh (with gradients) when autograd is on and the adapter has
        trainable tensors; otherwise built once and served from the cache
        until a source tensor changes or another device or dtype is asked for.
        """
        sources = self._sources(adapter)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            a, b = self._build_factors(adapter)
            return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        key = _cache_key(sources, device, dtype)
        cached = self._cache.get(adapter)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        self._cache.pop(adapter, None)  # free the stale pair before building the new one
        # Normal tensors even under torch.inference_mode(), so later autograd use stays legal.
        with torch.inference_mode(False), torch.no_grad():
            a, b = self._build_factors(adapter)
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self._cache[adapter] = (key, a, b)
        return a, b

    def clear_cache(self) -> None:
        """Drop the cached factors of every adapter (they rebuild on the next forward)."""
        self._cache.clear()

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = B @ A`` in the base weight's layout, composed in float32 (or wider).

        Returns:
            ``(out, in)``, or ``(in, out)`` for ``Conv1D``, on the base weight's device.
        """
        with torch.no_grad():
            a, b = self._build_factors(adapter)
        device = self.base_layer.weight.device
        return delta_weight(a.to(device), b.to(device), fan_in_fan_out=self.fan_in_fan_out)

    # -- merging ------------------------------------------------------------------------------

    def merge(self, adapter: str, *, safe_merge: bool = False) -> None:
        """Add ``adapter``'s ``ΔW`` to the base weight (the sum is computed in float32 or wider).

        Raises:
            AdapterStateError: ``safe_merge`` found NaN or infinite values; the
                base weight is left unchanged.
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
                    raise AdapterStateError(
                        f"module {self.module_name!r}: merging adapter {adapter!r} gives NaN or infinite "
                        "weights; the adapter is broken, nothing was merged. Retrain or reload it."
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
        """``base_layer(x) + dropout(x) @ A.T @ B.T`` for the active adapter."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapter
        if self.merged or adapter is None or adapter not in self.r:
            return result
        if self.training and torch.is_grad_enabled() and self.is_topk(adapter):
            raise AdapterStateError(
                f"module {self.module_name!r}: adapter {adapter!r} was loaded from top-k form "
                "(save_only_topk_weights=True), which keeps only the top-k weights and discards the logits, "
                "so it cannot be trained. Call model.eval() for inference, or load the full-form adapter."
            )
        a, b = self.factors(adapter, x.device, x.dtype)
        lora = F.linear(
            F.linear(self.vblora_dropout[adapter](x), a), b
        )  # (..., in) -> (..., r) -> (..., out)
        return result + lora

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"
