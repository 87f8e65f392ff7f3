"""The response side of the processor, message by message: what stages are shown (whole SSE
events, a JSON body parsed once), what the client gets when they edit (whole events only, nothing
of a held JSON body until it is complete), the onion order, and how an exchange's end is reported."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import orjson
import pytest

from extproc.pipeline import Need, Outcome, Pipeline, RequestContext, ResponseChunk, Stage
from extproc.processor import Processor
from extproc.sse import SSEEvent
from extproc.wire import external_processor_pb2 as ep
from extproc.wire import processing_mode_pb2 as pm
from tests.unit.test_processor import body_msg, headers_msg, pipeline, run, set_headers

STREAM = b'data: {"n":1}\n\nevent: x\ndata: {"n":2}\n\ndata: [DONE]\n\n'


def response_headers(content_type: str, status: str = "200", eos: bool = False) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    for k, v in ((":status", status), ("content-type", content_type), ("content-length", "123")):
        h = req.response_headers.headers.headers.add()
        h.key, h.raw_value = k, v.encode()
    req.response_headers.end_of_stream = eos
    return req


@dataclass
class Seen:
    events: list[str | None] = field(default_factory=list)
    json: list[object] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    outcomes: list[Outcome | None] = field(default_factory=list)


class Watch(Stage):
    """Needs what its constructor says; records what it is shown; optionally edits."""

    def __init__(self, name: str, seen: Seen, needs: Need, edit: str = "") -> None:
        self.label = name
        self.seen = seen
        self.needs = needs
        self.edit = edit

    async def request_body(self, ctx: RequestContext) -> None:
        self.seen.order.append(f"req:{self.label}")
        ctx.need(self.needs)

    async def response_headers(self, ctx: RequestContext) -> None:
        self.seen.order.append(f"resp:{self.label}")

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        if chunk.events is not None:
            self.seen.events += [e.data for e in chunk.events]
            if self.edit == "drop-2":
                kept = [e for e in chunk.events if e.data != '{"n":2}']
                if len(kept) != len(chunk.events):
                    chunk.events[:] = kept
                    chunk.events_changed = True
            elif self.edit == "upper":
                chunk.events[:] = [SSEEvent.make(e.data.upper()) if e.data else e for e in chunk.events]
                chunk.events_changed = True
            elif self.edit == "insert" and chunk.end_of_stream:
                chunk.events.append(SSEEvent.make("tail", "extra"))
                chunk.events_changed = True
        if chunk.end_of_stream and chunk.body is not None:
            self.seen.json.append(chunk.json)
            if self.edit == "json" and isinstance(chunk.json, dict):
                chunk.json["edited"] = True
                chunk.json_changed = True

    async def finish(self, ctx: RequestContext) -> None:
        self.seen.order.append(f"fin:{self.label}")
        self.seen.outcomes.append(ctx.outcome)


async def started(*stages: Stage, stream: bool = True) -> Processor:
    proc = Processor(pipeline(*stages))
    body = b'{"model":"gpt-5.5","stream":true}' if stream else b'{"model":"gpt-5.5"}'
    await run(proc, headers_msg("/v1/chat/completions"), body_msg(body))
    return proc


def delivered(replies: list[ep.ProcessingResponse], sent: list[bytes]) -> bytes:
    """What the client receives: each chunk as Envoy had it, or the body mutation that replaced it."""
    out = b""
    for r, chunk in zip(replies, sent, strict=True):
        common = r.response_body.response
        out += common.body_mutation.body if common.HasField("body_mutation") else chunk
    return out


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def feed(proc: Processor, chunks: list[bytes]) -> list[ep.ProcessingResponse]:
    msgs = [body_msg(c, i == len(chunks) - 1, True) for i, c in enumerate(chunks)]
    return await run(proc, *msgs)


async def test_nothing_needed_ends_after_the_request() -> None:
    proc = await started()
    assert proc.done


async def test_headers_only_ends_after_response_headers() -> None:
    seen = Seen()
    proc = await started(Watch("w", seen, Need.HEADERS))
    assert not proc.done
    [r] = await run(proc, response_headers("text/event-stream"))
    assert not r.HasField("mode_override") and proc.done
    assert (
        set_headers(r.response_headers.response.header_mutation)["x-gateway-request-id"] == proc.ctx.request_id.encode()
    )


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
async def test_read_only_events_pass_byte_for_byte(cut: int) -> None:
    seen = Seen()
    proc = await started(Watch("w", seen, Need.EVENTS))
    [r] = await run(proc, response_headers("text/event-stream"))
    assert r.mode_override.response_body_mode == pm.ProcessingMode.STREAMED
    assert "content-length" in r.response_headers.response.header_mutation.remove_headers
    chunks = pieces(STREAM, [cut])
    replies = await feed(proc, chunks)
    assert all(not x.response_body.response.HasField("body_mutation") for x in replies)
    assert seen.events == ['{"n":1}', '{"n":2}', "[DONE]"]
    assert proc.done


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
@pytest.mark.parametrize("edit", ["drop-2", "upper", "insert"])
async def test_edited_streams_send_only_whole_events(edit: str, cut: int) -> None:
    seen = Seen()
    proc = await started(Watch("w", seen, Need.EVENTS | Need.EDIT, edit))
    await run(proc, response_headers("text/event-stream"))
    chunks = pieces(STREAM, [cut])
    replies = await feed(proc, chunks)
    for r, chunk in zip(replies, chunks, strict=True):
        common = r.response_body.response
        sent = common.body_mutation.body if common.HasField("body_mutation") else chunk
        assert sent == b"" or sent.endswith(b"\n\n"), (cut, sent)
    out = delivered(replies, chunks)
    expected = {
        "drop-2": b'data: {"n":1}\n\ndata: [DONE]\n\n',
        "upper": b'data: {"N":1}\n\ndata: {"N":2}\n\ndata: [DONE]\n\n',
        "insert": STREAM + b"event: extra\ndata: tail\n\n",
    }[edit]
    assert out == expected


async def test_edits_on_some_chunks_and_not_others() -> None:
    seen = Seen()
    proc = await started(Watch("w", seen, Need.EVENTS | Need.EDIT, "drop-2"))
    await run(proc, response_headers("text/event-stream"))
    chunks = [b'data: {"n":1}\n\n', b'event: x\ndata: {"n":2}\n\n', b"data: [DONE]\n\n"]
    replies = await feed(proc, chunks)
    has = [x.response_body.response.HasField("body_mutation") for x in replies]
    # Untouched chunks on event boundaries go as they came; only the edited one is replaced.
    assert has == [False, True, False]
    assert replies[1].response_body.response.body_mutation.body == b""


async def test_end_of_stream_flushes_an_event_without_blank_line() -> None:
    seen = Seen()
    proc = await started(Watch("w", seen, Need.EVENTS | Need.EDIT, "upper"))
    await run(proc, response_headers("text/event-stream"))
    replies = await feed(proc, [b'data: {"n":1}\n\ndata: {"n":', b"3}", b""])
    assert seen.events == ['{"n":1}', '{"n":3}']
    assert delivered(replies, [b'data: {"n":1}\n\ndata: {"n":', b"3}", b""]) == b'data: {"N":1}\n\ndata: {"N":3}\n\n'


async def test_stream_that_is_not_sse_passes_through_whole() -> None:
    """An event larger than the parser's limit: framing stops, the bytes held so far and the rest
    reach the client unedited."""
    seen = Seen()
    proc = await started(Watch("w", seen, Need.EVENTS | Need.EDIT, "upper"))
    await run(proc, response_headers("text/event-stream"))
    assert proc.sse is not None
    proc.sse._max = 64
    chunks = [b'data: {"n":1}\n\ndata: ' + b"x" * 30, b"y" * 60, b"z\n\n"]
    replies = await feed(proc, chunks)
    assert delivered(replies, chunks) == b'data: {"N":1}\n\ndata: ' + b"x" * 30 + b"y" * 60 + b"z\n\n"
    assert proc.sse is None and proc.done


@pytest.mark.parametrize("cut", [0, 5, 17])
async def test_json_body_parsed_once_for_all_stages(cut: int) -> None:
    seen = Seen()
    proc = await started(Watch("a", seen, Need.JSON), Watch("b", seen, Need.JSON | Need.EVENTS), stream=False)
    await run(proc, response_headers("application/json"))
    body = b'{"id":"c1","usage":{"prompt_tokens":3}}'
    replies = await feed(proc, pieces(body, [cut]))
    assert all(not x.response_body.response.HasField("body_mutation") for x in replies)
    assert seen.json == [orjson.loads(body), orjson.loads(body)]
    assert seen.json[0] is seen.json[1]


async def test_edited_json_is_held_until_complete() -> None:
    seen = Seen()
    proc = await started(Watch("a", seen, Need.JSON | Need.EDIT, "json"), stream=False)
    await run(proc, response_headers("application/json"))
    replies = await feed(proc, [b'{"id":', b'"c1"}'])
    assert replies[0].response_body.response.body_mutation.body == b""
    assert orjson.loads(replies[1].response_body.response.body_mutation.body) == {"id": "c1", "edited": True}


async def test_json_that_does_not_parse_is_none() -> None:
    seen = Seen()
    proc = await started(Watch("a", seen, Need.JSON), stream=False)
    await run(proc, response_headers("application/json", "502"))
    await feed(proc, [b"<html>bad gateway"])
    assert seen.json == [None] and proc.ctx.response_status == 502


async def test_onion_order_and_finish_once() -> None:
    seen = Seen()
    proc = await started(Watch("a", seen, Need.HEADERS), Watch("b", seen, Need.HEADERS))
    await run(proc, response_headers("application/json", eos=True))
    await proc.finish()
    await proc.finish()
    assert seen.order == ["req:a", "req:b", "resp:b", "resp:a", "fin:b", "fin:a"]
    assert seen.outcomes == [Outcome.COMPLETED, Outcome.COMPLETED]


@pytest.mark.parametrize(
    ("steps", "outcome"),
    [
        ("refused", Outcome.REFUSED),
        ("direct", Outcome.DIRECT),
        ("request", Outcome.NO_RESPONSE),
        ("headers", Outcome.INCOMPLETE),
        ("complete", Outcome.COMPLETED),
    ],
)
async def test_outcome_seen_by_finish(steps: str, outcome: Outcome) -> None:
    seen = Seen()
    proc = Processor(pipeline(Watch("w", seen, Need.EVENTS)))
    if steps == "refused":
        await run(proc, headers_msg("/v1/chat/completions", authorization="Bearer nope"))
    elif steps == "direct":
        [r] = await run(proc, headers_msg("/v1/models", "GET", eos=True))
        hdrs = set_headers(r.immediate_response.headers)
        assert hdrs["x-gateway-request-id"] == proc.ctx.request_id.encode()
        meta = r.dynamic_metadata.fields["gateway"].struct_value.fields
        assert meta["request_id"].string_value == proc.ctx.request_id
    else:
        await run(proc, headers_msg("/v1/chat/completions"), body_msg(b'{"model":"gpt-5.5","stream":true}'))
        if steps != "request":
            await run(proc, response_headers("text/event-stream"))
        if steps == "complete":
            await feed(proc, [STREAM])
    await proc.finish()
    assert proc.ctx.outcome is outcome
    if outcome is Outcome.REFUSED:
        assert proc.ctx.error is not None and proc.ctx.error.code == "invalid_api_key"


def test_pipeline_orders_response_hooks_in_reverse() -> None:
    seen = Seen()
    a, b = Watch("a", seen, Need.NOTHING), Watch("b", seen, Need.NOTHING)
    p = Pipeline([a, b])
    assert p.on_request_body == (a, b) and p.on_response_body == (b, a) and p.on_finish == (b, a)
