"""vLLM's OpenAI server serves VB-LoRA folders: at start, loaded at runtime, and by name through our resolver.

One server for the module (it takes most of a minute to start), on
127.0.0.1, with the plugin loaded through its entry point as for any user; the
resolver is configured by its environment variables: a store directory, and
the Hub (the test Hub of tests/hub_server.py, on loopback).  Each VB-LoRA
adapter must answer exactly what its ``export-lora`` answers; what cannot be
served is a 400, and the server goes on serving.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vllm_support import SKIP_REASON  # noqa: E402

pytest.importorskip("vllm", reason=SKIP_REASON)

from hub_server import HubServer  # noqa: E402
from vllm_server import Server  # noqa: E402
from vllm_support import make_base, make_vblora  # noqa: E402

from vblora_store import convert, export_lora  # noqa: E402

TOKEN = "hf_vblorastoreTESTtoken0123456789abcdef"
PROMPTS = ["t1 t5 t9 t14 t20", "t7 t3 t3 t100 t42 t8"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-server")


@pytest.fixture(scope="module")
def base(where) -> Path:
    return make_base(where / "base", tokenizer=True)


@pytest.fixture(scope="module")
def adapters(base, where) -> dict[str, Path]:
    """PEFT adapters, each in a compact form, and each one's LoRA export beside it."""
    made = {}
    for name, seed, to in (("start", 41, "compressed"), ("runtime", 42, "packed"), ("store", 43, "topk"),
                           ("hub", 44, "compressed"), ("hub-v1", 45, "packed")):  # fmt: skip
        full = make_vblora(base, where / f"{name}-full", seed=seed)
        convert(full, where / name, to=to)
        export_lora(where / name, where / f"{name}-lora")
        made[name] = where / name
    store = where / "adapter-store" / "team"
    store.mkdir(parents=True)
    shutil.copytree(made["store"], store / "support")
    made["rank16"] = make_vblora(base, where / "rank16", r=16, seed=46, targets=["q_proj"])
    made["damaged"] = Path(shutil.copytree(made["runtime"], where / "damaged"))
    weights = made["damaged"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    shutil.copytree(made["damaged"], store / "damaged")
    return made


@pytest.fixture(scope="module")
def hub(adapters):
    server = HubServer(TOKEN).start()
    server.create_repo({"organization": "acme", "name": "vb"})
    for branch, name in (("main", "hub"), ("v1", "hub-v1")):
        server.set_files(
            "acme/vb", {f: (adapters[name] / f).read_bytes() for f in ADAPTER_FILES}, branch=branch
        )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(base, adapters, hub, where):
    env = {
        "VBLORA_VLLM_STORE": str(where / "adapter-store"), "VBLORA_VLLM_HUB": "1", "HF_ENDPOINT": hub.url,
        "HF_HOME": str(where / "hf-home"), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_LOGGING_LEVEL": "INFO",
    }  # fmt: skip
    running = Server(base, where / "server.log", lora_modules={"vb": adapters["start"]}, env=env)
    yield running
    running.stop()


def _texts(server: Server, model: str) -> list[str]:
    answers = [server.complete(model, prompt) for prompt in PROMPTS]
    assert all(status == 200 for status, _ in answers), (answers, server.tail())
    return [text for _, text in answers]


def _lora_texts(server: Server, folder: Path) -> list[str]:
    """What the server answers for ``folder``'s LoRA export, loaded at runtime under its own name."""
    name = f"{folder.name}-lora"
    if name not in {m["id"] for m in server.request("GET", "/v1/models")[1]["data"]}:
        assert server.load(name, folder.with_name(name))[0] == 200, server.tail()
    return _texts(server, name)


def test_an_adapter_given_at_start_serves_as_its_lora_export(server, adapters):
    assert _texts(server, "vb") == _lora_texts(server, adapters["start"]) != _texts(server, "base")


def test_an_adapter_loaded_at_runtime_serves_as_its_lora_export(server, adapters):
    status, message = server.load("runtime", adapters["runtime"])
    assert status == 200, message
    assert _texts(server, "runtime") == _lora_texts(server, adapters["runtime"]) != _texts(server, "base")


def test_a_damaged_file_is_a_400_and_the_server_goes_on(server, adapters):
    before = _texts(server, "vb")
    status, message = server.load("damaged", adapters["damaged"])
    assert status == 400, message
    assert message.startswith("VB-LoRA adapter 'damaged': ") and "damaged" in message and "\n" not in message
    assert _texts(server, "vb") == before


def test_a_rank_above_max_lora_rank_is_a_400_naming_the_value(server, adapters):
    status, message = server.load("rank16", adapters["rank16"])
    assert status == 400 and "max_lora_rank=16" in message, message


def test_a_name_in_the_store_resolves_and_serves_as_its_export(server, adapters):
    assert _texts(server, "team/support") == _lora_texts(server, adapters["store"])


def test_a_damaged_adapter_in_the_store_is_a_400(server):
    status, message = server.complete("team/damaged", PROMPTS[0])
    assert status == 400 and "VB-LoRA adapter 'team/damaged'" in message, message


def test_a_hub_repo_id_resolves_optionally_pinned_to_a_revision(server, adapters, hub):
    main = _texts(server, "acme/vb")
    assert main == _lora_texts(server, adapters["hub"])
    pinned = _texts(server, "acme/vb@v1")
    assert pinned == _lora_texts(server, adapters["hub-v1"]) != main
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert fetched <= set(ADAPTER_FILES)  # only the adapter files travel


def test_an_unknown_name_is_a_404(server):
    status, _ = server.complete("acme/nothing-here", PROMPTS[0])
    assert status == 404
