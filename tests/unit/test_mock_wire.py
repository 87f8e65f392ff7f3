"""The mock provider speaks the real OpenAI and Anthropic wire formats, token accounting included.

The mock is what the gateway's parsers and accounting are checked against, so it is checked here on
its own terms: its bytes are read back with a tiny SSE parser written in this file (not
extproc.sse), the expected numbers are written out literally (not computed with the mock's
helpers), and the official `openai` and `anthropic` SDKs, streaming helpers included, must parse
what it sends and arrive at the usage it logged.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from extproc.mock import wire
from extproc.mock.server import MockProvider

MOCK_DIR = Path(__file__).resolve().parents[2] / "extproc" / "mock"
MESSAGES = [{"role": "user", "content": "one two three"}]  # 3 tokens for the mock's tokenizer
OAI_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
ANT_MESSAGES: list[MessageParam] = [{"role": "user", "content": "one two three"}]
WEATHER_ARGS = '{"location":"Paris, France","unit":"celsius"}'


# -- an SSE parser of our own ---------------------------------------------------------------------


def parse_sse(raw: bytes, crlf: bool = False) -> list[tuple[str | None, str]]:
    """(event name, data) per event; asserts the framing is uniformly LF or CRLF and complete."""
    eol = b"\r\n" if crlf else b"\n"
    bare = raw.replace(b"\r\n", b"") if crlf else raw
    assert b"\r" not in bare and (not crlf or b"\n" not in bare), "mixed line endings"
    assert raw.endswith(eol + eol), "the stream must end with a complete event"
    events: list[tuple[str | None, str]] = []
    for block in raw[: -len(eol + eol)].split(eol + eol):
        name: str | None = None
        data: list[str] = []
        for line in block.decode().split(eol.decode()):
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        events.append((name, "\n".join(data)))
    return events


# -- the mock, in process ------------------------------------------------------------------------


@dataclass
class Mock:
    url: str
    http: httpx.AsyncClient

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Exchange:
        tag = uuid.uuid4().hex
        r = await self.http.post(path, json=body, headers={"x-mock-tag": tag, **(headers or {})})
        return Exchange(r, await self.log(tag))

    async def log(self, tag: str) -> dict[str, Any]:
        r = await self.http.get("/_mock/requests", params={"tag": tag})
        (entry,) = r.json()
        return dict(entry)


@dataclass
class Exchange:
    response: httpx.Response
    log: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return dict(orjson.loads(self.response.content))


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    server = TestServer(MockProvider().app())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Mock(url, http)
    await server.close()


def oai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
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


def ant_usage(inp: int, out: int, write: int = 0, read: int = 0, ttl: str = "5m") -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write if ttl == "5m" else 0,
            "ephemeral_1h_input_tokens": write if ttl == "1h" else 0,
        },
        "output_tokens": out,
        "service_tier": "standard",
    }


# -- the mock stays independent of the gateway ----------------------------------------------------


@pytest.mark.parametrize("path", sorted(MOCK_DIR.glob("*.py")), ids=lambda p: p.name)
def test_mock_imports_nothing_from_the_gateway(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name}: relative import out of extproc.mock"
            assert node.level == 1 or not (node.module or "").startswith("extproc"), path.name
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("extproc") for a in node.names), path.name


@pytest.mark.parametrize(
    ("data", "event", "crlf", "expected"),
    [
        ('{"a":1}', None, False, b'data: {"a":1}\n\n'),
        ('{"a":1}', "ping", False, b'event: ping\ndata: {"a":1}\n\n'),
        ("[DONE]", None, True, b"data: [DONE]\r\n\r\n"),
        ("x\ny", "message_stop", True, b"event: message_stop\r\ndata: x\r\ndata: y\r\n\r\n"),
        (b"bytes", None, False, b"data: bytes\n\n"),
    ],
)
def test_sse_encoder(data: str | bytes, event: str | None, crlf: bool, expected: bytes) -> None:
    assert wire.sse_event(data, event, crlf=crlf) == expected


# -- OpenAI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OAICase:
    name: str
    headers: dict[str, str]
    body: dict[str, Any]
    text: str | None
    tool_calls: list[tuple[str, str]]
    finish: str
    usage: dict[str, Any]


TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "convert", "parameters": {"type": "object", "properties": {}}}},
]
OAI_CASES = [
    OAICase("text", {}, {}, "The quick brown fox jumps over the lazy", [], "stop", oai_usage(3, 8)),
    OAICase(
        "reasoning-and-cache",
        {"x-mock-reasoning-tokens": "5", "x-mock-cached-tokens": "2", "x-mock-output-tokens": "3"},
        {},
        "The quick brown",
        [],
        "stop",
        oai_usage(3, 8, cached=2, reasoning=5),
    ),
    OAICase(
        "cached-at-most-prompt",
        {"x-mock-cached-tokens": "10", "x-mock-input-tokens": "4", "x-mock-output-tokens": "1"},
        {},
        "The",
        [],
        "stop",
        oai_usage(4, 1, cached=4),
    ),
    OAICase(
        "thinking-is-hidden",
        {"x-mock-content": "thinking,text", "x-mock-output-tokens": "2"},
        {},
        "The quick",
        [],
        "stop",
        oai_usage(3, 8, reasoning=6),
    ),
    OAICase(
        "tool",
        {"x-mock-content": "tool"},
        {"tools": TOOLS[:1]},
        None,
        [("lookup", WEATHER_ARGS)],
        "tool_calls",
        oai_usage(3, 11),
    ),
    OAICase(
        "text-and-two-tools",
        {"x-mock-content": "text,tool,tool", "x-mock-output-tokens": "2"},
        {"tools": TOOLS},
        "The quick",
        [("lookup", WEATHER_ARGS), ("convert", WEATHER_ARGS)],
        "tool_calls",
        oai_usage(3, 24),
    ),
    OAICase(
        "length-counts-reasoning-first",
        {"x-mock-reasoning-tokens": "3"},
        {"max_completion_tokens": 4},
        "The",
        [],
        "length",
        oai_usage(3, 4, reasoning=3),
    ),
    OAICase(
        "length-cuts-a-tool-call",
        {"x-mock-content": "tool"},
        {"max_tokens": 5},
        None,
        [("get_weather", '{"location":"Paris,')],
        "length",
        oai_usage(3, 5),
    ),
]


def _oai_body(case: OAICase, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": MESSAGES, **case.body, **extra}


@pytest.mark.parametrize("case", OAI_CASES, ids=lambda c: c.name)
async def test_openai_json(mock: Mock, case: OAICase) -> None:
    ex = await mock.post("/v1/chat/completions", _oai_body(case), case.headers)
    body = ex.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == case.finish
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == case.text
    assert message["refusal"] is None and message["annotations"] == []
    calls = message.get("tool_calls", [])
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == case.tool_calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert body["usage"] == case.usage
    assert ex.log["usage"] == case.usage and ex.log["status"] == 200


@pytest.mark.parametrize("case", OAI_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_stream(mock: Mock, case: OAICase, include_usage: bool) -> None:
    body = _oai_body(case, stream=True, stream_options={"include_usage": include_usage})
    ex = await mock.post("/v1/chat/completions", body, case.headers)
    assert ex.response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(ex.response.content)
    assert events[-1] == (None, "[DONE]") and all(name is None for name, _ in events)
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and isinstance(c["obfuscation"], str) for c in chunks)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == case.usage
        assert all("usage" in c and c["usage"] is None for c in chunks)
        assert ex.log["usage"] == case.usage
    else:
        assert all("usage" not in c for c in chunks)
        assert ex.log["usage"] is None, "nothing was reported, so nothing is logged"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [case.finish]
    text = "".join(d.get("content") or "" for d in deltas)
    assert text == (case.text or "")
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] not in calls and tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == case.tool_calls


async def test_openai_stream_without_obfuscation(mock: Mock) -> None:
    opts = {"include_usage": True, "include_obfuscation": False}
    ex = await mock.post("/v1/chat/completions", {"model": "m", "messages": [], "stream": True, "stream_options": opts})
    assert all("obfuscation" not in orjson.loads(d) for _, d in parse_sse(ex.response.content)[:-1])


# -- Anthropic ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AntCase:
    name: str
    headers: dict[str, str]
    body: dict[str, Any]
    # (type, text or thinking or tool name, tool input)
    blocks: list[tuple[str, str, dict[str, Any] | None]]
    stop: str
    usage: dict[str, Any]


WEATHER_INPUT = {"location": "Paris, France", "unit": "celsius"}
ANT_CASES = [
    AntCase("text", {}, {}, [("text", "The quick brown fox jumps over the lazy", None)], "end_turn", ant_usage(3, 8)),
    AntCase(
        "cache-write-and-read",
        {"x-mock-cache-creation-tokens": "100", "x-mock-cache-read-tokens": "50", "x-mock-output-tokens": "1"},
        {"system": "be brief"},
        [("text", "The", None)],
        "end_turn",
        ant_usage(5, 1, write=100, read=50),
    ),
    AntCase(
        "cache-write-1h",
        {"x-mock-cache-creation-tokens": "7", "x-mock-cache-ttl": "1h", "x-mock-input-tokens": "40"},
        {},
        [("text", "The quick brown fox jumps over the lazy", None)],
        "end_turn",
        ant_usage(40, 8, write=7, ttl="1h"),
    ),
    AntCase(
        "thinking",
        {"x-mock-content": "thinking,text", "x-mock-reasoning-tokens": "4", "x-mock-output-tokens": "2"},
        {},
        [("thinking", "Let me think this", None), ("text", "The quick", None)],
        "end_turn",
        ant_usage(3, 6),
    ),
    AntCase(
        "reasoning-adds-a-thinking-block",
        {"x-mock-reasoning-tokens": "2", "x-mock-output-tokens": "1"},
        {},
        [("thinking", "Let me", None), ("text", "The", None)],
        "end_turn",
        ant_usage(3, 3),
    ),
    AntCase(
        "text-then-tool",
        {"x-mock-content": "text,tool", "x-mock-output-tokens": "3"},
        {"tools": [{"name": "lookup", "input_schema": {"type": "object"}}]},
        [("text", "The quick brown", None), ("tool_use", "lookup", WEATHER_INPUT)],
        "tool_use",
        ant_usage(3, 14),
    ),
    AntCase(
        "max-tokens-counts-thinking",
        {"x-mock-content": "thinking,text", "x-mock-reasoning-tokens": "4"},
        {"max_tokens": 5},
        [("thinking", "Let me think this", None), ("text", "The", None)],
        "max_tokens",
        ant_usage(3, 5),
    ),
]


def _ant_body(case: AntCase, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 100, "messages": MESSAGES, **case.body, **extra}


def _ant_blocks(content: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any] | None]]:
    out: list[tuple[str, str, dict[str, Any] | None]] = []
    for b in content:
        if b["type"] == "thinking":
            assert b["signature"], "a thinking block is signed"
            out.append(("thinking", b["thinking"], None))
        elif b["type"] == "tool_use":
            assert b["id"].startswith("toolu_")
            out.append(("tool_use", b["name"], b["input"]))
        else:
            out.append((b["type"], b["text"], None))
    return out


@pytest.mark.parametrize("case", ANT_CASES, ids=lambda c: c.name)
async def test_anthropic_json(mock: Mock, case: AntCase) -> None:
    ex = await mock.post("/v1/messages", _ant_body(case), case.headers)
    body = ex.json()
    assert (body["type"], body["role"], body["stop_reason"], body["stop_sequence"]) == (
        "message",
        "assistant",
        case.stop,
        None,
    )
    assert _ant_blocks(body["content"]) == case.blocks
    assert body["usage"] == case.usage
    assert ex.log["usage"] == case.usage and ex.log["status"] == 200


@pytest.mark.parametrize("case", ANT_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("delta_usage", ["full", "output"])
async def test_anthropic_stream(mock: Mock, case: AntCase, delta_usage: str) -> None:
    ex = await mock.post(
        "/v1/messages", _ant_body(case, stream=True), {**case.headers, "x-mock-delta-usage": delta_usage}
    )
    events = [(name, orjson.loads(data)) for name, data in parse_sse(ex.response.content)]
    assert all(obj["type"] == name for name, obj in events), "the event name repeats the data's type"
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"] and names.count("ping") == 1
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {**case.usage, "output_tokens": 1}, "message_start: input and cache counts, output 1"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": case.stop, "stop_sequence": None}
    if delta_usage == "full":
        keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
        assert delta["usage"] == {k: case.usage[k] for k in keys}
    else:
        assert delta["usage"] == {"output_tokens": case.usage["output_tokens"]}
    assert ex.log["usage"] == case.usage, "the log holds the merged usage, output cumulative"

    blocks: list[dict[str, Any]] = []
    for name, obj in events[1:-2]:
        if name == "content_block_start":
            assert obj["index"] == len(blocks)
            blocks.append({**obj["content_block"], "json": "", "open": True})
        elif name == "content_block_delta":
            block, d = blocks[obj["index"]], obj["delta"]
            assert block["open"]
            kind = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}[block["type"]]
            if d["type"] == "signature_delta":
                assert block["type"] == "thinking" and not block["signature"]
                block["signature"] = d["signature"]
            else:
                assert d["type"] == kind and not block.get("signature")
                field_name = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "json"}[kind]
                block[field_name] += d["partial_json" if kind == "input_json_delta" else field_name]
        elif name == "content_block_stop":
            blocks[obj["index"]]["open"] = False
    assert not any(b["open"] for b in blocks)
    for b in blocks:
        if b["type"] == "thinking":
            assert (b["signature"], b["thinking"]) != ("", ""), "signature_delta closes a thinking block"
        if b["type"] == "tool_use":
            assert b["input"] == {}
            b["input"] = orjson.loads(b["json"])
    assert _ant_blocks(blocks) == case.blocks


# -- CRLF framing, errors, broken streams --------------------------------------------------------


def _normalized(events: list[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    """Events with the per-request ids and timestamps blanked, to compare two requests."""
    out = []
    for name, data in events:
        obj = orjson.loads(data) if data.startswith("{") else data
        if isinstance(obj, dict):
            for holder in (obj, obj.get("message") or {}):
                holder.pop("id", None)
                holder.pop("created", None)
            obj = orjson.dumps(obj).decode()
        out.append((name, str(obj)))
    return out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}),
        ("/v1/messages", {"max_tokens": 50}),
    ],
)
async def test_crlf_framing_carries_the_same_events(mock: Mock, path: str, body: dict[str, Any]) -> None:
    full = {"model": "m", "messages": MESSAGES, "stream": True, **body}
    lf = await mock.post(path, full)
    crlf = await mock.post(path, full, {"x-mock-crlf": "1"})
    assert b"\r\n\r\n" in crlf.response.content
    assert _normalized(parse_sse(crlf.response.content, crlf=True)) == _normalized(parse_sse(lf.response.content))
    assert crlf.log["usage"] == lf.log["usage"] is not None


@pytest.mark.parametrize(
    ("path", "status", "expected", "retry_after"),
    [
        ("/v1/chat/completions", 401, ("invalid_request_error", "invalid_api_key"), None),
        ("/v1/chat/completions", 404, ("invalid_request_error", "model_not_found"), None),
        ("/v1/chat/completions", 429, ("requests", "rate_limit_exceeded"), "1"),
        ("/v1/chat/completions", 500, ("server_error", None), None),
        ("/v1/chat/completions", 503, ("server_error", None), None),
        ("/v1/messages", 400, ("invalid_request_error", None), None),
        ("/v1/messages", 401, ("authentication_error", None), None),
        ("/v1/messages", 402, ("billing_error", None), None),
        ("/v1/messages", 429, ("rate_limit_error", None), "1"),
        ("/v1/messages", 500, ("api_error", None), None),
        ("/v1/messages", 504, ("timeout_error", None), None),
        ("/v1/messages", 529, ("overloaded_error", None), "1"),
    ],
)
async def test_error_bodies_match_the_real_formats(
    mock: Mock, path: str, status: int, expected: tuple[str, str | None], retry_after: str | None
) -> None:
    ex = await mock.post(path, {"model": "m", "messages": [], "max_tokens": 5}, {"x-mock-status": str(status)})
    assert ex.response.status_code == status and ex.log["status"] == status and ex.log["usage"] is None
    assert ex.response.headers.get("retry-after") == retry_after
    body = ex.json()
    if path == "/v1/chat/completions":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["type"], body["error"]["code"]) == expected
    else:
        assert set(body) == {"type", "error", "request_id"} and body["type"] == "error"
        assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == expected[0]
        assert body["request_id"] == ex.response.headers["request-id"]


@pytest.mark.parametrize(
    ("path", "header", "value"),
    [
        ("/v1/chat/completions", "x-mock-content", "text,poem"),
        ("/v1/messages", "x-mock-content", "image"),
        ("/v1/messages", "x-mock-cache-ttl", "2h"),
        ("/v1/messages", "x-mock-delta-usage", "some"),
    ],
)
async def test_unknown_steering_is_a_loud_400(mock: Mock, path: str, header: str, value: str) -> None:
    ex = await mock.post(path, {"model": "m", "messages": [], "max_tokens": 5}, {header: value})
    assert ex.response.status_code == 400
    assert header in str(ex.json()["error"]["message"])


@pytest.mark.parametrize(
    ("path", "body", "headers", "sent", "expected_error", "usage"),
    [
        (
            "/v1/messages",
            {"max_tokens": 50},
            {"x-mock-stream-error": "overloaded_error", "x-mock-stream-error-after": "4"},
            4,
            ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            {**ant_usage(3, 8), "output_tokens": 1},
        ),
        (
            "/v1/chat/completions",
            {"stream_options": {"include_usage": True}},
            {"x-mock-stream-error": "server_error", "x-mock-stream-error-after": "3"},
            3,
            (
                None,
                {
                    "error": {
                        "message": "The server had an error while processing your request. Sorry about that!",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
            ),
            None,
        ),
    ],
)
async def test_mid_stream_errors(
    mock: Mock,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    sent: int,
    expected_error: tuple[str | None, dict[str, Any]],
    usage: dict[str, Any] | None,
) -> None:
    ex = await mock.post(path, {"model": "m", "messages": MESSAGES, "stream": True, **body}, headers)
    assert ex.response.status_code == 200
    events = parse_sse(ex.response.content)
    assert len(events) == sent + 1
    name, data = events[-1]
    assert (name, orjson.loads(data)) == expected_error
    assert ex.log["usage"] == usage, "only what went out before the error is logged"


async def test_a_broken_stream_logs_only_the_usage_that_went_out(mock: Mock) -> None:
    tag = uuid.uuid4().hex
    body = {"model": "m", "max_tokens": 50, "messages": MESSAGES, "stream": True}
    with pytest.raises(httpx.HTTPError):
        await mock.http.post("/v1/messages", json=body, headers={"x-mock-tag": tag, "x-mock-fail-after": "2"})
    log = await mock.log(tag)
    assert len(log["events_sent_at"]) == 2
    assert log["usage"] == {**ant_usage(3, 8), "output_tokens": 1}


async def test_count_tokens_honours_the_input_override(mock: Mock) -> None:
    ex = await mock.post("/v1/messages/count_tokens", {"model": "m", "messages": MESSAGES})
    assert ex.json() == {"input_tokens": 3}
    ex = await mock.post(
        "/v1/messages/count_tokens", {"model": "m", "messages": MESSAGES}, {"x-mock-input-tokens": "9"}
    )
    assert ex.json() == {"input_tokens": 9}


# -- the official SDKs read it -------------------------------------------------------------------


def _oai(mock: Mock, tag: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{mock.url}/v1", api_key="k", max_retries=0, default_headers={"x-mock-tag": tag, **headers}
    )


def _claude(mock: Mock, tag: str, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=mock.url, api_key="k", max_retries=0, default_headers={"x-mock-tag": tag, **headers}
    )


SDK_OAI_HEADERS = [
    {"x-mock-reasoning-tokens": "5", "x-mock-cached-tokens": "2"},
    {"x-mock-content": "text,tool", "x-mock-output-tokens": "2", "x-mock-crlf": "1"},
    {"x-mock-content": "tool,tool", "x-mock-split": "7"},
]


@pytest.mark.parametrize("headers", SDK_OAI_HEADERS, ids=lambda h: h.get("x-mock-content", "text"))
async def test_openai_sdk_reads_json_and_streams(mock: Mock, headers: dict[str, str]) -> None:
    tag = uuid.uuid4().hex
    client = _oai(mock, tag, **headers)
    tools: Any = [TOOLS[0]]
    done = await client.chat.completions.create(model="gpt-test", messages=OAI_MESSAGES, tools=tools)
    assert done.usage is not None
    async with client.chat.completions.stream(
        model="gpt-test",
        messages=OAI_MESSAGES,
        tools=tools,
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    raw = await client.chat.completions.create(model="gpt-test", messages=OAI_MESSAGES, tools=tools, stream=True)
    chunks = [c async for c in raw]
    json_log, stream_log, bare_log = (await mock.http.get("/_mock/requests", params={"tag": tag})).json()
    assert done.usage.to_dict() == json_log["usage"]
    assert final.usage is not None and final.usage.to_dict() == stream_log["usage"] == json_log["usage"]
    assert bare_log["usage"] is None and all(c.usage is None for c in chunks)
    details = (final.usage.prompt_tokens_details, final.usage.completion_tokens_details)
    assert details[0] is not None and details[0].cached_tokens == int(headers.get("x-mock-cached-tokens", "0"))
    assert details[1] is not None and details[1].reasoning_tokens == int(headers.get("x-mock-reasoning-tokens", "0"))
    assert final.choices[0].finish_reason == done.choices[0].finish_reason
    assert final.choices[0].message.content == done.choices[0].message.content
    want = [(t.function.name, t.function.arguments) for t in done.choices[0].message.tool_calls or []]  # type: ignore[union-attr]
    got = [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls or []]
    assert got == want
    if "tool" in headers.get("x-mock-content", ""):
        assert want and all(args == WEATHER_ARGS for _, args in want)


SDK_ANT_HEADERS = [
    {"x-mock-cache-creation-tokens": "100", "x-mock-cache-read-tokens": "50", "x-mock-cache-ttl": "1h"},
    {"x-mock-content": "thinking,text,tool", "x-mock-crlf": "1", "x-mock-split": "5"},
    {"x-mock-content": "text,tool", "x-mock-delta-usage": "output", "x-mock-cache-read-tokens": "9"},
]


@pytest.mark.parametrize("headers", SDK_ANT_HEADERS, ids=lambda h: h.get("x-mock-content", "text"))
async def test_anthropic_sdk_reads_json_and_streams(mock: Mock, headers: dict[str, str]) -> None:
    tag = uuid.uuid4().hex
    client = _claude(mock, tag, **headers)
    tools: Any = [{"name": "lookup", "input_schema": {"type": "object"}}]
    done = await client.messages.create(model="claude-test", max_tokens=100, messages=ANT_MESSAGES, tools=tools)
    async with client.messages.stream(
        model="claude-test", max_tokens=100, messages=ANT_MESSAGES, tools=tools
    ) as stream:
        final = await stream.get_final_message()
    json_log, stream_log = (await mock.http.get("/_mock/requests", params={"tag": tag})).json()
    assert done.usage.to_dict() == json_log["usage"]
    assert final.usage.to_dict() == stream_log["usage"] == json_log["usage"]
    assert final.usage.cache_read_input_tokens == int(headers.get("x-mock-cache-read-tokens", "0"))
    assert final.usage.cache_creation_input_tokens == int(headers.get("x-mock-cache-creation-tokens", "0"))
    assert final.stop_reason == done.stop_reason
    no_ids = [{k: v for k, v in b.to_dict().items() if k != "id"} for b in final.content]
    assert no_ids == [{k: v for k, v in b.to_dict().items() if k != "id"} for b in done.content]
    kinds = [b.type for b in final.content]
    assert kinds == [
        {"text": "text", "thinking": "thinking", "tool": "tool_use"}[k]
        for k in headers.get("x-mock-content", "text").split(",")
    ]


async def test_sdks_raise_the_mid_stream_errors(mock: Mock) -> None:
    claude = _claude(mock, "e", **{"x-mock-stream-error": "overloaded_error"})
    with pytest.raises(anthropic.APIStatusError) as ant_err:
        async with claude.messages.stream(model="c", max_tokens=50, messages=ANT_MESSAGES) as stream:
            await stream.get_final_message()
    assert isinstance(ant_err.value.body, dict) and ant_err.value.body["error"]["type"] == "overloaded_error"
    oai = _oai(mock, "e", **{"x-mock-stream-error": "server_error"})
    with pytest.raises(openai.APIError) as oai_err:
        async for _ in await oai.chat.completions.create(model="g", messages=OAI_MESSAGES, stream=True):
            pass
    assert isinstance(oai_err.value.body, dict) and oai_err.value.body["type"] == "server_error"
