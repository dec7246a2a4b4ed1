"""Mixed-adapter batches on OPT, whose ``fc1``/``fc2`` see the batch's tokens flattened: ``(batch·seq, hidden)``.

The rows a layer sees are then the batch's rows flattened in order, each row's
tokens consecutive, so each is routed to its row's adapter.  Every row of a
mixed batch equals that row run alone with its adapter (fp32, atol 1e-5), in a
forward and in ``generate`` with beams.  Adapters saved by PEFT itself, on a
tiny OPT built from a config.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest_engine import BASE_KWARGS, peft_load
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from vblora_store import VBLoRAConfig
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import AdapterNamesError

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]
ROWS = ["a", "b", "__base__", "a"]


def tiny_opt() -> nn.Module:
    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """A tiny OPT, two adapters PEFT saved for it (one full, one top-k), and ours holding both."""
    tmp = tmp_path_factory.mktemp("opt")
    base = tiny_opt()
    for name, seed, topk in (("a", 1, False), ("b", 2, True)):
        config = peft.VBLoRAConfig(**{**BASE_KWARGS, "target_modules": TARGETS, "save_only_topk_weights": topk})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp / name)
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "a", adapter_name="a")
    ours.load_adapter(tmp / "b", "b")
    return base, tmp, ours


def ids(batch: int = 4, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(9))


def alone(model: VBLoRAModel, name: str, row: torch.Tensor, **generate) -> torch.Tensor:
    """``row`` run alone (a batch of one) with adapter ``name`` active (``"__base__"``: disabled)."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model.generate(row, **generate) if generate else model(input_ids=row).logits
        model.set_adapter(name)
        return model.generate(row, **generate) if generate else model(input_ids=row).logits


def test_each_row_of_a_mixed_forward_equals_it_run_alone(opt):
    base, tmp, ours = opt
    batch = ids()
    with torch.no_grad():
        mixed = ours(input_ids=batch, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        assert torch.allclose(mixed[i : i + 1], alone(ours, name, batch[i : i + 1]), atol=ATOL), (i, name)
    with torch.no_grad():  # and "alone" is PEFT's own
        theirs = peft_load(base, tmp / "b").eval()(input_ids=batch[1:2]).logits
    assert torch.allclose(mixed[1:2], theirs, atol=ATOL)
    assert not torch.allclose(mixed[0:1], alone(ours, "__base__", batch[0:1]), atol=1e-3)  # "a" does something


@pytest.mark.parametrize("beams, sequences", [(1, 1), (2, 1), (3, 2)])
def test_generate_gives_each_prompt_its_adapter_with_beams(opt, beams, sequences):
    _, _, ours = opt
    prompts = ids(length=5)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=beams, num_return_sequences=sequences)
    with torch.no_grad():
        mixed = ours.generate(prompts, adapter_names=ROWS, **settings)
    assert mixed.shape[0] == len(ROWS) * sequences
    for i, name in enumerate(ROWS):
        expected = alone(ours, name, prompts[i : i + 1], **settings)
        assert torch.equal(mixed[i * sequences : (i + 1) * sequences], expected), (i, name)
    outputs = {tuple(mixed[i * sequences].tolist()) for i in range(3)}
    assert len(outputs) > 1  # the adapters lead to different continuations


class Pairs(nn.Module):
    """A layer that sees the tokens two by two, ``(batch·seq/2, 2·hidden)``: no row order to route."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, input_ids):
        x = torch.nn.functional.one_hot(input_ids, 16).float()  # (batch, seq) -> (batch, seq, 16)
        return self.proj(x.reshape(-1, 32))  # (batch, seq, 16) -> (batch·seq/2, 32)


def test_any_other_flattening_is_still_refused():
    model = VBLoRAModel(Pairs(), VBLoRAConfig(**{**BASE_KWARGS, "target_modules": ["proj"]}))
    model.eval()
    batch = torch.randint(0, 16, (2, 6))
    with pytest.raises(AdapterNamesError, match="received an input of 6 rows in a batch of 2"):
        model(input_ids=batch, adapter_names=["default", "__base__"])


def test_a_compiled_opt_runs_its_routed_calls(opt):
    """A compiled model routes every call, one adapter or many: OPT's flattened layers included."""
    _, _, ours = opt
    batch = ids()
    ours.set_adapter("a")
    with torch.no_grad():
        eager_one, eager_mixed = ours(input_ids=batch).logits, ours(input_ids=batch, adapter_names=ROWS).logits
        compiled = torch.compile(ours, backend="eager")
        assert torch.allclose(compiled(input_ids=batch).logits, eager_one, atol=ATOL)
        assert torch.allclose(compiled(input_ids=batch, adapter_names=ROWS).logits, eager_mixed, atol=ATOL)
