"""Anthropic Messages wire format."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError
from ..routing import Route
from ..sse import SSEEvent
from .base import COMMON_FORWARD_HEADERS, Endpoint, ProviderAdapter, StreamReader, Usage, count, requested_count


class _Counts:
    """Anthropic's raw counters. `input_tokens` there excludes cache reads and writes; the
    normalized input is their sum. message_start carries input and cache counts; each
    message_delta carries a *cumulative* output count (and, on newer API versions, the input and
    cache counts again): any field present in a later event replaces the earlier value."""

    __slots__ = ("cache_creation", "cache_read", "final", "input", "output", "seen")

    def __init__(self) -> None:
        self.input = self.cache_read = self.cache_creation = self.output = 0
        self.seen = False
        # A message_delta's usage (or a whole JSON response's) carries the final output count.
        self.final = False

    def merge(self, u: Any) -> None:
        if not isinstance(u, dict):
            return
        self.seen = True
        if u.get("input_tokens") is not None:
            self.input = count(u["input_tokens"])
        if u.get("output_tokens") is not None:
            self.output = count(u["output_tokens"])
        if u.get("cache_read_input_tokens") is not None:
            self.cache_read = count(u["cache_read_input_tokens"])
        if u.get("cache_creation_input_tokens") is not None:
            self.cache_creation = count(u["cache_creation_input_tokens"])

    def usage(self) -> Usage:
        return Usage(
            input_tokens=self.input + self.cache_read + self.cache_creation,
            cached_input_tokens=self.cache_read,
            cache_creation_input_tokens=self.cache_creation,
            output_tokens=self.output,
            # Anthropic reports no separate thinking count: 0, never invented.
            reasoning_tokens=0,
        )


_OUTPUT_DELTAS = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


class AnthropicStreamReader(StreamReader):
    def __init__(self) -> None:
        super().__init__()
        self._counts = _Counts()

    @property
    def usage(self) -> Usage | None:
        return self._counts.usage() if self._counts.seen else None

    @property
    def usage_final(self) -> bool:
        return self._counts.final

    def on_event(self, event: SSEEvent) -> bool:
        if event.data is None:
            return False
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        kind = obj.get("type") or event.event
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                piece = delta.get(_OUTPUT_DELTAS.get(str(delta.get("type")), ""))
                if isinstance(piece, str) and piece:
                    self.keep_text(piece)
                    return True
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
                name = block.get("name")
                if isinstance(name, str):
                    self.keep_text(name)
                return True
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self._counts.merge(msg.get("usage"))
                if isinstance(msg.get("model"), str):
                    self.response_model = msg["model"]
        elif kind == "message_delta":
            delta = obj.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str):
                self.finish_reasons = [reason[:64]]
            self._counts.merge(obj.get("usage"))
            self._counts.final = isinstance(obj.get("usage"), dict)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            err = obj.get("error")
            self.error = err if isinstance(err, dict) else {"message": str(err)}
        return False


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

    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", secret),)

    def finish_reasons_from_json(self, body: dict[str, Any]) -> list[str]:
        reason = body.get("stop_reason")
        return [reason[:64]] if isinstance(reason, str) else []

    def usage_from_json(self, body: dict[str, Any]) -> Usage | None:
        u = body.get("usage")
        if not isinstance(u, dict):
            return None
        counts = _Counts()
        counts.merge(u)
        return counts.usage()

    def output_text_from_json(self, body: dict[str, Any]) -> str:
        parts: list[str] = []
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            for name in ("text", "thinking"):
                if isinstance(block.get(name), str):
                    parts.append(block[name])
            if block.get("type") == "tool_use":
                parts.append(orjson.dumps(block.get("input")).decode())
        return "".join(parts)

    def max_output_tokens(self, body: dict[str, Any]) -> int | None:
        return requested_count(body.get("max_tokens"))

    def stream_reader(self, injected_usage: bool = False) -> StreamReader:
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
