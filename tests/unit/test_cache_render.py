"""The cache's two wire forms: streams folded into their JSON body (checked against the mock's
non-streamed body, at every byte split), bodies replayed as streams (checked with the official SDKs'
own accumulators), and the round trip between them."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from extproc.cache.render import PIECE, accumulator, render_stream
from extproc.mock import wire as mw
from extproc.sse import SSEEvent, SSEParser
from extproc.translate import anthropic_wire as aw
from extproc.translate import openai_wire as ow

CID, CREATED, MODEL = "chatcmpl-abc123", 1_700_000_000, "gpt-4o-2024-08-06"
MID, CLAUDE = "msg_01XYZ", "claude-sonnet-4-5-20250929"
STREAM_EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def parse(stream: bytes, cut: int | None = None) -> list[SSEEvent]:
    """`stream` through a real SSEParser, optionally fed as two chunks split at `cut`."""
    parser = SSEParser()
    parts = [stream] if cut is None else [stream[:cut], stream[cut:]]
    events = [e for part in parts for e in parser.feed(part)]
    return events + parser.flush()


def accumulate(schema: str, stream: bytes, cut: int | None = None) -> dict[str, Any] | None:
    acc = accumulator(schema)
    for event in parse(stream, cut):
        acc.on_event(event)
    return acc.result()


def data_of(stream: bytes) -> list[str]:
    return [e.data for e in parse(stream) if e.data is not None]


# -- fixtures: the mock's real-shape streams and the same answers' JSON bodies ---------------------


def openai_case(
    content: tuple[str, ...],
    *,
    usage: bool,
    text_tokens: int = 8,
    reasoning: int | None = None,
    cap: int | None = None,
    **stream_kw: Any,
) -> tuple[bytes, dict[str, Any]]:
    answer = mw.build_answer("openai", content, text_tokens, reasoning, cap)
    u = mw.openai_usage(12, answer.output_tokens, cached=4, reasoning=answer.reasoning_tokens)
    events = mw.openai_stream_events(CID, CREATED, MODEL, answer, u if usage else None, **stream_kw)
    body = orjson.loads(mw.openai_completion_body(CID, CREATED, MODEL, answer, u))
    if not usage:
        body["usage"] = None
    return b"".join(e.raw for e in events), body


def anthropic_case(
    content: tuple[str, ...], *, text_tokens: int = 8, cap: int | None = None, **stream_kw: Any
) -> tuple[bytes, dict[str, Any]]:
    answer = mw.build_answer("anthropic", content, text_tokens, None, cap)
    u = mw.anthropic_usage(9, answer.output_tokens, cache_creation=3, cache_read=20)
    events = mw.anthropic_stream_events(MID, CLAUDE, answer, u, **stream_kw)
    body = orjson.loads(mw.anthropic_message_body(MID, CLAUDE, answer, u))
    return b"".join(e.raw for e in events), body


def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = ...) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj: dict[str, Any] = {"id": CID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL}
    obj |= {"service_tier": "default", "system_fingerprint": "fp_x", "choices": choices}
    if usage is not ...:
        obj["usage"] = usage
    return mw.sse_event(orjson.dumps(obj))


def openai_reasoning_case() -> tuple[bytes, dict[str, Any]]:
    """reasoning_content deltas (what OpenAI-compatible servers, and this gateway's Anthropic
    translator, stream) before the text; the mock's OpenAI side has hidden reasoning only."""
    u = ow.usage(7, 9, reasoning=5)
    stream = b"".join(
        [
            openai_chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
            openai_chunk({"reasoning_content": "Let me "}, usage=None),
            openai_chunk({"reasoning_content": "think."}, usage=None),
            openai_chunk({"content": "Hi"}, usage=None),
            openai_chunk({"content": " there"}, usage=None),
            openai_chunk({}, "stop", usage=None),
            openai_chunk(None, usage=u),
            mw.sse_event("[DONE]"),
        ]
    )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "Hi there",
        "refusal": None,
        "annotations": [],
        "reasoning_content": "Let me think.",
    }
    body = ow.completion(CID, CREATED, MODEL, message, "stop", u)
    body |= {"service_tier": "default", "system_fingerprint": "fp_x"}
    return stream, body


