"""Anthropic Messages wire shapes the translators produce (mapping logic lives in the pair
modules). Event names and field order follow the real API's streams."""

from __future__ import annotations

from typing import Any

import orjson

from ..sse import SSEEvent

# HTTP status -> Anthropic error type (what the API itself answers for each status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type(status), "message": message}
    if code:
        error["code"] = code
    return {"type": "error", "error": error}


def usage(input_tokens: int, output_tokens: int, *, cache_read: int = 0, cache_creation: int = 0) -> dict[str, Any]:
    """`input_tokens` excludes cache reads and writes, as Anthropic's does."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }


def message(
    mid: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    usage_obj: dict[str, Any],
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_obj,
    }


def event(kind: str, **fields: Any) -> SSEEvent:
    """`event: <kind>` with `data: {"type": <kind>, ...fields}`."""
    return SSEEvent.make(orjson.dumps({"type": kind, **fields}).decode(), kind)


def error_event(status: int, message: str) -> SSEEvent:
    return event("error", error={"type": error_type(status), "message": message})
