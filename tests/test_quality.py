"""On a really trained adapter (PEFT, a pretrained MiniLM, real review sentences): the lossless forms change no
prediction, and the lossy ones say what they cost.  The figures of every form: benchmarks/bench_quality.py."""

from __future__ import annotations

import pytest
import torch

import real_task
from vblora_store import convert, read_adapter
from vblora_store.verify import verify_adapters

pytestmark = pytest.mark.skipif(real_task.missing() is not None, reason=str(real_task.missing()))

STEPS, LR_SCALE = 50, 3.0  # half a minute: 0.62 accuracy against 0.55 untrained (0.77 with the full recipe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    real_task.single_threaded()
    task = real_task.Task.load(n_test=300, max_length=40)
    folder = tmp_path_factory.mktemp("real") / "full"
    real_task.train_adapter(task, folder, steps=STEPS, lr_scale=LR_SCALE)
    return task, folder


def _engine_logits(task, folder):
    from vblora_store.engine import VBLoRAModel

    # another head drawn for the base: the classifier the adapter stores (modules_to_save) must replace it
    return task.logits(VBLoRAModel.from_pretrained(real_task.base_model(seed=1), folder))


def _peft_logits(task, folder):
    from peft import PeftModel

    return task.logits(PeftModel.from_pretrained(real_task.base_model(seed=1), str(folder)))


def test_lossless_forms_change_no_prediction(trained, tmp_path):
    task, full = trained
    peft_full = _peft_logits(task, full)
    untrained = task.accuracy(task.logits(real_task.base_model(seed=0)))
    assert task.accuracy(peft_full) > untrained + 0.04, "the adapter must have learned the task"
    convert(full, tmp_path / "topk", to="topk")
    peft_topk = _peft_logits(task, tmp_path / "topk")
    assert torch.equal(peft_topk.argmax(-1), peft_full.argmax(-1))
    ours = {}
    for form in ("topk", "packed", "compressed"):
        convert(full, tmp_path / form, to=form, force=True)
        ours[form] = _engine_logits(task, tmp_path / form)
        assert torch.equal(ours[form].argmax(-1), peft_topk.argmax(-1)), form
        torch.testing.assert_close(ours[form], peft_topk, rtol=1e-4, atol=1e-5)
    # the three decode to the same top-k tensors bit for bit, so the engine's logits are equal too
    assert torch.equal(ours["packed"], ours["topk"]) and torch.equal(ours["compressed"], ours["topk"])


@pytest.mark.parametrize("bank, weights", [("float16", "float16"), ("int8", "fixed8")])
def test_lossy_forms_move_few_predictions(trained, tmp_path, bank, weights):
    task, full = trained
    convert(full, tmp_path / "topk", to="topk")
    convert(full, tmp_path / "lossy", to="compressed", bank_dtype=bank, weights_dtype=weights)
    error = verify_adapters(read_adapter(tmp_path / "topk"), read_adapter(tmp_path / "lossy")).max_rel_error
    assert 0 < error < 0.02
    changed = _engine_logits(task, tmp_path / "lossy").argmax(-1) != _engine_logits(
        task, tmp_path / "topk"
    ).argmax(-1)
    assert int(changed.sum()) <= 3, f"{int(changed.sum())} of {len(task.test)} predictions changed"
