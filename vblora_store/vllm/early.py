"""Front side: refuse an adapter when it is loaded, so the engine and the server keep serving.

Inside ``LLM.generate`` vLLM loads a request's adapter in the engine's step;
if that load fails, the engine dies (``EngineDeadError``) and every other
request with it.  ``LLMEngine.add_lora`` fails cleanly instead.  So
:func:`install` makes ``LLMEngine.add_request`` load each adapter it has not
loaded yet through ``add_lora`` first: a refusal is raised from ``generate``
before any request of the call is queued (vLLM aborts those already added), and
the engine lives on.  The check runs once per adapter id and path, for every
adapter (plain LoRA too).

The OpenAI server already loads an adapter before serving it
(``--lora-modules``, ``/v1/load_lora_adapter``, resolvers), but answers any
failure but "not found" with 500; a refusal of this plugin (a damaged file, a
rank too high, ...) is the client's to fix, so it becomes a 400.  An adapter
found by a resolver but refused is a 400 already; its message is given the
reason, which vLLM only logs.
"""

from __future__ import annotations

import functools
from http import HTTPStatus
from typing import Any

__all__ = ["REFUSAL_MARK", "install"]

#: How every refusal of the plugin begins (:func:`.loader.refusal`).
REFUSAL_MARK = "VB-LoRA adapter '"
#: The latest refusal of each adapter name loaded by a resolver, until its answer is sent (server process).
_refused_by_name: dict[str, str] = {}
_MAX_REMEMBERED = 1024


def _refusal_line(message: str) -> str:
    """The plugin's one-line refusal inside ``message`` (the engine may wrap it), or ``""``."""
    return message[message.index(REFUSAL_MARK) :].splitlines()[0] if REFUSAL_MARK in message else ""


def install() -> None:
    """Wrap ``LLMEngine.add_request``, ``AsyncLLM.add_lora``, and the server's adapter loading and resolving."""
    from vllm.v1.engine.llm_engine import LLMEngine

    _wrap_add_request(LLMEngine)
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError:  # a vLLM built without its server: nothing to mend there
        return
    from vllm.v1.engine.async_llm import AsyncLLM

    _wrap_load_lora_adapter(OpenAIServingModels)
    _wrap_resolve_lora(OpenAIServingModels)
    _wrap_async_add_lora(AsyncLLM)


def _wrap_add_request(engine_cls: Any) -> None:
    add_request = engine_cls.add_request

    @functools.wraps(add_request)
    def checked_add_request(self, request_id, prompt, params, *args, **kwargs):
        lora_request = kwargs.get("lora_request", args[1] if len(args) > 1 else None)
        if lora_request is not None:
            loaded = self.__dict__.setdefault("_vblora_loaded", set())
            key = (lora_request.lora_int_id, lora_request.lora_path)
            if key not in loaded:
                self.add_lora(lora_request)  # raises here, cleanly, if the adapter cannot load
                loaded.add(key)
        return add_request(self, request_id, prompt, params, *args, **kwargs)

    engine_cls.add_request = checked_add_request


def _wrap_load_lora_adapter(models_cls: Any) -> None:
    from vllm.entrypoints.serve import create_error_response

    load_lora_adapter = models_cls.load_lora_adapter

    @functools.wraps(load_lora_adapter)
    async def load_lora_adapter_400(self, *args, **kwargs):
        result = await load_lora_adapter(self, *args, **kwargs)
        error = getattr(result, "error", None)
        refusal = _refusal_line(getattr(error, "message", ""))
        if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR and refusal:
            return create_error_response(
                message=refusal, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
            )
        return result

    models_cls.load_lora_adapter = load_lora_adapter_400


def _wrap_async_add_lora(engine_cls: Any) -> None:
    add_lora = engine_cls.add_lora

    @functools.wraps(add_lora)
    async def remembering_add_lora(self, lora_request):
        try:
            return await add_lora(self, lora_request)
        except Exception as e:
            refusal = _refusal_line(str(e))
            if refusal:
                if len(_refused_by_name) >= _MAX_REMEMBERED:
                    _refused_by_name.clear()
                _refused_by_name[lora_request.lora_name] = refusal
            raise

    engine_cls.add_lora = remembering_add_lora


def _wrap_resolve_lora(models_cls: Any) -> None:
    resolve_lora = models_cls.resolve_lora

    @functools.wraps(resolve_lora)
    async def resolve_lora_saying_why(self, lora_name: str):
        _refused_by_name.pop(lora_name, None)
        result = await resolve_lora(self, lora_name)
        refusal = _refused_by_name.pop(lora_name, "")
        error = getattr(result, "error", None)
        if error is not None and error.code == HTTPStatus.BAD_REQUEST and refusal:
            error.message = f"{error.message.rstrip('.')}: {refusal}"
        return result

    models_cls.resolve_lora = resolve_lora_saying_why
