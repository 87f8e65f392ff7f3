"""Anthropic Messages client -> OpenAI Chat Completions provider: request, response, error and
stream translation against real-shape fixtures."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.errors import GatewayError
from extproc.sse import SSEEvent, SSEParser
from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.base import Exchange

T = AnthropicToOpenAI()
MODEL = "gpt-4o-2024-08-06"
USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location"],
}
WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather", "input_schema": WEATHER_SCHEMA}
WEATHER_FN = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the current weather", "parameters": WEATHER_SCHEMA},
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def req(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 1024, "messages": [USER], **fields}


def oai(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages), "max_completion_tokens": 1024, **fields}


OAI_USER = {"role": "user", "content": "What is the weather in Paris?"}

# -- requests -----------------------------------------------------------------------------------

REQUESTS = [
    pytest.param(req(), oai(OAI_USER), id="plain"),
    pytest.param(
        req(system="You are terse."),
        oai({"role": "system", "content": "You are terse."}, OAI_USER),
        id="system-string",
    ),
    pytest.param(
        req(
            system=[
                {"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}},
            ]
        ),
        oai({"role": "system", "content": "You are terse.\n\nAnswer in French."}, OAI_USER),
        id="system-blocks-cache-control-dropped",
    ),
    pytest.param(
        req(
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]},
            ]
        ),
        oai(
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]},
        ),
        id="multi-turn",
    ),
    pytest.param(
        req(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                        {"type": "text", "text": "Compare these.", "cache_control": {"type": "ephemeral"}},
                    ],
                }
            ]
        ),
        oai(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "Compare these."},
                ],
            }
        ),
        id="images-base64-and-url",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL]),
        oai(OAI_USER, tools=[WEATHER_FN]),
        id="tools",
    ),
    pytest.param(
        req(tools=[{"name": "now", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]),
        oai(OAI_USER, tools=[{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]),
        id="tool-without-description",
    ),
    pytest.param(
        req(tools=[{**WEATHER_TOOL, "type": "custom"}], tool_choice={"type": "auto"}),
        oai(OAI_USER, tools=[WEATHER_FN], tool_choice="auto"),
        id="tool-choice-auto",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL], tool_choice={"type": "any"}),
        oai(OAI_USER, tools=[WEATHER_FN], tool_choice="required"),
        id="tool-choice-any",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
        oai(OAI_USER, tools=[WEATHER_FN], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        id="tool-choice-tool",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL], tool_choice={"type": "none"}),
        oai(OAI_USER, tools=[WEATHER_FN], tool_choice="none"),
        id="tool-choice-none",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
        oai(OAI_USER, tools=[WEATHER_FN], tool_choice="auto", parallel_tool_calls=False),
        id="disable-parallel-tool-use",
    ),
    pytest.param(
        req(tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
        oai(OAI_USER),
        id="tool-choice-auto-without-tools",
    ),
    pytest.param(
        req(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "The user wants weather.", "signature": "EqQBCkYIARgC"},
                        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                        {"type": "text", "text": "Let me check."},
                        {
                            "type": "tool_use",
                            "id": "toolu_01A09q90qw90lq917835lq9",
                            "name": "get_weather",
                            "input": {"location": "Paris, France"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                            "content": "15 degrees",
                        },
                        {"type": "text", "text": "And in Celsius?"},
                    ],
                },
            ]
        ),
        oai(
            OAI_USER,
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris, France"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
            {"role": "user", "content": [{"type": "text", "text": "And in Celsius?"}]},
        ),
        id="tool-use-then-result-and-text",
    ),
    pytest.param(
        req(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"location": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "15C"}, {"type": "text", "text": "cloudy"}],
                        },
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "22C", "is_error": True},
                    ],
                },
            ]
        ),
        oai(
            OAI_USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "15C\n\ncloudy"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "22C"},
        ),
        id="parallel-tool-results",
    ),
    pytest.param(
        req(stop_sequences=["\n\nHuman:", "END"], temperature=0.2, top_p=0.9),
        oai(OAI_USER, temperature=0.2, top_p=0.9, stop=["\n\nHuman:", "END"]),
        id="stop-sequences-sampling",
    ),
    pytest.param(
        req(stream=True),
        oai(OAI_USER, stream=True, stream_options={"include_usage": True}),
        id="stream",
    ),
    pytest.param(
        req(thinking={"type": "enabled", "budget_tokens": 1024}),
        oai(OAI_USER, reasoning_effort="low"),
        id="thinking-low",
    ),
    pytest.param(
        req(thinking={"type": "enabled", "budget_tokens": 10000}),
        oai(OAI_USER, reasoning_effort="medium"),
        id="thinking-medium",
    ),
    pytest.param(
        req(thinking={"type": "enabled", "budget_tokens": 16384}),
        oai(OAI_USER, reasoning_effort="high"),
        id="thinking-high",
    ),
    pytest.param(req(thinking={"type": "disabled"}), oai(OAI_USER), id="thinking-disabled"),
    pytest.param(req(thinking={"type": "adaptive"}), oai(OAI_USER), id="thinking-adaptive"),
    pytest.param(
        req(metadata={"user_id": "13803d75-b4b5-4c3e-b2a2-6f21399b021b"}),
        oai(OAI_USER, user="13803d75-b4b5-4c3e-b2a2-6f21399b021b"),
        id="metadata-user",
    ),
]


@pytest.mark.parametrize(("body", "expected"), REQUESTS)
def test_request(body: dict[str, Any], expected: dict[str, Any]) -> None:
    snapshot = orjson.dumps(body)
    out, ex = T.request(body)
    assert out == expected
    assert ex == Exchange(client_model=MODEL, stream=body.get("stream") is True)
    assert orjson.dumps(body) == snapshot  # the client's body is not mutated


REFUSED = [
    pytest.param(req(top_k=40), "top_k", id="top-k"),
    pytest.param(
        req(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]),
        "tools[0].type",
        id="server-tool-web-search",
    ),
    pytest.param(
        req(tools=[WEATHER_TOOL, {"type": "bash_20250124", "name": "bash"}]),
        "tools[1].type",
        id="server-tool-bash",
    ),
    pytest.param(
        req(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Summarize."},
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"},
                        },
                    ],
                }
            ]
        ),
        "messages[0].content[1].type",
        id="document-block",
    ),
    pytest.param(
        req(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}
                    ],
                }
            ]
        ),
        "messages[0].content[0].source.type",
        id="image-file-source",
    ),
    pytest.param(
        req(
            messages=[
                USER,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
                            ],
                        }
                    ],
                },
            ]
        ),
        "messages[2].content[0].content[0].type",
        id="image-in-tool-result",
    ),
    pytest.param(req(stop_sequences=["a", "b", "c", "d", "e"]), "stop_sequences", id="five-stop-sequences"),
    pytest.param(req(service_tier="auto"), "service_tier", id="service-tier"),
    pytest.param(req(container="container_011CQUeDEFs"), "container", id="container"),
    pytest.param(
        req(mcp_servers=[{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]),
        "mcp_servers",
        id="mcp-servers",
    ),
    pytest.param(req(frobnicate=True), "frobnicate", id="unknown-key"),
    pytest.param(req(thinking={"type": "turbo"}), "thinking.type", id="unknown-thinking-type"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_request_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        T.request(body)
    err = info.value
    assert (err.status, err.code, err.param) == (400, "unsupported_parameter", param)
    assert err.message.startswith(f"{param}: ")


INVALID = [
    pytest.param(req(messages="hello"), "messages", id="messages-not-list"),
    pytest.param(req(messages=[USER, USER, {"role": "user", "content": 7}]), "messages[2].content", id="content-int"),
    pytest.param(req(messages=[{"role": "user", "content": ["hi"]}]), "messages[0].content[0]", id="block-not-dict"),
    pytest.param(req(messages=[{"role": "system", "content": "x"}]), "messages[0].role", id="role-system"),
    pytest.param(req(messages=[{"role": "assistant", "content": None}]), "messages[0].content", id="assistant-none"),
    pytest.param(req(system=[{"type": "image"}]), "system[0].type", id="system-non-text"),
    pytest.param(req(tool_choice={"type": "any"}), "tool_choice", id="tool-choice-any-without-tools"),
    pytest.param(req(tools=[WEATHER_TOOL], tool_choice={"type": "maybe"}), "tool_choice.type", id="tool-choice-bad"),
]


@pytest.mark.parametrize(("body", "param"), INVALID)
def test_request_invalid(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        T.request(body)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_request", param)


# -- responses ----------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    """A `chat.completion` as api.openai.com returns it."""
    body = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "refusal": None, "annotations": [], **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
    }
    if usage is not None:
        body["usage"] = usage
    return body


def oai_usage(prompt: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def usage(inp: int, out: int, cache_read: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "output_tokens": out,
    }


def call(cid: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


RESPONSES = [
    pytest.param(
        completion({"content": "It is 15 degrees in Paris."}, "stop", oai_usage(19, 10)),
        [{"type": "text", "text": "It is 15 degrees in Paris."}],
        "end_turn",
        usage(19, 10),
        id="text",
    ),
    pytest.param(
        completion(
            {
                "content": None,
                "tool_calls": [
                    call("call_abc", "get_weather", '{"location":"Paris"}'),
                    call("call_def", "get_weather", '{"location":"Rome"}'),
                    call("call_ghi", "now", ""),
                ],
            },
            "tool_calls",
            oai_usage(82, 51),
        ),
        [
            {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "call_def", "name": "get_weather", "input": {"location": "Rome"}},
            {"type": "tool_use", "id": "call_ghi", "name": "now", "input": {}},
        ],
        "tool_use",
        usage(82, 51),
        id="parallel-tool-calls",
    ),
    pytest.param(
        completion({"content": None, "tool_calls": [call("call_x", "f", '{"a": 1')]}, "stop", oai_usage(5, 5)),
        [{"type": "tool_use", "id": "call_x", "name": "f", "input": {"_raw_arguments": '{"a": 1'}}],
        "tool_use",
        usage(5, 5),
        id="bad-arguments-and-stop-with-tools",
    ),
    pytest.param(
        completion({"content": None, "refusal": "I'm sorry, I can't help with that."}, "stop", oai_usage(12, 9)),
        [{"type": "text", "text": "I'm sorry, I can't help with that."}],
        "end_turn",
        usage(12, 9),
        id="refusal",
    ),
    pytest.param(
        completion({"content": "Once upon a"}, "length", oai_usage(10, 3)),
        [{"type": "text", "text": "Once upon a"}],
        "max_tokens",
        usage(10, 3),
        id="length",
    ),
    pytest.param(
        completion({"content": ""}, "content_filter", oai_usage(10, 0)),
        [],
        "refusal",
        usage(10, 0),
        id="content-filter",
    ),
    pytest.param(
        completion({"content": "Hi again."}, "stop", oai_usage(2006, 300, cached=1920)),
        [{"type": "text", "text": "Hi again."}],
        "end_turn",
        usage(86, 300, cache_read=1920),
        id="cached-tokens",
    ),
    pytest.param(
        completion({"content": "No usage here."}, "stop", None),
        [{"type": "text", "text": "No usage here."}],
        "end_turn",
        usage(0, 0),
        id="missing-usage",
    ),
    pytest.param(
        completion({"reasoning_content": "2+2 is 4.", "content": "4"}, "weird", oai_usage(8, 7)),
        [{"type": "thinking", "thinking": "2+2 is 4.", "signature": ""}, {"type": "text", "text": "4"}],
        "end_turn",
        usage(8, 7),
        id="reasoning-content-unknown-finish",
    ),
]


@pytest.mark.parametrize(("body", "content", "stop", "expected_usage"), RESPONSES)
def test_response(body: dict[str, Any], content: list[Any], stop: str, expected_usage: dict[str, Any]) -> None:
    out = T.response(body, Exchange(client_model="claude-alias"))
    assert out == {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": expected_usage,
    }


# -- errors -------------------------------------------------------------------------------------

ERRORS = [
    pytest.param(
        400,
        {
            "error": {
                "message": "Invalid value for 'tool_choice'.",
                "type": "invalid_request_error",
                "param": "tool_choice",
                "code": None,
            }
        },
        "invalid_request_error",
        "Invalid value for 'tool_choice'.",
        None,
        id="400",
    ),
    pytest.param(
        401,
        {
            "error": {
                "message": "Incorrect API key provided: sk-abc.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        "authentication_error",
        "Incorrect API key provided: sk-abc.",
        "invalid_api_key",
        id="401",
    ),
    pytest.param(
        429,
        {
            "error": {
                "message": "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        "rate_limit_error",
        "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.",
        "rate_limit_exceeded",
        id="429",
    ),
    pytest.param(
        500,
        {
            "error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        "api_error",
        "The server had an error while processing your request. Sorry about that!",
        None,
        id="500",
    ),
    pytest.param(502, None, "api_error", "upstream error (HTTP 502)", None, id="not-json"),
    pytest.param(503, {"error": "overloaded"}, "overloaded_error", "overloaded", None, id="error-string"),
    pytest.param(400, [1, 2], "invalid_request_error", "upstream error (HTTP 400)", None, id="json-list"),
]


@pytest.mark.parametrize(("status", "body", "etype", "message", "code"), ERRORS)
def test_error(status: int, body: Any, etype: str, message: str, code: str | None) -> None:
    error: dict[str, Any] = {"type": etype, "message": message}
    if code:
        error["code"] = code
    assert T.error(status, body) == {"type": "error", "error": error}


# -- streams ------------------------------------------------------------------------------------

CID = "chatcmpl-BQkX7YXhCQW6NB4hZ4mzWVZg0DGkI"


def chunk(delta: dict[str, Any] | None, finish: str | None = None, use: dict[str, Any] | None = None) -> bytes:
    """One `chat.completion.chunk` event as api.openai.com streams it with include_usage."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj = {
        "id": CID,
        "object": "chat.completion.chunk",
        "created": 1745578219,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_f5bdcc3276",
        "choices": choices,
        "usage": use,
        "obfuscation": "Xk2",
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
TEXT_PIECES = ["The", " weather", " in Par", "is is 15", "°C — sunny", "."]
TEXT_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        *(chunk({"content": p}) for p in TEXT_PIECES),
        chunk({}, "stop"),
        chunk(None, use=oai_usage(2006, 6, cached=1920)),
        DONE,
    ]
)


