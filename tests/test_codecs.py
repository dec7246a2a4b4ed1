"""Adding a storage form is one codec module plus its registration: everything else follows the registry."""

from __future__ import annotations

import json

import pytest
from conftest import SINGLE_FIXTURE, run_cli

from vblora_store import convert, read_adapters
from vblora_store.hub import model_card
from vblora_store.storage_forms import StorageForm, register_form, unregister_form


@pytest.fixture
def toy():
    form = register_form("toy", codec="toy_codec:CODEC", summary="top-k tensors under other names")
    yield form
    unregister_form("toy")


def test_a_registered_form_is_known_everywhere(toy, tmp_path):
    result = run_cli("convert", SINGLE_FIXTURE, tmp_path / "toy", "--to", "toy")
    assert result.exit_code == 0, result.output
    assert "toy form stores" in result.stdout  # the report printed after converting
    (adapter,) = read_adapters(tmp_path / "toy")
    assert adapter.form is toy and not adapter.form.has_logits
    assert all(key.startswith("toy.") for key in adapter.stored_specs)

    report = json.loads(run_cli("report", tmp_path / "toy", "--format", "json").stdout)["adapters"][0]
    assert report["form"] == "toy" and report["vblora_params"] == report["topk_vblora_params"] + 1
    assert report["toy_vblora_params"] == report["vblora_params"] and "toy" in report["form_bytes"]
    markdown = run_cli("report", tmp_path / "toy", "--format", "markdown").stdout
    assert "| toy form |" in markdown.splitlines()[0]
    card = model_card([adapter], repo_id="acme/toy")
    assert "- **toy**: PEFT's top-k tensors under other names" in card
    assert "convert acme/toy toy-topk --to topk" in card  # PEFT cannot read it: the card says how

    convert(tmp_path / "toy", tmp_path / "topk", to="topk")
    convert(SINGLE_FIXTURE, tmp_path / "direct", to="topk")
    assert (tmp_path / "topk" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "direct" / "adapter_model.safetensors"
    ).read_bytes()
    assert run_cli("verify", SINGLE_FIXTURE, tmp_path / "toy").exit_code == 0
    assert "toy" in run_cli("convert", "--help").stdout


def test_unknown_forms_and_duplicate_names_are_refused(toy):
    with pytest.raises(
        ValueError, match="'zip' is not a storage form; the forms are 'full', 'topk', 'packed', 'compressed', 'toy'"
    ):
        StorageForm("zip")
    with pytest.raises(ValueError, match="registered already"):
        register_form("toy", codec="toy_codec:CODEC", summary="again")
    with pytest.raises(ValueError, match="built in"):
        unregister_form("topk")
    assert StorageForm("toy") is toy and "toy" in [form.value for form in StorageForm]


def test_forms_survive_pickling_as_the_registered_objects():
    import pickle

    assert pickle.loads(pickle.dumps(StorageForm.PACKED)) is StorageForm.PACKED