STREAMS = [
    pytest.param("openai", *openai_case(("text",), usage=False), id="openai-text"),
    pytest.param("openai", *openai_case(("text",), usage=True), id="openai-text-usage"),
    pytest.param("openai", *openai_case(("thinking", "text"), usage=True), id="openai-hidden-reasoning-text"),
    pytest.param("openai", *openai_reasoning_case(), id="openai-reasoning-content-text"),
    pytest.param("openai", *openai_case(("text", "tool", "tool"), usage=True), id="openai-text-two-tools"),
    pytest.param("openai", *openai_case(("tool", "tool"), usage=False), id="openai-tools-on-role-chunk"),
    pytest.param("openai", *openai_case(("text",), usage=True, cap=5), id="openai-length"),
    pytest.param("openai", *openai_case(("text",), usage=True, obfuscation=False, crlf=True), id="openai-crlf"),
    pytest.param("anthropic", *anthropic_case(("text",)), id="anthropic-text"),
    pytest.param("anthropic", *anthropic_case(("thinking", "text")), id="anthropic-thinking-text"),
    pytest.param("anthropic", *anthropic_case(("text", "tool")), id="anthropic-text-tool-use"),
    pytest.param("anthropic", *anthropic_case(("tool", "tool")), id="anthropic-two-tool-uses"),
    pytest.param("anthropic", *anthropic_case(("text",), delta_usage="output"), id="anthropic-delta-output-only"),
    pytest.param("anthropic", *anthropic_case(("thinking", "text"), cap=10), id="anthropic-max-tokens"),
    pytest.param("anthropic", *anthropic_case(("text", "tool"), crlf=True), id="anthropic-crlf"),
]


