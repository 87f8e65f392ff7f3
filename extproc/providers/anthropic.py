"""Anthropic Messages wire format."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError
from ..routing import Route
from ..sse import SSEEvent
from .base import COMMON_FORWARD_HEADERS, Endpoint, ProviderAdapter, StreamReader, Usage


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _merge(into: Usage, u: Any) -> None:
    """Anthropic reports input (and cache) tokens in message_start and a *cumulative* output count in
    each message_delta, so later values replace earlier ones rather than add to them."""
    if not isinstance(u, dict):
        return
    if "input_tokens" in u and u["input_tokens"] is not None:
        into.input_tokens = _int(u["input_tokens"])
    if "output_tokens" in u and u["output_tokens"] is not None:
        into.output_tokens = _int(u["output_tokens"])
    if u.get("cache_read_input_tokens") is not None:
        into.cache_read_tokens = _int(u["cache_read_input_tokens"])
    if u.get("cache_creation_input_tokens") is not None:
        into.cache_write_tokens = _int(u["cache_creation_input_tokens"])


class AnthropicStreamReader(StreamReader):
    def on_event(self, event: SSEEvent) -> None:
        if event.data is None:
            return
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type") or event.event
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self.usage = Usage()
                _merge(self.usage, msg.get("usage"))
        elif kind == "message_delta":
            if self.usage is None:
                self.usage = Usage()
            _merge(self.usage, obj.get("usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            err = obj.get("error")
            self.error = err if isinstance(err, dict) else {"message": str(err)}


class AnthropicAdapter(ProviderAdapter):
    schema = "anthropic"
    forward_headers = (*COMMON_FORWARD_HEADERS, "anthropic-version", "anthropic-beta")
    endpoints = {
        # The SDK's client.beta.* calls add ?beta=true.
        "/v1/messages": Endpoint("/v1/messages", "POST", query=frozenset({"beta"})),
        "/v1/messages/count_tokens": Endpoint("/v1/messages/count_tokens", "POST", query=frozenset({"beta"})),
    }

    def error_body(self, err: GatewayError) -> bytes:
        error: dict[str, Any] = {"type": err.kind.anthropic_type, "message": err.message}
        if err.code:
            error["code"] = err.code
        return orjson.dumps({"type": "error", "error": error})

    def usage_from_json(self, body: dict[str, Any]) -> Usage | None:
        u = body.get("usage")
        if not isinstance(u, dict):
            return None
        usage = Usage()
        _merge(usage, u)
        return usage

    def stream_reader(self) -> StreamReader:
        return AnthropicStreamReader()

    def _model(self, route: Route) -> dict[str, Any]:
        return {
            "type": "model",
            "id": route.public_model,
            "display_name": route.public_model,
            "created_at": "1970-01-01T00:00:00Z",
        }

    def models_body(self, routes: tuple[Route, ...]) -> bytes:
        data = [self._model(r) for r in routes]
        return orjson.dumps(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def model_body(self, route: Route) -> bytes:
        return orjson.dumps(self._model(route))
