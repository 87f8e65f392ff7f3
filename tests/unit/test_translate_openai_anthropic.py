"""OpenAI client -> Anthropic provider: requests, responses, errors and streams, on real-shape
fixtures (Anthropic's documented Messages responses and SSE streams)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.errors import GatewayError
from extproc.sse import SSEEvent, SSEParser
from extproc.translate import Exchange
from extproc.translate.openai_anthropic import OpenAIToAnthropic

T = OpenAIToAnthropic(default_max_tokens=1000)
MODEL = "claude-sonnet-4-5"


def req(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


# -- requests ---------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}

REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "plain text gets the default max_tokens",
        req(),
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000},
    ),
    (
        "system and developer messages become system blocks",
        req(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                {"role": "user", "content": "Hi"},
            ],
            max_completion_tokens=50,
        ),
        {
            "model": MODEL,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No emoji."}],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 50,
        },
    ),
    (
        "multi-turn, sampling, stop, user",
        req(
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
            max_tokens=20,
            temperature=0.5,
            top_p=0.9,
            stop="END",
            user="u-1",
            seed=7,
            store=False,
            n=1,
            presence_penalty=0,
        ),
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
                {"role": "user", "content": "Bye"},
            ],
            "max_tokens": 20,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
        },
    ),
    (
        "images: data URL to base64, https URL to url",
        req(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ]
        ),
        {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "tools, tool choice, parallel tool calls and their results",
        req(
            messages=[
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C"}]},
                {"role": "user", "content": "Thanks"},
            ],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
        ),
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
            "max_tokens": 1000,
            "tools": [
                {
                    "name": "get_weather",
                    "input_schema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "description": "Weather for a city",
                }
            ],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        },
    ),
    (
        "tool_choice required, streaming with usage, reasoning effort",
        req(
            tools=[WEATHER_TOOL],
            tool_choice="required",
            stream=True,
            stream_options={"include_usage": True},
            reasoning_effort="medium",
            max_completion_tokens=8000,
        ),
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8000,
            "stream": True,
            "tools": [
                {
                    "name": "get_weather",
                    "input_schema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "description": "Weather for a city",
                }
            ],
            "tool_choice": {"type": "any"},
            "thinking": {"type": "enabled", "budget_tokens": 4096},
        },
    ),
]


@pytest.mark.parametrize(("name", "body", "want"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request(name: str, body: dict[str, Any], want: dict[str, Any]) -> None:
    got, ex = T.request(body)
    assert got == want
    assert ex.client_model == MODEL
    assert ex.stream is (body.get("stream") is True)
    assert ex.include_usage is (body.get("stream_options") == {"include_usage": True})


REFUSED: list[tuple[dict[str, Any], str]] = [
    (req(n=2), "n"),
    (req(logprobs=True), "logprobs"),
    (req(logit_bias={"50256": -100}), "logit_bias"),
    (req(frequency_penalty=0.5), "frequency_penalty"),
    (req(temperature=1.5), "temperature"),
    (req(response_format={"type": "json_object"}), "response_format"),
    (req(modalities=["text", "audio"]), "modalities"),
    (req(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (req(functions=[{"name": "f"}]), "functions"),
    (req(some_new_field=1), "some_new_field"),
    (req(n=True), "n"),
    (req(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]), "messages[1].role"),
    (
        req(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        "messages[0].content[0].type",
    ),
    (
        req(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]
        ),
        "messages[0].content[0].image_url.url",
    ),
    (req(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
    (req(reasoning_effort="high", max_completion_tokens=1000), "reasoning_effort"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_untranslatable_fields_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        T.request(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert param in info.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (req(messages=[]), "messages"),
        (req(messages=["hi"]), "messages[0]"),
        (req(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (req(max_tokens=0), "max_completion_tokens"),
        (
            req(
                messages=[
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
                        ],
                    },
                ]
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_malformed_requests_get_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        T.request(body)
    assert (info.value.status, info.value.param) == (400, param)


# -- responses --------------------------------------------------------------------------------------


def anthropic_message(content: list[dict[str, Any]], stop: str, **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 6,
            "service_tier": "standard",
            **usage,
        },
    }


RESPONSES: list[tuple[str, dict[str, Any], dict[str, Any], str, dict[str, int]]] = [
    (
        "text",
        anthropic_message([{"type": "text", "text": "Hello there!"}], "end_turn"),
        {"role": "assistant", "content": "Hello there!", "refusal": None, "annotations": []},
        "stop",
        {"prompt_tokens": 12, "completion_tokens": 6, "cached_tokens": 0},
    ),
    (
        "parallel tool calls with cached input",
        anthropic_message(
            [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"city": "Rome"}},
            ],
            "tool_use",
            cache_read_input_tokens=100,
            cache_creation_input_tokens=20,
        ),
        {
            "role": "assistant",
            "content": "Checking.",
            "refusal": None,
            "annotations": [],
            "tool_calls": [
                {
                    "id": "toolu_01A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_01B",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        "tool_calls",
        {"prompt_tokens": 132, "completion_tokens": 6, "cached_tokens": 100},
    ),
    (
        "thinking then text, cut by max_tokens",
        anthropic_message(
            [
                {"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAhIM"},
                {"type": "text", "text": "The answer"},
            ],
            "max_tokens",
        ),
        {
            "role": "assistant",
            "content": "The answer",
            "refusal": None,
            "annotations": [],
            "reasoning_content": "Let me think.",
        },
        "length",
        {"prompt_tokens": 12, "completion_tokens": 6, "cached_tokens": 0},
    ),
    (
        "refusal",
        anthropic_message([], "refusal"),
        {"role": "assistant", "content": "", "refusal": None, "annotations": []},
        "content_filter",
        {"prompt_tokens": 12, "completion_tokens": 6, "cached_tokens": 0},
    ),
]


@pytest.mark.parametrize(("name", "body", "message", "finish", "usage"), RESPONSES, ids=[r[0] for r in RESPONSES])
def test_response(name: str, body: dict[str, Any], message: dict[str, Any], finish: str, usage: dict[str, int]) -> None:
    got = T.response(body, Exchange(client_model="smart"))
    assert got["object"] == "chat.completion"
    assert got["id"] == body["id"]
    assert got["model"] == body["model"]
    assert got["choices"][0]["message"] == message
    assert got["choices"][0]["finish_reason"] == finish
    u = got["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["cached_tokens"],
    )
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # The OpenAI SDK's own model accepts it.
    ChatCompletion.model_validate(got)


@pytest.mark.parametrize(
    ("status", "body", "etype", "message"),
    [
        (
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too big"}},
            "invalid_request_error",
            "max_tokens: too big",
        ),
        (
            401,
            {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
            "authentication_error",
            "invalid x-api-key",
        ),
        (
            429,
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            "rate_limit_error",
            "slow down",
        ),
        (
            529,
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "server_error",
            "Overloaded",
        ),
        (502, None, "server_error", "upstream error (HTTP 502)"),
    ],
)
def test_errors_come_back_in_openai_shape(status: int, body: Any, etype: str, message: str) -> None:
    got = T.error(status, body)
    assert got["error"]["type"] == etype
    assert got["error"]["message"] == message
    assert set(got["error"]) == {"message", "type", "param", "code"}


# -- streams ----------------------------------------------------------------------------------------


def sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {orjson.dumps({'type': kind, **obj}).decode()}\n\n".encode()


START = sse(
    "message_start",
    {
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 10,
                "output_tokens": 1,
            },
        }
    },
)


def delta(index: int, d: dict[str, Any]) -> bytes:
    return sse("content_block_delta", {"index": index, "delta": d})


def end(stop: str, output: int) -> bytes:
    return sse(
        "message_delta",
        {
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 10,
                "output_tokens": output,
            },
        },
    ) + sse("message_stop", {})


TEXT_STREAM = (
    START
    + sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    + sse("ping", {})
    + delta(0, {"type": "text_delta", "text": "Hello"})
    + delta(0, {"type": "text_delta", "text": " wörld"})
    + sse("content_block_stop", {"index": 0})
    + end("end_turn", 4)
)
TOOL_STREAM = (
    START
    + sse("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
    + delta(0, {"type": "thinking_delta", "thinking": "Two cities."})
    + delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"})
    + sse("content_block_stop", {"index": 0})
    + sse(
        "content_block_start",
        {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}},
    )
    + delta(1, {"type": "input_json_delta", "partial_json": ""})
    + delta(1, {"type": "input_json_delta", "partial_json": '{"city": '})
    + delta(1, {"type": "input_json_delta", "partial_json": '"Paris"}'})
    + sse("content_block_stop", {"index": 1})
    + sse(
        "content_block_start",
        {"index": 2, "content_block": {"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {}}},
    )
    + delta(2, {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'})
    + sse("content_block_stop", {"index": 2})
    + end("tool_use", 30)
)


def translate(raw: bytes, ex: Exchange, cut: int | None = None) -> list[SSEEvent]:
    parser = SSEParser()
    stream = T.stream(ex)
    out: list[SSEEvent] = []
    pieces = [raw] if cut is None else [raw[:cut], raw[cut:]]
    for piece in pieces:
        for ev in parser.feed(piece):
            out += stream.on_event(ev)
    for ev in parser.flush():
        out += stream.on_event(ev)
    out += stream.close()
    return out


def chunks(events: list[SSEEvent]) -> list[Any]:
    return [None if e.data == "[DONE]" else orjson.loads(e.data or "") for e in events]


@pytest.mark.parametrize("raw", [TEXT_STREAM, TOOL_STREAM], ids=["text", "tools"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_is_the_same_at_every_split(raw: bytes, include_usage: bool) -> None:
    ex = Exchange(client_model="smart", stream=True, include_usage=include_usage)
    whole = timeless(translate(raw, ex))
    assert len(whole) > 4
    for cut in range(1, len(raw)):
        assert timeless(translate(raw, ex, cut)) == whole, cut


def timeless(events: list[SSEEvent]) -> list[Any]:
    """Chunks without `created` (the translator's clock, which may tick between two runs)."""
    out = chunks(events)
    for c in out:
        if isinstance(c, dict):
            c.pop("created", None)
    return out


def accumulate(events: list[SSEEvent]) -> Any:
    """The OpenAI SDK's own stream accumulator (what client.chat.completions.stream uses)."""
    state = ChatCompletionStreamState()
    for c in chunks(events):
        if c is not None:
            state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


def test_text_stream_accumulates_in_the_openai_sdk() -> None:
    events = translate(TEXT_STREAM, Exchange(client_model="smart", stream=True, include_usage=True))
    assert events[-1].data == "[DONE]"
    data = chunks(events)[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "msg_01" for c in data)
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert data[-1]["choices"] == [] and data[-1]["usage"]["prompt_tokens"] == 35
    assert all(c["usage"] is None for c in data[:-1])
    final = accumulate(events)
    assert final.choices[0].message.content == "Hello wörld"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.prompt_tokens == 35
    assert final.usage.completion_tokens == 4
    assert final.usage.prompt_tokens_details.cached_tokens == 10


def test_tool_stream_accumulates_parallel_calls() -> None:
    events = translate(TOOL_STREAM, Exchange(client_model="smart", stream=True))
    data = chunks(events)[:-1]
    assert all("usage" not in c for c in data), "no usage chunk unless asked for"
    final = accumulate(events)
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("toolu_A", "get_weather", '{"city": "Paris"}'),
        ("toolu_B", "get_weather", '{"city": "Rome"}'),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    reasoning = [c["choices"][0]["delta"].get("reasoning_content") for c in data if c["choices"]]
    assert "Two cities." in reasoning


def test_mid_stream_error_becomes_an_openai_error_chunk_and_nothing_follows() -> None:
    raw = (
        START
        + sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        + delta(0, {"type": "text_delta", "text": "Hel"})
        + sse("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
        + delta(0, {"type": "text_delta", "text": "lo"})
    )
    data = chunks(translate(raw, Exchange(client_model="smart", stream=True)))
    assert data[-1] == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded_error"}
    }
    assert [c["choices"][0]["delta"].get("content") for c in data[:-1]] == ["", "Hel"]


def test_a_broken_stream_stays_broken() -> None:
    raw = TEXT_STREAM[: TEXT_STREAM.index(b"event: message_delta")]
    events = translate(raw, Exchange(client_model="smart", stream=True, include_usage=True))
    assert all(e.data != "[DONE]" for e in events)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks(events))