@pytest.mark.parametrize(("schema", "stream", "body"), STREAMS)
def test_accumulated_stream_is_the_non_streamed_body(schema: str, stream: bytes, body: dict[str, Any]) -> None:
    result = accumulate(schema, stream)
    assert result == body
    assert result is not None
    if schema == "openai":
        message, want = result["choices"][0]["message"], body["choices"][0]["message"]
        assert message["content"] == want["content"]
        assert message.get("tool_calls") == want.get("tool_calls")
        assert result["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
        assert (result["id"], result["created"], result["model"]) == (CID, CREATED, MODEL)
    else:
        assert result["content"] == body["content"]
        assert result["stop_reason"] == body["stop_reason"]
        assert (result["id"], result["model"]) == (MID, CLAUDE)
    assert result["usage"] == body["usage"]


@pytest.mark.parametrize(("schema", "stream", "body"), STREAMS)
def test_accumulation_is_the_same_at_every_byte_split(schema: str, stream: bytes, body: dict[str, Any]) -> None:
    for cut in range(len(stream) + 1):
        assert accumulate(schema, stream, cut) == body, f"split at byte {cut}"


# -- streams that must not be cached ---------------------------------------------------------------


def _openai_events(content: tuple[str, ...] = ("text",), **kw: Any) -> list[bytes]:
    answer = mw.build_answer("openai", content, 6, cap=kw.pop("cap", None))
    return [e.raw for e in mw.openai_stream_events(CID, CREATED, MODEL, answer, None, **kw)]


def _anthropic_events(content: tuple[str, ...] = ("text",), cap: int | None = None) -> list[bytes]:
    answer = mw.build_answer("anthropic", content, 6, cap=cap)
    u = mw.anthropic_usage(5, answer.output_tokens)
    return [e.raw for e in mw.anthropic_stream_events(MID, CLAUDE, answer, u)]


def _second_choice() -> bytes:
    events = _openai_events()
    obj = orjson.loads(events[1].removeprefix(b"data: "))
    obj["choices"][0]["index"] = 1
    return b"".join([*events[:2], mw.sse_event(orjson.dumps(obj)), *events[2:]])


def _without(events: list[bytes], marker: bytes) -> bytes:
    return b"".join(e for e in events if marker not in e)


INCOMPLETE = [
    pytest.param("openai", b"", id="openai-empty"),
    pytest.param("openai", b"".join(_openai_events()[:-1]), id="openai-no-done"),
    pytest.param("openai", _without(_openai_events(), b'"finish_reason":"stop"'), id="openai-no-finish-reason"),
    pytest.param(
        "openai",
        b"".join([*_openai_events()[:3], mw.openai_stream_error("server_error").raw]),
        id="openai-error-chunk",
    ),
    pytest.param(
        "openai",
        b"".join([*_openai_events()[:-1], mw.openai_stream_error("server_error").raw, _openai_events()[-1]]),
        id="openai-error-chunk-then-done",
    ),
    pytest.param("openai", _second_choice(), id="openai-n2-index-1"),
    pytest.param("openai", b"".join(_openai_events(("tool",), cap=4)), id="openai-cut-tool-arguments"),
    pytest.param(
        "openai", b"".join([_openai_events()[0], b"data: {not json\n\n", *_openai_events()[1:]]), id="garbage"
    ),
    pytest.param("openai", b"".join([*_openai_events(), _openai_events()[1]]), id="openai-chunk-after-done"),
    pytest.param(
        "openai",
        b"".join([*_openai_events()[:-2], openai_chunk({"audio": {"id": "a"}}), *_openai_events()[-2:]]),
        id="openai-unrepresentable-delta",
    ),
    pytest.param("anthropic", b"", id="anthropic-empty"),
    pytest.param("anthropic", b"".join(_anthropic_events()[:-1]), id="anthropic-no-message-stop"),
    pytest.param(
        "anthropic",
        b"".join([*_anthropic_events()[:5], mw.anthropic_stream_error("overloaded_error").raw]),
        id="anthropic-event-error",
    ),
    pytest.param(
        "anthropic",
        b"".join([*_anthropic_events()[:-1], mw.anthropic_stream_error("api_error").raw, _anthropic_events()[-1]]),
        id="anthropic-error-then-stop",
    ),
    pytest.param("anthropic", b"".join(_anthropic_events(("tool",), cap=4)), id="anthropic-cut-tool-input"),
    pytest.param("anthropic", _without(_anthropic_events(), b"content_block_stop"), id="anthropic-block-never-stopped"),
    pytest.param("anthropic", b"".join(_anthropic_events()[1:]), id="anthropic-no-message-start"),
    pytest.param(
        "anthropic",
        b"".join(
            [
                *_anthropic_events()[:3],
                mw.sse_event(
                    orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "mystery_delta"}}),
                    "content_block_delta",
                ),
                *_anthropic_events()[3:],
            ]
        ),
        id="anthropic-unknown-delta",
    ),
    pytest.param(
        "anthropic",
        b"".join([*_anthropic_events()[:2], b"event: content_block_delta\ndata: {oops\n\n", *_anthropic_events()[2:]]),
        id="anthropic-garbage",
    ),
]


def test_the_streams_broken_above_are_cached_when_whole() -> None:
    """So each case above is None for the defect it adds, not for a fault in its base stream."""
    assert accumulate("openai", b"".join(_openai_events())) is not None
    assert accumulate("openai", b"".join(_openai_events(("tool",)))) is not None
    assert accumulate("anthropic", b"".join(_anthropic_events())) is not None
    assert accumulate("anthropic", b"".join(_anthropic_events(("tool",)))) is not None


@pytest.mark.parametrize(("schema", "stream"), INCOMPLETE)
def test_incomplete_or_failed_streams_give_none(schema: str, stream: bytes) -> None:
    assert accumulate(schema, stream) is None


def test_failed_is_known_as_soon_as_the_error_arrives() -> None:
    acc = accumulator("anthropic")
    events = parse(b"".join([*_anthropic_events()[:3], mw.anthropic_stream_error("overloaded_error").raw]))
    for event in events[:-1]:
        acc.on_event(event)
    assert not acc.failed and not acc.done
    acc.on_event(events[-1])
    assert acc.failed and acc.result() is None


# -- render_stream, read back by the official SDKs --------------------------------------------------


def _openai_body(content: tuple[str, ...], text_tokens: int = 8, reasoning: int | None = None) -> dict[str, Any]:
    return openai_case(content, usage=True, text_tokens=text_tokens, reasoning=reasoning)[1]


