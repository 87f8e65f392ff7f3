"""The SSE parser against byte streams split at every offset (Envoy hands us arbitrary ranges)."""

from __future__ import annotations

import pytest

from extproc.sse import SSEError, SSEEvent, SSEParser, encode_event


def parse_all(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        events += parser.feed(stream[prev:cut])
        prev = cut
    return events + parser.flush()


def summary(events: list[SSEEvent]) -> list[tuple[str, str | None]]:
    return [(e.type, e.data) for e in events]


CASES = [
    pytest.param(b"data: hello\n\n", [("message", "hello")], id="lf"),
    pytest.param(b"data: hello\r\n\r\n", [("message", "hello")], id="crlf"),
    pytest.param(b"data: hello\r\r", [("message", "hello")], id="cr"),
    pytest.param(b"data: a\ndata: b\n\n", [("message", "a\nb")], id="multi-line-data"),
    pytest.param(b"event: ping\ndata: {}\n\n", [("ping", "{}")], id="event-name"),
    pytest.param(b": keep-alive\n\ndata: x\n\n", [("message", None), ("message", "x")], id="comment-block"),
    pytest.param(b"data:nospace\n\n", [("message", "nospace")], id="no-space-after-colon"),
    pytest.param(b"data:  two\n\n", [("message", " two")], id="only-one-space-stripped"),
    pytest.param(b"data\n\n", [("message", "")], id="field-without-colon"),
    pytest.param(b"data: \xc3\xa9t\xc3\xa9\n\n", [("message", "été")], id="utf8"),
    pytest.param(b"data: last-without-blank-line", [("message", "last-without-blank-line")], id="unterminated-final"),
    pytest.param(
        b'event: message_start\r\ndata: {"a":1}\r\n\r\nevent: ping\r\ndata: {}\r\n\r\ndata: [DONE]\r\n\r\n',
        [("message_start", '{"a":1}'), ("ping", "{}"), ("message", "[DONE]")],
        id="several-crlf",
    ),
    pytest.param(b"id: 7\nretry: 100\ndata: x\n\n", [("message", "x")], id="id-and-retry"),
]


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_every_single_split(stream: bytes, expected: list[tuple[str, str | None]]) -> None:
    assert summary(parse_all(stream, [])) == expected
    for cut in range(1, len(stream)):
        assert summary(parse_all(stream, [cut])) == expected, f"split at byte {cut}"


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_byte_by_byte(stream: bytes, expected: list[tuple[str, str | None]]) -> None:
    assert summary(parse_all(stream, list(range(1, len(stream))))) == expected


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_every_pair_of_splits(stream: bytes, expected: list[tuple[str, str | None]]) -> None:
    n = len(stream)
    for a in range(1, n):
        for b in range(a, n, 3):
            assert summary(parse_all(stream, [a, b])) == expected, f"splits at {a},{b}"


def test_raw_bytes_reassemble_the_stream_exactly() -> None:
    stream = b"event: a\r\ndata: 1\r\n\r\n: comment\n\ndata: 2\n\ndata: tail"
    for cut in range(1, len(stream)):
        events = parse_all(stream, [cut])
        assert b"".join(e.raw for e in events) == stream


def test_pending_holds_incomplete_event_only() -> None:
    p = SSEParser()
    assert p.feed(b"data: one\n\ndata: tw") == [SSEEvent(data="one", raw=b"data: one\n\n")]
    assert p.pending == b"data: tw"
    # CR at the end of a chunk is held: it may be the start of CRLF.
    assert p.feed(b"o\r") == []
    [ev] = p.feed(b"\n\r\n")
    assert ev.data == "two" and ev.raw == b"data: two\r\n\r\n"


def test_comments_are_kept() -> None:
    [ev] = parse_all(b": hello\n: world\ndata: x\n\n", [])
    assert ev.comments == ["hello", "world"]


def test_oversized_event_is_refused() -> None:
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 100)


def test_encode_event_round_trips() -> None:
    raw = encode_event("line1\nline2", "delta")
    [ev] = parse_all(raw, [])
    assert (ev.type, ev.data) == ("delta", "line1\nline2")
