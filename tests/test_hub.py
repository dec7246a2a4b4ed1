"""The Hub: push with a model card, load by repo id, errors as one line.

The real huggingface_hub client talks real HTTP to ``tests/hub_server.py`` on
127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import MULTI_FIXTURE, ROOT, SINGLE_FIXTURE, leftovers, run_cli, snapshot
from hub_server import HubServer
from vblora_store import convert, read_adapters
from vblora_store.hub import is_repo_id, model_card, resolve_source

TOKEN = "hf_vblorastoreTESTtoken0123456789abcdef"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubServer:
    """A running test Hub, with huggingface_hub pointed at it: fresh HF_HOME, the valid token."""
    server = HubServer(TOKEN).start()
    home = tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads its environment once, at import (other tests imported it long ago):
    # give this process's client the values the variables above give a fresh process.
    from huggingface_hub import constants

    for name, value in {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # HF_HUB_DISABLE_PROGRESS_BARS=1, for this process: stderr holds errors only
    yield server
    server.stop()
    if not bars_were_off:
        enable_progress_bars()


def _push(*args: str):
    result = run_cli("push", *args)
    assert result.exit_code == 0, result.output
    return result


def _error_line(result, *fragments: str) -> str:
    """Assert ``result`` is exit 2 with one ``error:`` line holding ``fragments``; return it."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _downloaded(server: HubServer) -> set[str]:
    """The repo files the client fetched (GET .../resolve/<rev>/<path>)."""
    gets = [r.path for r in server.requests if r.method == "GET" and "/resolve/" in r.path]
    return {path.split("/resolve/", 1)[1].split("/", 1)[1] for path in gets}


# -- push, then read back by repo id ------------------------------------------------------


