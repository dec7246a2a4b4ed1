"""Defects found by trying the toolkit as a new user would, each fixed and pinned here."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import run_cli, snapshot
from conftest_engine import BASE_KWARGS, inputs, logits, peft_load, tiny_llama
from safetensors.torch import load_file, save_file

from vblora_store import convert, export_lora, read_adapter
from vblora_store.engine import VBLoRAModel
from vblora_store.errors import InvalidAdapterError


@pytest.fixture(scope="module")
def minus_inf_adapter(tmp_path_factory):
    """A full-form adapter PEFT itself writes with -inf logits, and PEFT's top-k save of the same model."""
    tmp = tmp_path_factory.mktemp("minus-inf")
    base = tiny_llama()
    config = {**BASE_KWARGS, "target_modules": ["q_proj", "v_proj"], "save_only_topk_weights": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**config)).save_pretrained(tmp / "topk")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "topk", is_trainable=True)
    loaded.peft_config["default"].save_only_topk_weights = False
    loaded.save_pretrained(tmp / "full")
    loaded.peft_config["default"].save_only_topk_weights = True
    loaded.save_pretrained(tmp / "topk-again")
    return base, tmp


def test_peft_s_minus_inf_logits_are_read_everywhere(minus_inf_adapter, tmp_path):
    base, tmp = minus_inf_adapter
    stored = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    assert any(bool(torch.isneginf(t).any()) for t in stored.values())  # PEFT's own encoding
    convert(tmp / "full", tmp_path / "topk")
    assert (tmp_path / "topk" / "adapter_model.safetensors").read_bytes() == (
        tmp / "topk-again" / "adapter_model.safetensors"
    ).read_bytes()
    result = run_cli("verify", tmp / "full", tmp / "topk")
    assert result.exit_code == 0, result.output
    export_lora(tmp / "full", tmp_path / "lora")
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp / "full")
    assert torch.allclose(logits(ours, inputs()), logits(peft_load(base, tmp / "full"), inputs()), atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.view(-1).__setitem__(0, float("nan")), "holds NaN values"),
        (lambda t: t.view(-1).__setitem__(0, float("inf")), r"holds \+inf values"),
        (lambda t: t[0, 0].fill_(float("-inf")), "fewer than topk=2"),
    ],
    ids=["nan", "plus-inf", "too-few-finite"],
)
def test_damaged_logits_are_still_refused(minus_inf_adapter, tmp_path, damage, message):
    _, tmp = minus_inf_adapter
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tmp / "full" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp / "full" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("vblora_logits_A"))
    damage(tensors[key])
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    before = snapshot(folder)
    with pytest.raises(InvalidAdapterError, match=message):
        convert(folder, tmp_path / "out")
    result = run_cli("convert", folder, tmp_path / "out2")
    assert result.exit_code == 2 and message.replace("\\", "") in result.stderr
    assert snapshot(folder) == before and not (tmp_path / "out").exists()
    with pytest.raises(InvalidAdapterError, match=message):
        read_adapter(folder).check_values()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_folders_and_files_get_the_umask_s_modes(tmp_path, umask, single_copy):
    import os
    import stat

    previous = os.umask(umask)
    try:
        outputs = {
            "convert": lambda dst: convert(single_copy, dst, to="packed"),
            "export-lora": lambda dst: export_lora(single_copy, dst),
        }
        for name, write in outputs.items():
            dst = tmp_path / name
            write(dst)
            for path in [dst, *dst.rglob("*")]:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (name, path.name, oct(mode))
        plot = tmp_path / "usage.png"
        assert run_cli("report", single_copy, "--plot", plot).exit_code == 0
        assert stat.S_IMODE(plot.stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(previous)
