"""``VBLoRAModel``: VB-LoRA adapters on a torch or transformers model, with PEFT's ``PeftModel`` API.

As in PEFT, the model is two layers: this class (``PeftModel``'s role:
adapters, files, the Hub, counting and status) around ``self.base_model``, a
:class:`~vblora_store.engine.tuner.VBLoRATuner` (``BaseTuner``'s role: the
adapters inside the model), around ``self.base_model.model``, the wrapped
model.  The base class, :class:`~vblora_store.engine.passthrough.PassThroughModel`,
passes calls through to the wrapped model; attributes neither defines come
from the tuner, then the wrapped model, so ``model.config``,
``model.peft_config`` and ``model.vblora_vector_bank`` all work; state-dict
keys are PEFT's (``base_model.model.<module>...``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from ..config import VBLoRAConfig
from .loading import DeviceMap, as_config, check_device_map, load_adapter
from .passthrough import PassThroughModel
from .saving import save_model
from .state import savable_parameter_counts
from .status import LayerStatus, ModelStatus, layer_status, model_status
from .tuner import VBLoRATuner

__all__ = ["VBLoRAModel"]


class VBLoRAModel(PassThroughModel):
    """A model with VB-LoRA adapters; PEFT's ``PeftModel`` API for VB-LoRA.

    Args:
        model: A ``torch.nn.Module`` (a transformers model or any other).
        config: The new adapter's config (kept, as PEFT keeps it); ``inference_mode=True`` freezes it.
        adapter_name: Its name.
        autocast_adapter_dtype: On a float16/bfloat16 model, make the adapter float32 (PEFT's
            default); off, it takes each layer's dtype.
        low_cpu_mem_usage: Allocate the new adapter on the ``meta`` device (fill
            it later with :meth:`load_adapter` under the same name).
        max_cached_factors: Most adapters whose dense factors are kept built at
            once (least recently used out first); ``None`` keeps every one run.

    Example:
        >>> from vblora_store import VBLoRAConfig
        >>> model = VBLoRAModel(base, VBLoRAConfig(r=4, num_vectors=64, vector_length=16,
        ...                                        target_modules=["q_proj", "v_proj"]))
        >>> model.print_trainable_parameters()
        trainable params: 9,216 || all params: 107,840 || trainable%: 8.5460
        >>> model.save_pretrained(tmp / "out", save_only_topk_weights=True)
    """

    def __init__(
        self,
        model: nn.Module,
        config: VBLoRAConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        max_cached_factors: Optional[int] = None,
    ):
        super().__init__(VBLoRATuner(model, max_cached_factors=max_cached_factors))
        self.add_adapter(
            adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, Path],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[VBLoRAConfig] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        torch_device: Optional[Union[str, torch.device]] = None,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        max_cached_factors: Optional[int] = None,
        device_map: Optional[DeviceMap] = None,
    ) -> "VBLoRAModel":
        """Wrap ``model`` with the adapter saved at ``model_id`` (full, top-k or packed form).

        Args:
            model: The base model the adapter was trained on.
            model_id: A folder holding ``adapter_config.json`` and the weights, or a
                Hub repo id (``namespace/name``).
            adapter_name: The name to give the adapter.
            is_trainable: Keep training it (full form only); otherwise the
                adapter is frozen and the model put in eval mode.  The config's
                ``inference_mode`` becomes ``not is_trainable``, as in PEFT.
            config: Use this config (ours or PEFT's ``VBLoRAConfig``) instead of the saved one;
                ours is kept as the adapter's config, as PEFT keeps its own.
            autocast_adapter_dtype: Load float16/bfloat16 adapter tensors as float32 (PEFT's default).
            low_cpu_mem_usage: Accepted for PEFT compatibility; loading never
                allocates a random adapter first, so memory is always low.
            torch_device: PEFT's device to read the file to; the adapter always ends beside each layer.
            revision: Branch, tag or commit of a Hub repo.
            subfolder: The adapter's folder inside the repo or the local folder.
            max_cached_factors: Most adapters whose dense factors are kept built at once.
            device_map: Where the model's modules are (accelerate's map: ``{"": "cpu"}``,
                ``{"model.layers.0": 0, ...}``).  The adapter goes beside each layer; the
                model is never moved or dispatched here, so a map the model does not
                already follow is refused, as is a strategy (``"auto"``, ...).

        Returns:
            The wrapped model.

        Raises:
            AdapterStateError: ``is_trainable`` with a top-k adapter.
            TargetingError: the adapter's modules do not fit ``model``.
            InvalidArgumentError: a ``device_map`` the model does not follow.

        Example:
            >>> model = VBLoRAModel.from_pretrained(base, "fixtures/tiny-llama-vblora")
            >>> model.active_adapter, model.storage_form["default"].value
            ('default', 'full')
        """
        if device_map is not None:
            check_device_map(model, device_map)
        self = cls.__new__(cls)
        PassThroughModel.__init__(self, VBLoRATuner(model, max_cached_factors=max_cached_factors))
        self.load_adapter(
            model_id, adapter_name, is_trainable=is_trainable, torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            revision=revision, subfolder=subfolder, config=config,
        )  # fmt: skip
        return self

    # -- adapters ------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: VBLoRAConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a freshly initialised adapter (PEFT's ``add_adapter``); it does not become active.

        It is trainable if it is the active one (the first adapter) and its
        config's ``inference_mode`` is off, as in PEFT.

        Args:
            adapter_name: Its name.
            peft_config: Its config (ours or PEFT's ``VBLoRAConfig``; ours is kept).
            low_cpu_mem_usage: Allocate it on the ``meta`` device, to be filled by :meth:`load_adapter`.
            autocast_adapter_dtype: On a float16/bfloat16 model, make it float32; off, each layer's dtype.

        Raises:
            AdapterStateError: the name is taken; AdapterNameError: reserved (``"__base__"``) or malformed.

        Example:
            >>> from vblora_store import VBLoRAConfig
            >>> model.add_adapter("second", VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules=["q_proj"]))
            >>> list(model.peft_config)
            ['default', 'second']
        """
        tuner, config = self.base_model, as_config(peft_config)
        tuner.inject(adapter_name, config, None, meta=low_cpu_mem_usage, autocast=autocast_adapter_dtype)
        tuner.set_trainable(adapter_name, adapter_name in tuner.active_adapters and not config.inference_mode)

    def load_adapter(
        self,
        model_id: Union[str, Path],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[Union[str, torch.device]] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        config: Optional[VBLoRAConfig] = None,
    ) -> None:
        """Load the adapter saved at ``model_id`` under ``adapter_name`` (it does not become active).

        Args:
            model_id: A folder holding ``adapter_config.json`` and the weights, or a
                Hub repo id (``namespace/name``).
            adapter_name: The name to give it; may be a ``low_cpu_mem_usage``
                placeholder, which is then replaced.
            is_trainable: Make it trainable (full form only); otherwise the
                model is put in eval mode, as PEFT does.
            torch_device: PEFT's device to read the file to; the adapter always ends beside each layer.
            autocast_adapter_dtype: Load float16/bfloat16 adapter tensors as float32.
            low_cpu_mem_usage: Accepted for PEFT compatibility (always low).
            revision: Branch, tag or commit of a Hub repo.
            subfolder: The adapter's folder inside the repo or the local folder.
            config: Use this config instead of the saved one.

        Raises:
            AdapterStateError: ``is_trainable`` with a top-k adapter, or the name is taken.
        """
        load_adapter(
            self.base_model, model_id, adapter_name, is_trainable=is_trainable, torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype, revision=revision, subfolder=subfolder,
            config=config,
        )  # fmt: skip
        if not is_trainable:
            self.eval()

    @property
    def active_adapter(self) -> Optional[str]:
        """The active adapter's name (PEFT's singular form).

        With several active (``base_model.set_adapter([...])``), as in PEFT, the
        last single name made active; ``active_adapters`` lists them all.
        """
        return self.base_model.named_active

    @property
    def active_adapters(self) -> list[str]:
        """The adapters that run, as a list (PEFT's plural form)."""
        return self.base_model.active_adapters

    @property
    def peft_config(self) -> dict[str, VBLoRAConfig]:
        """Every adapter's config, by name."""
        return self.base_model.peft_config

    @property
    def active_peft_config(self) -> VBLoRAConfig:
        """The active adapter's config."""
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether an adapter is active and the adapter layers are not disabled (``disable_adapter()``)."""
        wrappers = list(self.base_model.wrappers())
        return bool(self.active_adapters) and not (wrappers and all(m.disable_adapters for m in wrappers))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's: whether :func:`~vblora_store.engine.lora_conversion.convert_to_lora` can convert the adapter.

        Every VB-LoRA adapter's update is ``B @ A``, so every one can, unless it trains biases.
        """
        config = self.peft_config.get(adapter_name)
        return config is not None and config.bias == "none"

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The ``modules_to_save`` of every adapter together, or ``None`` (as PEFT)."""
        modules = {m for config in self.peft_config.values() for m in (config.modules_to_save or [])}
        return modules or None

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (a merged adapter is unmerged).

        Inside, no adapter tensor requires gradients (as in PEFT); on exit each layer is
        enabled or disabled, and each tensor requires gradients, exactly as before.

        Example:
            >>> with model.disable_adapter():
            ...     base_logits = model(input_ids=ids).logits
            >>> torch.equal(base_logits, base(input_ids=ids).logits)
            True
        """
        tuner = self.base_model
        before = [(module, module.disable_adapters) for module in tuner.wrappers()]
        tuner.disable_adapter_layers()
        try:
            yield
        finally:
            if not all(disabled for _, disabled in before):  # else they stay disabled, as they were
                tuner.enable_adapter_layers()
                for module, disabled in before:
                    module.disable_adapters = disabled

    # -- saving and publishing ----------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: Union[str, Path],
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[bool, str] = "auto",
        is_main_process: bool = True,
        *,
        save_only_topk_weights: Optional[bool] = None,
    ) -> None:
        """Save adapters in PEFT's layout: ``default`` at the root, others in sub-folders, and a ``README.md``.

        Args:
            save_directory: The folder (created if missing).
            safe_serialization: ``adapter_model.safetensors`` (default) or ``adapter_model.bin``.
            selected_adapters: Which adapters (default: all).
            save_embedding_layers: Also save the input and output embeddings
                (``"auto"``: when the vocabulary was resized).
            is_main_process: Write nothing unless true (multi-process training).
            save_only_topk_weights: Override each adapter's config (``True``
                saves indices and weights only: small, inference only).

        Raises:
            AdapterStateError: an unknown adapter, or ``save_directory`` is a file.

        Example:
            >>> model.save_pretrained(tmp / "out", save_only_topk_weights=True)
            >>> sorted(p.name for p in (tmp / "out").iterdir())
            ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
        """
        save_model(
            self.base_model, save_directory, safe_serialization=safe_serialization,
            selected_adapters=selected_adapters, save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process, save_only_topk_weights=save_only_topk_weights,
        )  # fmt: skip

    def push_to_hub(self, repo_id: str, *, to: Optional[str] = None, **kwargs: Any) -> str:
        """Upload the adapters (saved as :meth:`save_pretrained` saves them) with a model card, in one commit.

        Args:
            repo_id: ``namespace/name``.
            to: Convert first, to any storage form (``"topk"``, ``"packed"``, ``"compressed"``, ...).
            **kwargs: ``private``, ``revision``, ``commit_message``, ``commit_description``, ``create_pr``,
                ``tags`` (added to the card's), ``token`` (never printed), and :meth:`save_pretrained`'s
                ``selected_adapters``,
                ``save_only_topk_weights`` and ``safe_serialization``; anything else is refused.

        Returns:
            The URL of the commit or pull request.

        Example:
            >>> model.push_to_hub("acme/my-adapter", to="packed")  # doctest: +SKIP
        """
        # The engine's one import from the Hub beyond vblora_store.sources, made on call, so importing the
        # engine loads no publisher, card or huggingface_hub (docs/architecture.md).
        from ..hub.publish import push_model

        return push_model(self, repo_id, to=to, **kwargs)

    # -- counting and status ------------------------------------------------------------------

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """``(vblora_params, other_params)`` that saving ``adapter`` writes (float32-equivalent).

        Unlike PEFT, which sums over every adapter, this counts ``adapter`` alone.
        """
        tuner = self.base_model
        tuner.check_known(adapter)
        bank = tuner.vblora_vector_bank[adapter]
        return savable_parameter_counts(tuner.model, bank, adapter, self.peft_config[adapter])

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

    def get_layer_status(self) -> list[LayerStatus]:
        """Each adapter layer and wrapper: enabled, active, merged, available adapters, gradients, devices."""
        return layer_status(self.base_model)

    def get_model_status(self) -> ModelStatus:
        """The model as a whole, ``"irregular"`` where its layers disagree (PEFT's ``get_model_status``)."""
        return model_status(self, self.base_model)