def test_push_packed_then_inspect_report_convert_by_repo_id(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where push converts
    (tmp_path / "tmp").mkdir()
    local_packed = tmp_path / "packed"
    convert(SINGLE_FIXTURE, local_packed, to="packed")

    result = _push(str(SINGLE_FIXTURE), "acme/tiny", "--to", "packed")
    assert result.stdout.strip().startswith(f"{hub.url}/acme/tiny/commit/")
    files = hub.files("acme/tiny")
    assert set(files) == {".gitattributes", "README.md", *ADAPTER_FILES}
    for name in ADAPTER_FILES:
        assert files[name] == (local_packed / name).read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []

    inspected = run_cli("inspect", "acme/tiny", "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["adapters"][0]["form"] == "packed"

    remote = run_cli("report", "acme/tiny", "--format", "json")
    local = run_cli("report", str(local_packed), "--format", "json")
    assert remote.exit_code == local.exit_code == 0
    strip = lambda rows: [{k: v for k, v in row.items() if k != "path"} for row in rows]  # noqa: E731
    assert strip(json.loads(remote.stdout)["adapters"]) == strip(json.loads(local.stdout)["adapters"])

    assert run_cli("convert", "acme/tiny", tmp_path / "topk-from-hub", "--to", "topk").exit_code == 0
    convert(SINGLE_FIXTURE, tmp_path / "topk-local", to="topk")
    assert snapshot(tmp_path / "topk-from-hub") == snapshot(tmp_path / "topk-local")
    assert _downloaded(hub) == ADAPTER_FILES  # never README.md or .gitattributes


def test_push_multi_topk_keeps_layout_and_subfolder_selects_one(hub, tmp_path):
    local_topk = tmp_path / "topk"
    convert(MULTI_FIXTURE, local_topk, to="topk")
    _push(str(MULTI_FIXTURE), "acme/multi", "--to", "topk")
    files = hub.files("acme/multi")
    pushed = {name: content for name, content in files.items() if name not in (".gitattributes", "README.md")}
    assert pushed == {path: data for path, data in snapshot(local_topk).items() if data != b"<dir>"}

    verified = run_cli("verify", str(local_topk), "acme/multi")
    assert verified.exit_code == 0, verified.output

    second = run_cli("inspect", "acme/multi", "--subfolder", "second", "--json")
    assert second.exit_code == 0, second.output
    assert [a["adapter_name"] for a in json.loads(second.stdout)["adapters"]] == ["default"]
    assert json.loads(second.stdout)["adapters"][0]["path"].endswith("second")


def test_engine_loads_by_repo_id_and_subfolder_like_the_local_folder(hub):
    """VBLoRAModel.from_pretrained takes a repo id (and subfolder): same outputs as the local folder."""
    import torch

    from conftest import EVAL_IDS, tiny_llama
    from vblora_store import VBLoRAModel

    _push(str(MULTI_FIXTURE), "acme/engine", "--to", "packed")
    for subfolder, local in ((None, MULTI_FIXTURE), ("second", MULTI_FIXTURE / "second")):
        remote = VBLoRAModel.from_pretrained(tiny_llama(), "acme/engine", subfolder=subfolder)
        reference = VBLoRAModel.from_pretrained(tiny_llama(), local)
        with torch.no_grad():
            torch.testing.assert_close(
                remote(input_ids=EVAL_IDS).logits, reference(input_ids=EVAL_IDS).logits
            )
    assert _downloaded(hub) == ADAPTER_FILES | {f"second/{name}" for name in ADAPTER_FILES}


def test_export_lora_takes_a_repo_id(hub, tmp_path):
    """export-lora reads a repo id like a folder: the same LoRA files as from the local adapter."""
    _push(str(SINGLE_FIXTURE), "acme/export", "--to", "packed")
    convert(SINGLE_FIXTURE, tmp_path / "packed", to="packed")
    assert run_cli("export-lora", "acme/export", tmp_path / "from-hub").exit_code == 0
    assert run_cli("export-lora", str(tmp_path / "packed"), tmp_path / "local").exit_code == 0
    assert snapshot(tmp_path / "from-hub") == snapshot(tmp_path / "local")


def test_merge_downloads_only_the_adapter_it_merges(hub, tmp_path):
    """A repo of several adapters: merge uses the root's (or --subfolder's) alone, and fetches only that."""
    from conftest import tiny_llama

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    _push(str(MULTI_FIXTURE), "acme/merge-multi", "--to", "packed")
    result = run_cli("merge", tmp_path / "base", "acme/merge-multi", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert _downloaded(hub) == ADAPTER_FILES
    result = run_cli(
        "merge", tmp_path / "base", "acme/merge-multi", tmp_path / "second", "--subfolder", "second"
    )
    assert result.exit_code == 0, result.output
    assert _downloaded(hub) == ADAPTER_FILES | {f"second/{name}" for name in ADAPTER_FILES}


def test_push_as_stored_uploads_exactly_the_folder_files(hub, multi_copy):
    (multi_copy / "notes.txt").write_text("not an adapter file")
    _push(str(multi_copy), "acme/as-stored")
    files = hub.files("acme/as-stored")
    assert set(files) - {".gitattributes", "README.md"} == {
        str(p.relative_to(multi_copy)) for p in multi_copy.rglob("adapter_*")
    }
    assert files["adapter_model.safetensors"] == (MULTI_FIXTURE / "adapter_model.safetensors").read_bytes()
    assert "inference-only" not in files["README.md"].decode()


def test_private_revision_commit_message_and_create_pr_reach_the_server(hub):
    url = _push(str(SINGLE_FIXTURE), "acme/opts", "--private", "--revision", "dev", "--commit-message", "v1")
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body)["visibility"] == "private" and hub.repos["acme/opts"].private
    commit = next(r for r in hub.requests if "/commit/" in r.path)
    assert commit.path.endswith("/commit/dev")
    assert json.loads(commit.body.splitlines()[0])["value"]["summary"] == "v1"  # the NDJSON header line
    assert url.stdout.strip().split("/")[-1] == hub.repos["acme/opts"].branches["dev"]
    assert "README.md" not in hub.files("acme/opts", "main") and "README.md" in hub.files("acme/opts", "dev")

    assert run_cli("inspect", "acme/opts", "--revision", "dev").exit_code == 0
    _error_line(run_cli("inspect", "acme/opts"), "acme/opts", "holds no adapter_config.json", "--revision")

    main_before = hub.repos["acme/opts"].branches["main"]
    pr = _push(str(SINGLE_FIXTURE), "acme/opts", "--to", "topk", "--create-pr").stdout.strip()
    assert pr == f"{hub.url}/acme/opts/discussions/1"
    assert hub.repos["acme/opts"].branches["main"] == main_before
    pr_config = json.loads(hub.files("acme/opts", "refs/pr/1")["adapter_config.json"])
    assert pr_config["save_only_topk_weights"] is True
    assert run_cli("inspect", "acme/opts", "--revision", "refs/pr/1").exit_code == 0


# -- the model card ----------------------------------------------------------------------------


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _with_base_model(folder: Path, value: str) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": value}))
    return folder


@pytest.mark.parametrize("form", ["full", "topk", "packed"])
def test_model_card_says_what_it_is_and_how_to_load_it(form, tmp_path):
    folder = SINGLE_FIXTURE if form == "full" else tmp_path / form
    if form != "full":
        convert(SINGLE_FIXTURE, folder, to=form)
    card = model_card(read_adapters(folder), repo_id="acme/tiny")
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "vblora" in meta["tags"]
    assert ("inference-only" in meta["tags"]) == (form != "full")
    assert "base_model" not in meta  # the fixture's config names no base model
    assert "| adapter | form | precision | weights file (bytes) |" in card  # the compression report
    assert "PeftModel.from_pretrained" in card and "VBLoRAModel.from_pretrained" in card
    assert ("cannot resume training" in card) == (form != "full")
    assert ("vblora-store convert acme/tiny tiny-topk --to topk" in card) == (form == "packed")


def test_model_card_names_a_hub_base_model_but_never_a_local_path(single_copy, tmp_path):
    card = model_card(read_adapters(_with_base_model(single_copy, "meta-llama/Llama-2-7b-hf")), repo_id="a/b")
    assert _front_matter(card)["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")' in card

    for local in (str(tmp_path / "models" / "llama"), "./llama-7b"):
        card = model_card(read_adapters(_with_base_model(single_copy, local)), repo_id="a/b")
        assert "base_model" not in _front_matter(card) and local not in card


def test_model_card_of_a_multi_adapter_folder_loads_each_subfolder():
    card = model_card(read_adapters(MULTI_FIXTURE), repo_id="acme/multi")
    assert 'model.load_adapter("acme/multi", subfolder="second", adapter_name="second")' in card
    assert "`second` (`second/`)" in card


# -- sources: local wins, repo ids are validated --------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("acme/tiny", True), ("acme/tiny-v1.2", True), ("tiny", False), ("a/b/c", False), ("./x", False),
     ("../x", False), ("acme/x--y", False), ("/abs/path", False), ("", False)],
)  # fmt: skip
def test_is_repo_id(value, expected):
    assert is_repo_id(value) is expected


