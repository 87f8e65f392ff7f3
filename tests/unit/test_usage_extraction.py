"""Usage out of realistic provider transcripts, whatever the chunking.

The transcripts are written here by hand in the shapes the real APIs document (OpenAI Chat
Completions streaming with include_usage, cached and reasoning tokens, tool calls; Anthropic
Messages streaming with cache writes and reads, thinking and tool_use blocks), independent of the
mock provider, so a shared mistake cannot hide. Each one is cut at every byte offset, with LF and
with CRLF framing, and must give the same usage.
"""

from __future__ import annotations

import random

import orjson
import pytest

from extproc.providers import ADAPTERS, StreamReader, Usage
from extproc.providers.base import MAX_KEPT_TEXT
from extproc.providers.openai import OpenAIStreamReader
from extproc.sse import SSEEvent, SSEParser


def _sse(events: list[tuple[str | None, object]]) -> bytes:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return "".join(out).encode()


def _chunk(delta: dict[str, object], finish: str | None = None, usage: bool = True) -> dict[str, object]:
    c: dict[str, object] = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        c["usage"] = None
    return c


OPENAI_USAGE = {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 10,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

OPENAI_TEXT = _sse(
    [
        (None, _chunk({"role": "assistant", "content": "", "refusal": None})),
        (None, _chunk({"content": "Hello"})),
        (None, _chunk({"content": " wörld ✓"})),
        (None, _chunk({}, "stop")),
        (None, {**_chunk({}), "choices": [], "usage": OPENAI_USAGE}),
        (None, "[DONE]"),
    ]
)

OPENAI_TOOLS = _sse(
    [
        (
            None,
            _chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                }
            ),
        ),
        (None, _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"location'}}]})),
        (None, _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '": "Paris"}'}}]})),
        (None, _chunk({}, "tool_calls")),
        (
            None,
            {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 80, "completion_tokens": 17, "total_tokens": 97}},
        ),
        (None, "[DONE]"),
    ]
)

OPENAI_NO_USAGE = _sse(
    [(None, _chunk({"content": "Hi"}, usage=False)), (None, _chunk({}, "stop", False)), (None, "[DONE]")]
)

_MSG: dict[str, object] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude-sonnet-4-5-20250929",
    "stop_reason": None,
    "stop_sequence": None,
}

