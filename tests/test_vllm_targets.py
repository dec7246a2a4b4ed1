"""An adapter on modules the engine puts no LoRA layer on is refused, not loaded and silently ignored.

``--lora-target-modules`` narrows the layers vLLM wraps; vLLM alone would load
an adapter on other modules and never apply those parts.  This needs an engine
of its own, and vLLM's in-process engines cannot share a process while alive:
hence a module of its own.
"""

from __future__ import annotations

import pytest

from vllm_support import SKIP_REASON  # noqa: E402

pytest.importorskip("vllm", reason=SKIP_REASON)

from vllm_support import PROMPTS, Ids, greedy, make_base, make_vblora, start_engine, stop_engine  # noqa: E402


def test_modules_the_engine_puts_no_lora_on_are_refused(tmp_path):
    """vLLM would load an adapter on modules left out by --lora-target-modules, and never apply it."""
    base = make_base(tmp_path / "base")
    folder = make_vblora(base, tmp_path / "mlp", seed=36, targets=["o_proj", "down_proj"])
    narrow = start_engine(base, lora_target_modules=["o_proj"])
    try:
        ids = Ids()
        before = greedy(narrow, [None] * len(PROMPTS))
        with pytest.raises(
            ValueError, match=r"adapts \['down_proj'\], on which this engine puts no LoRA layer"
        ):
            greedy(narrow, [ids.request(folder, name="bad-mlp")] * len(PROMPTS))
        assert greedy(narrow, [None] * len(PROMPTS)) == before
    finally:
        stop_engine(narrow)