def test_an_existing_local_path_wins_over_a_repo_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SINGLE_FIXTURE, tmp_path / "acme" / "tiny")
    assert resolve_source("acme/tiny") == Path("acme/tiny")
    assert run_cli("inspect", "acme/tiny").exit_code == 0
    assert hub.requests == []


# -- errors: exit 2, one line, nothing on disk, never the token ---------------------------------------


def test_missing_repo_is_one_line(hub):
    _error_line(run_cli("inspect", "acme/nope"), "acme/nope", "no such repo", hub.url)
    _error_line(run_cli("report", "acme/nope", "--revision", "v2"), "acme/nope (revision v2)")


def test_missing_revision_and_missing_weights_are_one_line(hub):
    _push(str(SINGLE_FIXTURE), "acme/tiny")
    missing_revision = run_cli("inspect", "acme/tiny", "--revision", "nope")
    _error_line(missing_revision, "acme/tiny (revision nope)", "no such revision")
    config_only = {p: data for p, data in hub.files("acme/tiny").items() if p != "adapter_model.safetensors"}
    hub.set_files("acme/tiny", config_only)
    _error_line(run_cli("inspect", "acme/tiny"), "acme/tiny: adapter_config.json has no adapter_model")


def test_rejected_or_absent_token_is_exit_2_and_never_shown_or_written(hub, tmp_path, monkeypatch):
    _push(str(SINGLE_FIXTURE), "acme/private", "--private")
    wrong = "hf_WRONGtoken0000000000000000000000"
    monkeypatch.setenv("HF_TOKEN", wrong)
    outputs = [
        _error_line(run_cli(*command), "acme/private", "rejected your token (401)")
        for command in (("push", SINGLE_FIXTURE, "acme/private"), ("inspect", "acme/private"))
    ]
    assert {r.auth for r in hub.requests[-2:]} == {"invalid"}
    monkeypatch.delenv("HF_TOKEN")
    outputs.append(_error_line(run_cli("push", SINGLE_FIXTURE, "acme/x"), "no Hub token found", "HF_TOKEN"))
    outputs.append(_error_line(run_cli("inspect", "acme/private"), "acme/private", "no such repo"))  # private
    written = b"".join(snapshot(tmp_path).values())
    for token in (TOKEN, wrong):
        assert all(token not in line for line in outputs)
        assert token.encode() not in written


def test_no_network_is_exit_2_with_nothing_left_on_disk(hub, tmp_path):
    _push(str(SINGLE_FIXTURE), "acme/tiny")
    hub.stop()
    dst = tmp_path / "out" / "tiny"
    dst.parent.mkdir()
    _error_line(run_cli("convert", "acme/tiny", dst), "acme/tiny", "cannot reach", hub.url)
    assert not dst.exists() and leftovers(dst.parent) == []
    assert [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file()] == []
    _error_line(run_cli("push", SINGLE_FIXTURE, "acme/tiny"), "acme/tiny", "cannot reach")