def _openai_hand_body(message: dict[str, Any], finish: str = "stop", logprobs: Any = None) -> dict[str, Any]:
    body = ow.completion(CID, CREATED, MODEL, message, finish, ow.usage(30, 12, cached=10, cache_creation=4))
    body["choices"][0]["logprobs"] = logprobs
    return body


_LOGPROB = {"token": "Hi", "bytes": [72, 105], "logprob": -0.01, "top_logprobs": []}
OPENAI_BODIES = [
    pytest.param(_openai_body(("text",)), id="text"),
    pytest.param(_openai_body(("text",), text_tokens=300), id="long-text"),
    pytest.param(_openai_body(("thinking", "text"), reasoning=40), id="hidden-reasoning"),
    pytest.param(_openai_body(("text", "tool", "tool")), id="text-two-tools"),
    pytest.param(_openai_body(("tool",)), id="tool-only"),
    pytest.param(
        _openai_hand_body(
            {
                "role": "assistant",
                "content": 'Überraschung 🎉 — 日本語のテキスト also, with a "quote" and a\nnewline',
                "refusal": None,
                "annotations": [],
                "reasoning_content": "thinking about ünïcödé " * 3,
            }
        ),
        id="unicode-reasoning-content",
    ),
    pytest.param(
        _openai_hand_body(
            {"role": "assistant", "content": None, "refusal": "I can't help with that request.", "annotations": []}
        ),
        id="refusal",
    ),
    pytest.param(
        _openai_hand_body(
            {"role": "assistant", "content": "Hi", "refusal": None, "annotations": []},
            logprobs={"content": [_LOGPROB], "refusal": None},
        ),
        id="logprobs",
    ),
    pytest.param(
        _openai_hand_body({"role": "assistant", "content": "", "refusal": None, "annotations": []}, "stop"),
        id="empty-content",
    ),
]


