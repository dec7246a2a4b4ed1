"""``PassThroughModel``: a module called and read as the model inside its tuner (``VBLoRAModel``'s base).

PEFT's ``PeftModel`` passes its calls through to the model it wraps; this class
is that part of :class:`~vblora_store.engine.model.VBLoRAModel`.  ``forward``
(showing the wrapped model's signature) and ``generate`` go to the wrapped
model, each row routed to its own adapter when ``adapter_names`` is given
(:mod:`.serving`); an attribute the class lacks comes from the tuner, then the
wrapped model; gradient checkpointing and the factor cache's bound are set
through it.  It holds one thing, ``base_model``: the tuner.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .serving import WrappedForward, call_routed

__all__ = ["PassThroughModel"]


class PassThroughModel(nn.Module):
    """A module around a tuner, called and read as the model inside it.

    Args:
        tuner: The :class:`~vblora_store.engine.tuner.VBLoRATuner` holding the model
            (``self.base_model``; the model is ``self.base_model.model``).
    """

    def __init__(self, tuner: nn.Module):
        super().__init__()
        self.base_model = tuner

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its layers wrapped)."""
        return self.base_model.model

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT's: make ``model``'s input embeddings' output require gradients, so checkpointed blocks get some.

        A frozen embedding under gradient checkpointing would give the
        checkpointed blocks no input that requires gradients; quantized models
        are left alone, as PEFT leaves them.

        Args:
            model: The wrapped model (``get_base_model()``).

        Returns:
            ``model``.
        """
        if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        return model

    forward = WrappedForward()

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
        return call_routed(self.base_model, self.base_model.model, args, kwargs, adapter_names)

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` gives each row of the batch its own adapter.

        Each prompt keeps its adapter across beams and returned sequences.

        Example:
            >>> model.generate(ids, adapter_names=["default", "__base__"], max_new_tokens=2).shape
            torch.Size([2, 7])
        """
        return call_routed(
            self.base_model, self.base_model.model.generate, args, kwargs, adapter_names, generating=True
        )

    @property
    def max_cached_factors(self) -> Optional[int]:
        """Most adapters whose dense factors are kept built at once (``None``: no bound).

        Setting it lower evicts the least recently used ones now.
        """
        return self.base_model.factor_cache.capacity

    @max_cached_factors.setter
    def max_cached_factors(self, value: Optional[int]) -> None:
        self.base_model.factor_cache.capacity = value

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Enable the wrapped model's gradient checkpointing, keeping inputs differentiable.

        Takes what the wrapped model's takes (transformers': ``gradient_checkpointing_kwargs``,
        positional or by keyword).  With a frozen embedding the checkpointed blocks would
        see no input requiring gradients; like PEFT, input gradients are switched on.
        """
        inner = self.base_model.model
        inner.gradient_checkpointing_enable(*args, **kwargs)
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()

    def __getattr__(self, name: str) -> Any:
        """An attribute this class lacks: the tuner's, else (through the tuner) the wrapped model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)
