"""Response bodies exactly as the real OpenAI Chat Completions and Anthropic Messages APIs send them.

Kept apart from the HTTP server so tests can compare shapes without a socket.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..sse import encode_event

# (status -> (type, code, message)) for OpenAI; the shapes real api.openai.com returns.
OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error(status: int, message: str | None = None, param: str | None = None) -> bytes:
    etype, code, default = OPENAI_ERRORS.get(status, ("server_error", None, "Error."))
    return orjson.dumps({"error": {"message": message or default, "type": etype, "param": param, "code": code}})


def anthropic_error(status: int, request_id: str, message: str | None = None) -> bytes:
    etype, default = ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
    return orjson.dumps(
        {"type": "error", "error": {"type": etype, "message": message or default}, "request_id": request_id}
    )


def openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_completion(
    cid: str, created: int, model: str, text: str, finish: str, prompt: int, completion: int
) -> bytes:
    return orjson.dumps(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": openai_usage(prompt, completion),
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        }
    )


def openai_stream(
    cid: str, created: int, model: str, pieces: list[str], finish: str, prompt: int, include_usage: bool
) -> list[bytes]:
    """The events of one streamed completion, each a complete `data: ...\\n\\n` block."""
    base: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj = {**base, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return encode_event(orjson.dumps(obj))

    events = [
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    ]
    events += [chunk([{"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}]) for p in pieces]
    events.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
    if include_usage:
        events.append(chunk([], openai_usage(prompt, len(pieces))))
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
        "service_tier": "standard",
    }


def anthropic_message(mid: str, model: str, text: str, stop: str, prompt: int, output: int) -> bytes:
    return orjson.dumps(
        {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": _anthropic_usage(prompt, output),
        }
    )


def anthropic_stream(mid: str, model: str, pieces: list[str], stop: str, prompt: int) -> list[bytes]:
    def ev(name: str, obj: dict[str, Any]) -> bytes:
        return encode_event(orjson.dumps(obj), name)

    start = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(prompt, 1),
        },
    }
    events = [
        ev("message_start", start),
        ev(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ev("ping", {"type": "ping"}),
    ]
    events += [
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in pieces
    ]
    events += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return events