def _tool_calls(message: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize("body", OPENAI_BODIES)
def test_openai_render_rebuilt_by_the_sdk(body: dict[str, Any], include_usage: bool) -> None:
    stream = render_stream("openai", body, include_usage=include_usage)
    datas = data_of(stream)
    assert datas[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in datas[:-1]]
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (CID, CREATED, MODEL)
        assert ("usage" in chunk) is include_usage
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    choice, want = final.choices[0], body["choices"][0]
    content = want["message"]["content"]
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "" if isinstance(content, str) else None,
        "refusal": None,
    }
    assert choice.message.content == content
    assert choice.message.refusal == want["message"]["refusal"]
    assert _tool_calls(choice.message) == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in want["message"].get("tool_calls", ())
    ]
    assert choice.finish_reason == want["finish_reason"]
    assert (choice.logprobs.model_dump() if choice.logprobs else None) == want["logprobs"]
    if want["message"].get("reasoning_content"):
        assert choice.message.to_dict().get("reasoning_content") == want["message"]["reasoning_content"]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert final.usage is not None and final.usage.model_dump(exclude_unset=True) == body["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert final.usage is None
        assert all(c["choices"] for c in chunks)
    # Long text arrives as several small deltas, never as one.
    pieces = [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert all(len(p) <= PIECE for p in pieces)
    assert len(pieces) == -(-len(content or "") // PIECE)


def _anthropic_body(content: tuple[str, ...], text_tokens: int = 8) -> dict[str, Any]:
    return anthropic_case(content, text_tokens=text_tokens)[1]


ANTHROPIC_BODIES = [
    pytest.param(_anthropic_body(("text",)), id="text"),
    pytest.param(_anthropic_body(("text",), text_tokens=300), id="long-text"),
    pytest.param(_anthropic_body(("thinking", "text", "tool")), id="thinking-text-tool"),
    pytest.param(_anthropic_body(("tool", "tool")), id="two-tools"),
    pytest.param(
        aw.message(
            MID,
            CLAUDE,
            [
                {"type": "text", "text": 'Überraschung 🎉 — 日本語\n"quoted"'},
                {"type": "tool_use", "id": "toolu_01", "name": "search", "input": {"q": "ä" * 50, "n": [1, 2.5, None]}},
            ],
            "tool_use",
            aw.usage(100, 40, cache_read=7, cache_creation=2),
        ),
        id="unicode-nested-input",
    ),
    pytest.param(
        aw.message(MID, CLAUDE, [], "end_turn", aw.usage(3, 0)),
        id="empty",
    ),
    pytest.param(
        aw.message(MID, CLAUDE, [{"type": "text", "text": "a"}], "stop_sequence", aw.usage(3, 1), "\n\nHuman:"),
        id="stop-sequence",
    ),
]


def _sdk_block(block: Any) -> dict[str, Any]:
    out: dict[str, Any] = block.model_dump(exclude_none=True)
    return out


@pytest.mark.parametrize("body", ANTHROPIC_BODIES)
def test_anthropic_render_rebuilt_by_the_sdk(body: dict[str, Any]) -> None:
    stream = render_stream("anthropic", body, include_usage=False)
    events = parse(stream)
    assert [e.event for e in events][:1] == ["message_start"]
    assert events[-1].event == "message_stop"
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    for ev in events:
        assert ev.data is not None
        obj = orjson.loads(ev.data)
        assert obj["type"] == ev.event
        if ev.event == "ping":
            continue
        typed = STREAM_EVENTS.validate_python(obj)
        snapshot = accumulate_event(event=typed, current_snapshot=snapshot, json_bufs=json_bufs)
    assert [_sdk_block(b) for b in snapshot.content] == body["content"]
    assert snapshot.stop_reason == body["stop_reason"]
    assert snapshot.stop_sequence == body["stop_sequence"]
    assert (snapshot.id, snapshot.model) == (MID, CLAUDE)
    usage = snapshot.usage.model_dump()
    assert {k: usage[k] for k in body["usage"]} == body["usage"]
    start = orjson.loads(events[0].data or "")["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == min(1, body["usage"]["output_tokens"])
    assert start["usage"]["input_tokens"] == body["usage"]["input_tokens"]


# -- round trip --------------------------------------------------------------------------------------

ROUND_TRIP = [
    *(pytest.param("openai", p.values[0], id=f"openai-{p.id}") for p in OPENAI_BODIES),
    *(pytest.param("anthropic", p.values[0], id=f"anthropic-{p.id}") for p in ANTHROPIC_BODIES),
    pytest.param(
        "anthropic",
        aw.message(
            MID,
            CLAUDE,
            [
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
                {"type": "thinking", "thinking": "", "signature": "sig"},
                {"type": "text", "text": "ok"},
            ],
            "end_turn",
            mw.anthropic_usage(3, 5, cache_ttl="1h", cache_creation=8),
        ),
        id="anthropic-redacted-thinking",
    ),
]


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize(("schema", "body"), ROUND_TRIP)
def test_round_trip(schema: str, body: dict[str, Any], include_usage: bool) -> None:
    stream = render_stream(schema, body, include_usage=include_usage)
    want = body if schema == "anthropic" or include_usage else {**body, "usage": None}
    assert accumulate(schema, stream) == want


def test_round_trip_of_an_accumulated_stream_is_byte_stable() -> None:
    """Stored once, served many times: rendering what was accumulated from a rendering repeats it."""
    for param in STREAMS:
        schema, stream = cast(tuple[str, bytes], param.values[:2])
        body = accumulate(schema, stream)
        assert body is not None
        rendered = render_stream(schema, body, include_usage=True)
        again = accumulate(schema, rendered)
        assert again == body
        assert render_stream(schema, again, include_usage=True) == rendered


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: accumulator("gemini"), "unknown schema", id="accumulator-schema"),
        pytest.param(lambda: render_stream("gemini", {}, include_usage=True), "unknown schema", id="render-schema"),
        pytest.param(
            lambda: render_stream("openai", {"choices": [{"message": {}}, {"message": {}}]}, include_usage=False),
            "exactly one choice",
            id="openai-n2-body",
        ),
        pytest.param(lambda: render_stream("anthropic", {"content": []}, include_usage=False), "usage", id="no-usage"),
    ],
)
def test_bad_arguments_raise(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
