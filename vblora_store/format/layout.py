"""The header checked against the config: every tensor's dtype and shape, before any value is read.

PEFT's key layout (:mod:`.keys`) in one of two kinds: logits (the full form)
or top-k indices and weights (the top-k form, and what the packed form
decodes to).  :func:`validate_layout` names the file, the tensor and the fix
for every inconsistency, and returns the adapted modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import CONFIG_NAME, VBLoRAConfig
from ..errors import InvalidAdapterError
from .keys import BANK_KEY, parse_key
from .stored import ModuleShape, TensorSpec

__all__ = ["validate_layout"]


def validate_layout(
    specs: dict[str, TensorSpec], cfg: VBLoRAConfig, path: Path
) -> tuple[bool, dict[str, ModuleShape]]:
    """Check every tensor's dtype and shape (PEFT's key names) against the config.

    Args:
        specs: The tensors, by PEFT key.
        cfg: The adapter's config.
        path: The weights file, named in errors.

    Returns:
        ``(has_logits, modules)``: whether the tensors are logits (else top-k
        indices and weights), and the adapted modules in file order.

    Raises:
        InvalidAdapterError: naming the file, the tensor and the fix.
    """
    n, length, r, k = cfg.num_vectors, cfg.vector_length, cfg.r, cfg.topk

    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{path}: {message}")

    bank = specs.get(BANK_KEY)
    if bank is None:
        raise bad(f"no {BANK_KEY!r} tensor; this is not a VB-LoRA weights file, or it is truncated.")
    if bank.shape != (n, length) or not bank.dtype.is_floating_point:
        raise bad(
            f"{BANK_KEY!r} is {_describe(bank)}, expected float (num_vectors={n}, vector_length={length}) "
            "as the config says; the config does not belong to these weights; restore the "
            "adapter_config.json saved with them."
        )

    parts_by_module: dict[str, dict[tuple[str, str], TensorSpec]] = {}
    for key, spec in specs.items():
        parts = parse_key(key)
        if parts is not None:
            parts_by_module.setdefault(parts.module, {})[(parts.side, parts.part)] = spec
    if not parts_by_module:
        raise bad("holds a vector bank but no vblora_logits tensors; nothing was adapted.")

    kinds = {all(part == "logits" for _, part in found) for found in parts_by_module.values()}
    if len(kinds) > 1:
        raise bad("mixes full logits and top-k tensors; re-save the adapter from PEFT in one form.")
    has_logits = kinds.pop()
    if bool(cfg.save_only_topk_weights) == has_logits:
        held = "full logits" if has_logits else "top-k indices and weights"
        raise bad(
            f"holds {held} but {CONFIG_NAME} says save_only_topk_weights="
            f"{str(bool(cfg.save_only_topk_weights)).lower()}; set it to {str(not has_logits).lower()}."
        )
    wanted = ("logits",) if has_logits else ("indices", "weights")
    last = {"logits": n, "indices": k, "weights": k - 1}

    modules: dict[str, ModuleShape] = {}
    for module, found in parts_by_module.items():
        extra = set(found) - {(side, part) for side in "AB" for part in wanted}
        missing = [(side, part) for side in "AB" for part in wanted if (side, part) not in found]
        if missing or extra:
            side, part = (missing or sorted(extra))[0]
            raise bad(
                f"module {module!r} has no consistent {part} tensor for side {side}; the file is incomplete."
            )
        for (side, part), spec in found.items():
            is_index = part == "indices"
            if len(spec.shape) != 3 or spec.shape[-1] != last[part] or 0 in spec.shape[:2]:
                raise bad(
                    f"module {module!r} side {side} {part} is {_describe(spec)}, expected 3 dims ending in "
                    f"{last[part]} (num_vectors={n}, topk={k}); the config does not belong to these weights; "
                    "restore the adapter_config.json saved with them."
                )
            if is_index == spec.dtype.is_floating_point or spec.dtype is torch.bool:
                kind = "an integer" if is_index else "a float"
                raise bad(f"module {module!r} side {side} {part} is {spec.dtype}, expected {kind} dtype.")
        a = found[("A", wanted[0])].shape
        b = found[("B", wanted[0])].shape
        if a[0] != r or b[1] != r:
            raise bad(
                f"module {module!r} has rank {a[0]} (A) and {b[1]} (B) but the config says r={r}; "
                "the config does not belong to these weights; restore the adapter_config.json saved with them."
            )
        for part in wanted[1:]:
            if found[("A", part)].shape[:2] != a[:2] or found[("B", part)].shape[:2] != b[:2]:
                raise bad(f"module {module!r}: indices and weights disagree in shape; the file is damaged.")
        modules[module] = ModuleShape(module, in_features=a[1] * length, out_features=b[0] * length)
    return has_logits, modules


def _describe(spec: Optional[TensorSpec]) -> str:
    return "missing" if spec is None else spec.describe()