def tool_head(index: int, cid: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}


def tool_args(index: int, piece: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


PARIS = ['{"', "location", '":"', "Paris", '"}']
ROME = ['{"location"', ':"Ro', 'me"}']
TOOL_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"content": "Checking both."}),
        chunk({"tool_calls": [tool_head(0, "call_paris", "get_weather")]}),
        *(chunk(tool_args(0, p)) for p in PARIS),
        chunk({"tool_calls": [tool_head(1, "call_rome", "get_weather")]}),
        *(chunk(tool_args(1, p)) for p in ROME),
        chunk({}, "tool_calls"),
        chunk(None, use=oai_usage(82, 40)),
        DONE,
    ]
)
THOUGHTS = ["Let me", " think", " it through."]
REASONING_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"reasoning_content": p}) for p in THOUGHTS),
        chunk({"content": "Four."}),
        chunk({}, "length"),
        chunk(None, use=oai_usage(30, 12)),
        DONE,
    ]
)


def translate(raw: bytes, cut: int | None = None) -> list[SSEEvent]:
    """The raw provider bytes through a real SSEParser (fed in two chunks split at `cut`) and the
    stream translator."""
    parser = SSEParser()
    st = T.stream(Exchange(client_model="claude-alias", stream=True))
    events: list[SSEEvent] = []
    pieces = [raw] if cut is None else [raw[:cut], raw[cut:]]
    provider_events = [e for p in pieces for e in parser.feed(p)] + parser.flush()
    for ev in provider_events:
        events += st.on_event(ev)
    return events + st.close()