def test_a_fresh_process_is_configured_by_the_environment_alone(hub):
    """No patched constants: HF_ENDPOINT, HF_HOME and HF_TOKEN are all a user sets."""
    _push(str(SINGLE_FIXTURE), "acme/tiny", "--private")
    result = subprocess.run(
        [sys.executable, "-m", "vblora_store", "inspect", "acme/tiny"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "acme/tiny".replace("/", "--") in result.stdout  # the cache folder under HF_HOME
    assert TOKEN not in result.stdout + result.stderr


def test_model_push_to_hub_uploads_the_adapter_not_the_base_model(hub, tmp_path):
    """``VBLoRAModel.push_to_hub`` goes through the Hub layer: adapter files and a card, never base weights."""
    import torch
    from conftest_engine import inputs, logits, tiny_llama, twins

    from vblora_store.engine import VBLoRAModel

    _, model = twins(tiny_llama(), target_modules=["q_proj", "v_proj"])
    url = model.push_to_hub("acme/engine", to="topk", commit_message="from the engine")
    assert url.startswith(f"{hub.url}/acme/engine/commit/")
    assert set(hub.files("acme/engine")) == {".gitattributes", "README.md", *ADAPTER_FILES}
    commit = next(r for r in hub.requests if "/commit/" in r.path)
    assert json.loads(commit.body.splitlines()[0])["value"]["summary"] == "from the engine"
    assert json.loads(hub.files("acme/engine")["adapter_config.json"])["save_only_topk_weights"] is True
    again = VBLoRAModel.from_pretrained(tiny_llama(), "acme/engine")
    assert torch.allclose(logits(again, inputs()), logits(model.eval(), inputs()), atol=1e-5)
    with pytest.raises(TypeError, match="unsupported argument"):
        model.push_to_hub("acme/engine", safe_merge=True)


def test_model_push_to_hub_takes_token_commit_description_and_tags_like_transformers(hub, monkeypatch):
    """transformers' ``push_to_hub(token=, commit_description=, tags=)`` work; other arguments are refused."""
    from conftest_engine import tiny_llama, twins

    from vblora_store.errors import HubAuthError

    _, model = twins(tiny_llama(), target_modules=["q_proj", "v_proj"])
    monkeypatch.delenv("HF_TOKEN")  # only token= can authenticate this push
    url = model.push_to_hub(
        "acme/kw", token=TOKEN, commit_description="Trained on the toy task.", tags=["my-task", "peft"]
    )
    assert url.startswith(f"{hub.url}/acme/kw/commit/")
    assert {r.auth for r in hub.requests} == {"valid"}
    header = json.loads(next(r for r in hub.requests if "/commit/" in r.path).body.splitlines()[0])["value"]
    assert header["description"] == "Trained on the toy task."
    card = hub.files("acme/kw")["README.md"].decode()
    assert _front_matter(card)["tags"] == ["vblora", "peft", "vblora-store", "my-task"]  # ours, then new ones

    wrong = "hf_WRONGtoken0000000000000000000000"
    with pytest.raises(HubAuthError, match="rejected your token") as rejected:
        model.push_to_hub("acme/kw", token=wrong)
    with pytest.raises(HubAuthError, match="token=False sends no token") as none_sent:
        model.push_to_hub("acme/kw", token=False)
    for error in (rejected.value, none_sent.value):
        assert wrong not in str(error) and TOKEN not in str(error)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['max_shard_size'\]"):
        model.push_to_hub("acme/kw", token=TOKEN, max_shard_size="5GB")
    with pytest.raises(TypeError, match="tags must be non-empty strings"):
        model.push_to_hub("acme/kw", token=TOKEN, tags=["ok", 3])


def test_push_takes_one_tag_as_a_string_and_keeps_the_environment_s_token(hub):
    from vblora_store.hub import push

    push(SINGLE_FIXTURE, "acme/one-tag", tags="my-task", commit_description="d")
    assert _front_matter(hub.files("acme/one-tag")["README.md"].decode())["tags"][-1] == "my-task"
    assert {r.auth for r in hub.requests} == {"valid"}  # HF_TOKEN, as before


def test_the_python_functions_take_repo_ids_through_the_one_source_door(hub, tmp_path):
    from vblora_store import export_lora, merge

    _push(str(MULTI_FIXTURE), "acme/py", "--revision", "v2")
    assert [a.name for a in read_adapters("acme/py", revision="v2")] == ["default", "second"]
    assert [a.name for a in read_adapters("acme/py", revision="v2", subfolder="second")] == ["default"]
    convert("acme/py", tmp_path / "topk", to="topk", revision="v2")
    convert(MULTI_FIXTURE, tmp_path / "topk-local", to="topk")
    assert snapshot(tmp_path / "topk") == snapshot(tmp_path / "topk-local")
    export_lora("acme/py", tmp_path / "lora", revision="v2")
    assert (tmp_path / "lora" / "second" / "adapter_model.safetensors").is_file()
    with pytest.raises(Exception, match="acme/py"):
        merge(tmp_path / "no-base", "acme/py", tmp_path / "merged", revision="nope")