ANTHROPIC_CACHED = _sse(
    [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **_MSG,
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 1200,
                        "cache_read_input_tokens": 3000,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me think…"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"location": "Par'},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'is"}'}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 89},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)

# Newer API versions repeat the input and cache counts in message_delta: those win.
ANTHROPIC_DELTA_COUNTS = _sse(
    [
        (
            "message_start",
            {"type": "message_start", "message": {**_MSG, "usage": {"input_tokens": 10, "output_tokens": 1}}},
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi é"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "input_tokens": 12,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 5,
                    "output_tokens": 7,
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)

CASES = [
    ("openai-text", "openai", OPENAI_TEXT, Usage(1117, 1024, 0, 46, 10), "Hello wörld ✓"),
    ("openai-tools", "openai", OPENAI_TOOLS, Usage(80, 0, 0, 17, 0), 'get_weather{"location": "Paris"}'),
    ("openai-no-usage", "openai", OPENAI_NO_USAGE, None, "Hi"),
    (
        "anthropic-cached",
        "anthropic",
        ANTHROPIC_CACHED,
        Usage(4225, 3000, 1200, 89, 0),
        'get_weatherLet me think…{"location": "Paris"}',
    ),
    ("anthropic-delta-counts", "anthropic", ANTHROPIC_DELTA_COUNTS, Usage(17, 5, 0, 7, 0), "Hi é"),
]


def _read(schema: str, pieces: list[bytes]) -> StreamReader:
    reader = ADAPTERS[schema].stream_reader()
    parser = SSEParser()
    for piece in pieces:
        for ev in parser.feed(piece):
            reader.on_event(ev)
    for ev in parser.flush():
        reader.on_event(ev)
    return reader


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize(("name", "schema", "stream", "usage", "text"), CASES, ids=[c[0] for c in CASES])
def test_same_usage_at_every_split(
    name: str, schema: str, stream: bytes, usage: Usage | None, text: str, crlf: bool
) -> None:
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    whole = _read(schema, [stream])
    assert whole.usage == usage
    assert whole.done
    assert sorted("".join(whole.text)) == sorted(text)
    for i in range(len(stream) + 1):
        r = _read(schema, [stream[:i], stream[i:]])
        assert (r.usage, r.done, r.text) == (whole.usage, True, whole.text), i
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), 5))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert _read(schema, pieces).usage == usage, cuts


def test_usage_totals_and_final_flag() -> None:
    assert Usage(4225, 3000, 1200, 89).total_tokens == 4314
    partial = _read("anthropic", [ANTHROPIC_CACHED[: ANTHROPIC_CACHED.index(b"event: message_delta")]])
    # Input known from message_start; output not final until message_delta.
    assert partial.usage == Usage(4225, 3000, 1200, 1, 0) and not partial.usage_final and not partial.done
    assert _read("anthropic", [ANTHROPIC_CACHED]).usage_final
    assert _read("openai", [OPENAI_TEXT]).usage_final


@pytest.mark.parametrize(
    ("schema", "body", "usage"),
    [
        ("openai", {"usage": OPENAI_USAGE}, Usage(1117, 1024, 0, 46, 10)),
        ("openai", {"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}, Usage(5, 0, 0, 2, 0)),
        ("openai", {"usage": "garbage"}, None),
        ("openai", {"usage": {"prompt_tokens": -3, "completion_tokens": True}}, Usage()),
        (
            "anthropic",
            {
                "usage": {
                    "input_tokens": 25,
                    "cache_creation_input_tokens": 1200,
                    "cache_read_input_tokens": 3000,
                    "output_tokens": 89,
                }
            },
            Usage(4225, 3000, 1200, 89, 0),
        ),
        ("anthropic", {"usage": {"input_tokens": 5, "output_tokens": 2}}, Usage(5, 0, 0, 2, 0)),
        (
            "anthropic",
            {"usage": {"input_tokens": 5, "cache_read_input_tokens": None, "output_tokens": 2}},
            Usage(5, 0, 0, 2),
        ),
        ("anthropic", {}, None),
    ],
)
def test_json_usage(schema: str, body: dict[str, object], usage: Usage | None) -> None:
    assert ADAPTERS[schema].usage_from_json(body) == usage


def test_error_in_anthropic_stream() -> None:
    r = _read(
        "anthropic",
        [b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'],
    )
    assert r.error == {"type": "overloaded_error", "message": "Overloaded"} and not r.done


@pytest.mark.parametrize(
    ("body", "injected", "after"),
    [
        ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        (
            {"stream": True, "stream_options": {"include_usage": False}},
            True,
            {"stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            {"stream": True, "stream_options": {"include_obfuscation": False}},
            True,
            {"stream": True, "stream_options": {"include_obfuscation": False, "include_usage": True}},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": True}},
            False,
            {"stream": True, "stream_options": {"include_usage": True}},
        ),
    ],
)
def test_include_usage_injection(body: dict[str, object], injected: bool, after: dict[str, object]) -> None:
    assert ADAPTERS["openai"].request_usage_in_stream(body) is injected
    assert body == after
    assert ADAPTERS["anthropic"].request_usage_in_stream({"stream": True}) is False


def test_injected_usage_is_hidden_from_the_client() -> None:
    """What the client sees of an injected-usage stream equals the same stream without include_usage."""
    reader = ADAPTERS["openai"].stream_reader(injected_usage=True)
    assert isinstance(reader, OpenAIStreamReader)
    seen: list[str] = []
    for ev in SSEParser().feed(OPENAI_TEXT):
        reader.on_event(ev)
        kept = reader.without_gateway_usage(ev)
        if kept is not None:
            assert kept.data is not None
            seen.append(kept.data)
    assert reader.usage == Usage(1117, 1024, 0, 46, 10)
    plain = [orjson.loads(d) for d in seen[:-1]]
    assert all("usage" not in c for c in plain) and seen[-1] == "[DONE]" and len(seen) == 5
    # A client that asked for usage gets the stream untouched.
    own = ADAPTERS["openai"].stream_reader()
    assert all(own.without_gateway_usage(ev) is ev for ev in SSEParser().feed(OPENAI_TEXT))


def test_unchanged_events_keep_their_bytes() -> None:
    reader = ADAPTERS["openai"].stream_reader(injected_usage=True)
    ev = SSEParser().feed(b"data: [DONE]\n\n")[0]
    assert reader.without_gateway_usage(ev) is ev and ev.encode() == b"data: [DONE]\n\n"
    assert SSEEvent.make('{"a":1}', "x").encode() == b'event: x\ndata: {"a":1}\n\n'


@pytest.mark.parametrize(
    ("schema", "body", "code"),
    [
        (
            "openai",
            {"error": {"message": "m", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}},
            "insufficient_quota",
        ),
        ("openai", {"error": {"message": "m", "type": "server_error", "param": None, "code": None}}, "server_error"),
        ("anthropic", {"type": "error", "error": {"type": "rate_limit_error", "message": "m"}}, "rate_limit_error"),
        ("anthropic", "not json", None),
    ],
)
def test_error_codes(schema: str, body: object, code: str | None) -> None:
    assert ADAPTERS[schema].error_code_from_json(body) == code


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 1000])
def test_kept_text_is_joined_as_it_grows(count: int) -> None:
    """A long stream keeps its text in a few strings, not one per event, and loses none of it."""
    reader = OpenAIStreamReader()
    pieces = [f"w{i} " for i in range(count)]
    for piece in pieces:
        reader.keep_text(piece)
    assert reader.text == "".join(pieces)
    assert reader.text_chars == len(reader.text)
    assert len(reader._pieces) < 64 and len(reader._joined) == count // 64


def test_kept_text_stops_at_its_bound() -> None:
    reader = OpenAIStreamReader()
    for _ in range(3):
        reader.keep_text("x" * (MAX_KEPT_TEXT // 2))
    assert reader.text_chars == len(reader.text) == MAX_KEPT_TEXT
    assert reader.dropped_chars == MAX_KEPT_TEXT // 2