def summary(events: list[SSEEvent]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for e in events:
        assert e.data is not None
        data = orjson.loads(e.data)
        assert data["type"] == e.event
        out.append((e.event, data))
    return out


def concat(events: list[tuple[str, dict[str, Any]]], index: int, field: str) -> str:
    return "".join(
        d["delta"][field]
        for k, d in events
        if k == "content_block_delta" and d["index"] == index and field in d["delta"]
    )


STREAMS = [
    pytest.param(
        TEXT_STREAM,
        ["message_start", "content_block_start", *["content_block_delta"] * 6, "content_block_stop"],
        [({"type": "text", "text": ""}, "text", "".join(TEXT_PIECES))],
        "end_turn",
        usage(86, 6, cache_read=1920),
        id="text",
    ),
    pytest.param(
        TOOL_STREAM,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            *["content_block_delta"] * len(PARIS),
            "content_block_stop",
            "content_block_start",
            *["content_block_delta"] * len(ROME),
            "content_block_stop",
        ],
        [
            ({"type": "text", "text": ""}, "text", "Checking both."),
            (
                {"type": "tool_use", "id": "call_paris", "name": "get_weather", "input": {}},
                "partial_json",
                "".join(PARIS),
            ),
            (
                {"type": "tool_use", "id": "call_rome", "name": "get_weather", "input": {}},
                "partial_json",
                "".join(ROME),
            ),
        ],
        "tool_use",
        usage(82, 40),
        id="parallel-tools",
    ),
    pytest.param(
        REASONING_STREAM,
        [
            "message_start",
            "content_block_start",
            *["content_block_delta"] * 3,
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
        ],
        [
            ({"type": "thinking", "thinking": "", "signature": ""}, "thinking", "".join(THOUGHTS)),
            ({"type": "text", "text": ""}, "text", "Four."),
        ],
        "max_tokens",
        usage(30, 12),
        id="reasoning",
    ),
]


