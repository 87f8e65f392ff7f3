"""OpenAI Chat Completions wire format."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError
from ..routing import Route
from ..sse import SSEEvent
from .base import Endpoint, ProviderAdapter, StreamReader, Usage, count, requested_count


def _usage(u: Any) -> Usage | None:
    """prompt_tokens already counts cached tokens, and completion_tokens reasoning tokens: the
    details are parts of the totals, never added to them."""
    if not isinstance(u, dict):
        return None
    prompt = u.get("prompt_tokens_details")
    completion = u.get("completion_tokens_details")
    return Usage(
        input_tokens=count(u.get("prompt_tokens")),
        cached_input_tokens=count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0,
        output_tokens=count(u.get("completion_tokens")),
        reasoning_tokens=count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0,
    )


class OpenAIStreamReader(StreamReader):
    """Usage arrives only when the request set stream_options.include_usage: a last chunk with
    `choices: []` and a `usage` object (earlier chunks carry `usage: null`). The stream ends with
    the literal `data: [DONE]`."""

    def __init__(self, hide_usage: bool = False) -> None:
        super().__init__()
        self._usage: Usage | None = None
        # The gateway added include_usage: the usage chunk is not for the client.
        self.hide_usage = hide_usage
        # The usage-only chunk, once on_event has seen it (hidden when hide_usage).
        self._usage_event: SSEEvent | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    def on_event(self, event: SSEEvent) -> bool:
        data = event.data
        if data is None:
            return False
        if data == "[DONE]":
            self.done = True
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        if isinstance(obj.get("error"), dict):
            self.error = obj["error"]
        if self.response_model is None and isinstance(obj.get("model"), str):
            self.response_model = obj["model"]
        usage = _usage(obj.get("usage"))
        choices = obj.get("choices")
        if usage is not None:
            self._usage = usage
            if choices == []:
                self._usage_event = event
        output = False
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and len(self.finish_reasons) < 16:
                    self.finish_reasons.append(reason[:64])
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    continue
                for name in ("content", "refusal", "reasoning_content"):
                    piece = delta.get(name)
                    if isinstance(piece, str) and piece:
                        self.keep_text(piece)
                        output = True
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        for name in ("name", "arguments"):
                            piece = fn.get(name)
                            if isinstance(piece, str) and piece:
                                self.keep_text(piece)
                                output = True
        return output

    def without_gateway_usage(self, event: SSEEvent) -> SSEEvent | None:
        """The event as the client would have seen it without include_usage: the usage-only chunk
        is dropped (None) and the `"usage":null` member of other chunks removed. Text-level: in
        JSON text an unescaped `"usage":null` can only be a member, and chunks carry no nested
        `usage`; an event that does not contain it passes unchanged (same bytes). Called after
        on_event for the same event, which recognized the usage-only chunk while parsing it."""
        data = event.data
        if not self.hide_usage or data is None or '"usage"' not in data:
            return event
        if event is self._usage_event:
            return None
        for member in (',"usage":null', ', "usage": null', '"usage":null,', '"usage": null, '):
            if member in data:
                return SSEEvent.make(data.replace(member, "", 1), event.event)
        return event


class OpenAIAdapter(ProviderAdapter):
    schema = "openai"
    endpoints = {
        "/v1/chat/completions": Endpoint("/v1/chat/completions", "POST"),
        # Embeddings: routed like chat (the body names the model), recorded with input tokens only.
        "/v1/embeddings": Endpoint("/v1/embeddings", "POST"),
    }

    def error_body(self, err: GatewayError) -> bytes:
        return orjson.dumps(
            {"error": {"message": err.message, "type": err.kind.openai_type, "param": err.param, "code": err.code}}
        )

    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {secret}"),)

    def account_headers(self, organization: str | None, project: str | None) -> tuple[tuple[str, str], ...]:
        # The gateway's choice: the client's own are dropped (upstream_headers).
        out: tuple[tuple[str, str], ...] = ()
        if organization:
            out += (("openai-organization", organization),)
        if project:
            out += (("openai-project", project),)
        return out

    def finish_reasons_from_json(self, body: dict[str, Any]) -> list[str]:
        choices = body.get("choices")
        if not isinstance(choices, list):
            return []
        return [
            c["finish_reason"][:64]
            for c in choices[:16]
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
        ]

    def usage_from_json(self, body: dict[str, Any]) -> Usage | None:
        return _usage(body.get("usage"))

    def output_text_from_json(self, body: dict[str, Any]) -> str:
        parts: list[str] = []
        for choice in body.get("choices") or ():
            msg = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(msg, dict):
                continue
            if isinstance(msg.get("content"), str):
                parts.append(msg["content"])
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    parts.append(fn["arguments"])
        return "".join(parts)

    def stream_reader(self, injected_usage: bool = False) -> StreamReader:
        return OpenAIStreamReader(hide_usage=injected_usage)

    def max_output_tokens(self, body: dict[str, Any]) -> int | None:
        """`max_completion_tokens` (or the older `max_tokens`) bounds each choice; `n` choices."""
        per_choice = requested_count(body.get("max_completion_tokens")) or requested_count(body.get("max_tokens"))
        return per_choice * (requested_count(body.get("n")) or 1) if per_choice else None

    def request_usage_in_stream(self, body: dict[str, Any]) -> bool:
        """Without include_usage a stream reports no usage at all, and would be recorded as an
        estimate; the gateway asks for it and hides the extra chunk, so the client sees exactly the
        stream it asked for. A client that asked (or said false explicitly with other options)
        keeps its own choice only when it asked for usage."""
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return False
        body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
        return True

    def _model(self, route: Route) -> dict[str, Any]:
        return {"id": route.public_model, "object": "model", "created": 0, "owned_by": route.provider}

    def models_body(self, routes: tuple[Route, ...]) -> bytes:
        return orjson.dumps({"object": "list", "data": [self._model(r) for r in routes]})

    def model_body(self, route: Route) -> bytes:
        return orjson.dumps(self._model(route))
