"""OpenAI Chat Completions wire shapes the translators produce (mapping logic lives in the pair
modules). Field sets and order follow the real API's responses."""

from __future__ import annotations

from typing import Any

import orjson

from ..sse import SSEEvent

# HTTP status -> OpenAI error type (the SDK picks its exception class by status; the type is what
# callers log and match on).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def done() -> SSEEvent:
    """The stream's last event, `data: [DONE]` (a new object each time: stages may edit events)."""
    return SSEEvent.make("[DONE]")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    etype = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def usage(
    prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0, cache_creation: int | None = None
) -> dict[str, Any]:
    """`prompt` counts every input token (cached ones included), as OpenAI's prompt_tokens does."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if cache_creation is not None:
        # Not an OpenAI field: Anthropic's cache writes, kept visible for callers that read it.
        out["prompt_tokens_details"]["cache_creation_tokens"] = cache_creation
    return out


def completion(
    cid: str,
    created: int,
    model: str,
    message: dict[str, Any],
    finish_reason: str | None,
    usage_obj: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_obj,
        "service_tier": None,
        "system_fingerprint": None,
    }


def chunk_event(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    *,
    with_usage: bool = False,
    usage_obj: dict[str, Any] | None = None,
) -> SSEEvent:
    """One `chat.completion.chunk`. `delta` None: the usage-only chunk (`choices: []`). With
    `with_usage` every chunk carries `usage` (null until the last), as include_usage streams do."""
    obj: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": None,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        obj["usage"] = usage_obj
    return SSEEvent.make(orjson.dumps(obj).decode())


def error_event(message: str, etype: str = "server_error", code: str | None = None) -> SSEEvent:
    """An error inside a stream, as OpenAI sends it: the SDK raises APIError on a chunk with `error`."""
    return SSEEvent.make(
        orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}}).decode()
    )
