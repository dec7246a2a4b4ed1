"""What vLLM cannot serve is refused when the adapter loads, in one line, and the engine keeps serving.

Inside ``LLM.generate`` a failed adapter load kills vLLM's engine; with the
plugin the refusal is raised from ``generate`` (or ``add_lora``) before
anything is queued, and the next call is served as if nothing had happened.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from vllm_support import SKIP_REASON  # noqa: E402

pytest.importorskip("vllm", reason=SKIP_REASON)

from safetensors.torch import load_file, save_file  # noqa: E402
from test_safety import Exploit, with_pickle  # noqa: E402
from vllm_support import greedy, make_base, make_vblora  # noqa: E402
from vllm_support import base, ids, llm, where  # noqa: E402,F401  (this module's fixtures)

from vblora_store import convert  # noqa: E402

WEIGHTS, WEIGHTS_BIN = "adapter_model.safetensors", "adapter_model.bin"
BANK = "base_model.vblora_vector_bank"


@pytest.fixture(scope="module")
def good(base, where) -> Path:
    return make_vblora(base, where / "good", seed=31)


@pytest.fixture(scope="module")
def served(llm, ids, good) -> list[list[int]]:
    """What the engine answers before any refusal: a good adapter's tokens and the base's."""
    return greedy(llm, [ids.request(good), None, ids.request(good), None])


def _refused(llm, ids, folder: Path, *fragments: str, served, good) -> str:
    """Load ``folder`` both ways vLLM offers; each is one refusal holding ``fragments``; then serve as before."""
    messages = []
    for attempt in ("generate", "add_lora"):
        request = ids.request(folder, name=f"bad-{folder.name}")
        with pytest.raises(ValueError) as caught:
            if attempt == "generate":
                greedy(llm, [ids.request(good), request, None, None])
            else:
                llm.llm_engine.add_lora(request)
        message = str(caught.value)
        assert message.startswith(f"VB-LoRA adapter 'bad-{folder.name}': ") and "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, message
        messages.append(message)
    assert (
        greedy(llm, [ids.request(good), None, ids.request(good), None]) == served
    )  # still serving, the same
    return messages[0]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_rank_above_max_lora_rank_names_the_value_to_pass(llm, ids, base, where, served, good):
    folder = make_vblora(base, where / "r12", r=12, seed=32, targets=["q_proj"])
    _refused(llm, ids, folder, "r=12", "max_lora_rank=8", "max_lora_rank=16", served=served, good=good)


def test_trained_biases_are_refused(llm, ids, where, served, good):
    biased = make_base(where / "biased-base")
    config = (biased / "config.json").read_text().replace('"attention_bias": false', '"attention_bias": true')
    (biased / "config.json").write_text(config)
    folder = make_vblora(biased, where / "bias", seed=33, targets=["q_proj", "v_proj"], bias="all")
    assert any(key.endswith(".bias") for key in load_file(str(folder / WEIGHTS)))
    _refused(llm, ids, folder, "biases", served=served, good=good)


def test_modules_to_save_other_than_a_classification_head_are_refused(llm, ids, base, where, served, good):
    folder = make_vblora(base, where / "mts", seed=34, targets=["q_proj"], modules_to_save=["lm_head"])
    _refused(llm, ids, folder, "['lm_head']", "classification head", served=served, good=good)


def test_module_shapes_of_another_base_model_are_refused(llm, ids, where, served, good):
    other = make_base(where / "wide-base", hidden_size=128)
    folder = make_vblora(other, where / "wide", seed=35, targets=["q_proj", "down_proj"])
    _refused(llm, ids, folder, "(in 128, out 128) in the adapter", "(in 128, out 64) in the served model",
             served=served, good=good)  # fmt: skip


def test_a_truncated_file_is_refused(llm, ids, good, where, served):
    folder = _copy(good, where / "truncated")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    _refused(llm, ids, folder, str(folder / WEIGHTS), "damaged", served=served, good=good)


def test_a_nan_in_the_bank_is_refused(llm, ids, good, where, served):
    folder = _copy(good, where / "nan")
    tensors = load_file(str(folder / WEIGHTS))
    tensors[BANK][3, 5] = float("nan")
    save_file(tensors, str(folder / WEIGHTS))
    _refused(llm, ids, folder, BANK, served=served, good=good)


def test_an_index_outside_the_bank_is_refused(llm, ids, good, where, served):
    folder = where / "bad-index"
    convert(good, folder, to="topk")
    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k in tensors if "topk_indices" in k)
    tensors[key].view(-1)[0] = 200  # N is 64
    save_file(tensors, str(folder / WEIGHTS))
    _refused(llm, ids, folder, key, served=served, good=good)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(llm, ids, good, where, served):
    folder = _copy(good, where / "exploit")
    torch.save(load_file(str(folder / WEIGHTS)), folder / WEIGHTS_BIN)
    (folder / WEIGHTS).unlink()
    marker = where / "pwned"
    with_pickle(folder / WEIGHTS_BIN, pickle.dumps({BANK: Exploit(marker)}, protocol=2))
    _refused(llm, ids, folder, str(folder / WEIGHTS_BIN), served=served, good=good)
    assert not marker.exists()


def test_a_link_leading_outside_the_folder_is_refused(llm, ids, good, where, served):
    folder = _copy(good, where / "link")
    outside = where / "elsewhere.safetensors"
    (folder / WEIGHTS).rename(outside)
    (folder / WEIGHTS).symlink_to(outside)
    _refused(llm, ids, folder, "link", served=served, good=good)
