"""OpenAI Chat Completions wire format."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError
from ..routing import Route
from ..sse import SSEEvent
from .base import Endpoint, ProviderAdapter, StreamReader, Usage


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        input_tokens=_int(u.get("prompt_tokens")),
        output_tokens=_int(u.get("completion_tokens")),
        cache_read_tokens=_int(cached),
    )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class OpenAIStreamReader(StreamReader):
    """Usage arrives only when the client set stream_options.include_usage: a last chunk with
    `choices: []` and a `usage` object (earlier chunks carry `usage: null`). The stream ends with
    the literal `data: [DONE]`."""

    def on_event(self, event: SSEEvent) -> None:
        data = event.data
        if data is None:
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj and isinstance(obj["error"], dict):
            self.error = obj["error"]
        usage = _usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage


class OpenAIAdapter(ProviderAdapter):
    schema = "openai"
    endpoints = {"/v1/chat/completions": Endpoint("/v1/chat/completions", "POST")}

    def error_body(self, err: GatewayError) -> bytes:
        return orjson.dumps(
            {"error": {"message": err.message, "type": err.kind.openai_type, "param": err.param, "code": err.code}}
        )

    def usage_from_json(self, body: dict[str, Any]) -> Usage | None:
        return _usage(body.get("usage"))

    def stream_reader(self) -> StreamReader:
        return OpenAIStreamReader()

    def _model(self, route: Route) -> dict[str, Any]:
        return {"id": route.public_model, "object": "model", "created": 0, "owned_by": route.provider}

    def models_body(self, routes: tuple[Route, ...]) -> bytes:
        return orjson.dumps({"object": "list", "data": [self._model(r) for r in routes]})

    def model_body(self, route: Route) -> bytes:
        return orjson.dumps(self._model(route))
