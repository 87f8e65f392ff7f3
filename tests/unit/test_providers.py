"""Provider adapters: usage and errors out of the exact bytes the mock (and the real APIs) send,
with the stream cut at awkward offsets the way Envoy delivers it."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import ErrorKind, GatewayError
from extproc.mock import wire
from extproc.providers import ADAPTERS, Usage
from extproc.routing import Route
from extproc.sse import SSEParser

PIECES = ["Hello", " wor", "ld", " é"]


def feed(schema: str, stream: bytes, cuts: list[int]) -> tuple[Usage | None, bool]:
    reader = ADAPTERS[schema].stream_reader()
    parser = SSEParser()
    prev = 0
    for cut in [*cuts, len(stream)]:
        for ev in parser.feed(stream[prev:cut]):
            reader.on_event(ev)
        prev = cut
    for ev in parser.flush():
        reader.on_event(ev)
    return reader.usage, reader.done


def awkward_cuts(stream: bytes) -> list[list[int]]:
    """Single cuts at every offset near event boundaries and inside multi-byte characters."""
    spots = {
        i for i in range(1, len(stream)) if stream[i - 1 : i + 1] in (b"\n\n", b"\nd", b"\xc3\xa9") or stream[i] == 0x0A
    }
    return [[c] for c in sorted(spots)] + [list(range(7, len(stream), 7))]


def test_openai_stream_usage_when_requested() -> None:
    stream = b"".join(wire.openai_stream("c1", 1, "gpt", PIECES, "stop", prompt=11, include_usage=True))
    for cuts in [[], *awkward_cuts(stream)]:
        usage, done = feed("openai", stream, cuts)
        assert usage == Usage(input_tokens=11, output_tokens=4), cuts
        assert done


def test_openai_stream_without_usage() -> None:
    stream = b"".join(wire.openai_stream("c1", 1, "gpt", PIECES, "stop", prompt=11, include_usage=False))
    assert b'"usage"' not in stream
    assert feed("openai", stream, []) == (None, True)


def test_openai_stream_shape_matches_the_real_api() -> None:
    events = wire.openai_stream("c1", 1, "gpt", ["a"], "stop", prompt=1, include_usage=True)
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 2
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == b"data: [DONE]\n\n"


def test_anthropic_stream_usage_is_cumulative() -> None:
    stream = b"".join(wire.anthropic_stream("m1", "claude", PIECES, "end_turn", prompt=9))
    for cuts in [[], *awkward_cuts(stream)]:
        usage, done = feed("anthropic", stream, cuts)
        assert usage == Usage(input_tokens=9, output_tokens=4), cuts
        assert done
    names = [line.split(b": ")[1] for line in stream.split(b"\n") if line.startswith(b"event:")]
    assert names[:3] == [b"message_start", b"content_block_start", b"ping"]
    assert names[-3:] == [b"content_block_stop", b"message_delta", b"message_stop"]


def test_anthropic_stream_error_event() -> None:
    reader = ADAPTERS["anthropic"].stream_reader()
    parser = SSEParser()
    for ev in parser.feed(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    ):
        reader.on_event(ev)
    assert reader.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not reader.done


def test_json_usage() -> None:
    openai = orjson.loads(wire.openai_completion("c", 1, "m", "hi", "stop", 5, 2))
    assert ADAPTERS["openai"].usage_from_json(openai) == Usage(5, 2)
    anthropic = orjson.loads(wire.anthropic_message("m", "c", "hi", "end_turn", 5, 2))
    assert ADAPTERS["anthropic"].usage_from_json(anthropic) == Usage(5, 2)
    assert ADAPTERS["openai"].usage_from_json({"usage": "garbage"}) is None
    assert ADAPTERS["openai"].usage_from_json({"usage": {"prompt_tokens": -3, "completion_tokens": True}}) == Usage(
        0, 0
    )


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            "openai",
            {
                "error": {
                    "message": "no such model",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        ),
        (
            "anthropic",
            {
                "type": "error",
                "error": {"type": "not_found_error", "message": "no such model", "code": "model_not_found"},
            },
        ),
    ],
)
def test_error_bodies(schema: str, expected: object) -> None:
    err = GatewayError(ErrorKind.NOT_FOUND, "no such model", "model_not_found", "model")
    assert orjson.loads(ADAPTERS[schema].error_body(err)) == expected


def test_model_of_rejects_missing_and_non_strings() -> None:
    adapter = ADAPTERS["openai"]
    assert adapter.model_of({"model": "x"}) == "x"
    for body in ({}, {"model": None}, {"model": 3}, {"model": ""}, {"model": ["x"]}):
        with pytest.raises(GatewayError) as err:
            adapter.model_of(body)
        assert err.value.status == 400


def test_models_bodies() -> None:
    routes = (Route("a", "openai", "openai", "a"), Route("b", "anthropic", "anthropic", "b2"))
    assert [m["id"] for m in orjson.loads(ADAPTERS["openai"].models_body(routes))["data"]] == ["a", "b"]
    anth = orjson.loads(ADAPTERS["anthropic"].models_body(routes))
    assert (anth["first_id"], anth["last_id"], anth["has_more"]) == ("a", "b", False)