@pytest.mark.parametrize(("raw", "kinds", "blocks", "stop", "expected_usage"), STREAMS)
def test_stream(
    raw: bytes,
    kinds: list[str],
    blocks: list[tuple[dict[str, Any], str, str]],
    stop: str,
    expected_usage: dict[str, Any],
) -> None:
    events = summary(translate(raw))
    assert [k for k, _ in events] == [*kinds, "message_delta", "message_stop"]
    assert events[0][1]["message"] == {
        "id": CID,
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage(0, 0),
    }
    starts = [d for k, d in events if k == "content_block_start"]
    assert [d["index"] for d in starts] == list(range(len(blocks)))
    stops = [d["index"] for k, d in events if k == "content_block_stop"]
    assert stops == list(range(len(blocks)))
    for i, (opening, field, text) in enumerate(blocks):
        assert starts[i]["content_block"] == opening
        assert concat(events, i, field) == text
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": expected_usage,
    }
    assert events[-1][1] == {"type": "message_stop"}


@pytest.mark.parametrize("raw", [TEXT_STREAM, TOOL_STREAM, REASONING_STREAM], ids=["text", "tools", "reasoning"])
def test_stream_every_split(raw: bytes) -> None:
    whole = [(e.event, e.data) for e in translate(raw)]
    for cut in range(1, len(raw)):
        assert [(e.event, e.data) for e in translate(raw, cut)] == whole, f"split at byte {cut}"


def test_stream_sdk_accumulates() -> None:
    """The official SDK's `messages.stream()` accumulator builds the final Message from our events."""
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    for e in translate(TOOL_STREAM):
        assert e.data is not None
        snapshot = accumulate_event(event=orjson.loads(e.data), current_snapshot=snapshot, json_bufs=json_bufs)
    message = snapshot.to_dict()
    assert message["stop_reason"] == "tool_use"
    assert message["usage"]["input_tokens"] == 82
    assert message["usage"]["output_tokens"] == 40
    assert [(b["type"], b.get("text"), b.get("input")) for b in message["content"]] == [
        ("text", "Checking both.", None),
        ("tool_use", None, {"location": "Paris"}),
        ("tool_use", None, {"location": "Rome"}),
    ]


def test_stream_interleaved_and_repeated_ids() -> None:
    """Pieces are routed by OpenAI tool index, and a server that repeats the id on every chunk of a
    call does not open a new block for each."""
    raw = b"".join(
        [
            chunk({"tool_calls": [tool_head(0, "call_a", "f"), tool_head(1, "call_b", "g")]}),
            chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"arguments": '{"x":'}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"y":2}'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            chunk({}, "stop"),
            DONE,
        ]
    )
    events = summary(translate(raw))
    starts = [d["content_block"]["id"] for k, d in events if k == "content_block_start"]
    assert starts == ["call_a", "call_b"]
    assert concat(events, 0, "partial_json") == '{"x":1}'
    assert concat(events, 1, "partial_json") == '{"y":2}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == usage(0, 0)


def test_stream_error_mid_stream() -> None:
    raw = b"".join(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            b'data: {"error":{"message":"The server had an error while processing your request.",'
            b'"type":"server_error","param":null,"code":null}}\n\n',
            chunk({"content": "lo"}),
            DONE,
        ]
    )
    events = summary(translate(raw))
    assert [k for k, _ in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "The server had an error while processing your request."},
    }


def test_stream_broken_before_done() -> None:
    raw = TEXT_STREAM[: TEXT_STREAM.index(DONE)]
    kinds = [k for k, _ in summary(translate(raw))]
    assert kinds[-1] == "content_block_delta"
    assert "message_delta" not in kinds
    assert "message_stop" not in kinds


def test_stream_done_without_choices() -> None:
    kinds = [k for k, _ in summary(translate(DONE))]
    assert kinds == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize(
    "data",
    [None, "", "not json", "[1, 2]", '"text"', "null"],
    ids=["no-data", "empty", "garbage", "list", "string", "null"],
)
def test_stream_ignores_non_objects(data: str | None) -> None:
    st = T.stream(Exchange(stream=True))
    assert st.on_event(SSEEvent(data=data)) == []
    assert st.close() == []
