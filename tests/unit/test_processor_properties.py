"""Property-based tests of the processor: whole ext_proc exchanges through the real default pipeline.

Each example plays Envoy's side of one stream (request headers, optional request body, response
headers, response body chunks) against a fresh Processor, with the default stages over an in-memory
key store holding valid, limited, expired and revoked keys (strategies and driver:
_extproc_strategies.py). The properties:

1. nothing escapes handle() or finish(), whatever the messages carry; and (1b, 1c) client input that
   Envoy can deliver never ends in the catch-all 500;
2. every reply is a valid ext_proc reply for the phase it answers, and stays so when a stage refuses
   or crashes;
3. nothing of one exchange leaks into the next through the shared stage objects;
4. finish() runs exactly once per exchange however it ends;
5. error bodies never echo more than a short prefix of a long client value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from extproc.pipeline import Pipeline
from extproc.processor import serve_stream
from extproc.wire import external_processor_pb2 as ep
from extproc.wire import processing_mode_pb2 as pm
from tests.unit._extproc_strategies import (
    BODY_KINDS,
    FULL_KEY,
    HOOKS,
    LONG_LOCATIONS,
    PROBE_HEADER,
    Exchange,
    Fault,
    FinishRecorder,
    Header,
    Probe,
    Step,
    default_pipeline,
    drive,
    envoy_messages,
    exchanges,
    hostile_bodies,
    long_value_cases,
    with_body,
    with_fault,
)

T = TypeVar("T")


# The interpreter's default: what the server runs with. Hypothesis raises the limit by ~2000 while a
# test runs, which would hide stack exhaustion (e.g. in JSON parsing) that a production request hits.
SERVER_RECURSION_LIMIT = 1000
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proptest-exchange")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an exchange as the server would: on a fresh, shallow stack (a worker thread, as a gRPC
    handler has) under the default recursion limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(SERVER_RECURSION_LIMIT)
    try:
        return _worker.submit(asyncio.run, coro).result()
    finally:
        sys.setrecursionlimit(limit)


def props(max_examples: int, shrink: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Example budgets keep the whole file well under 20 s on two cores; PROPTEST_SCALE=10 runs ten
    times as many. The broad tests (whole random exchanges) do not shrink unless PROPTEST_SHRINK=1:
    shrinking their large examples costs seconds per failure, and the targeted tests report minimal
    examples. No example database, so the tree stays clean: a failure prints its
    @reproduce_failure blob instead."""
    phases = [Phase.explicit, Phase.generate, Phase.target]  # no explain phase: it costs seconds
    if shrink or os.environ.get("PROPTEST_SHRINK") == "1":
        phases.append(Phase.shrink)
    return settings(
        max_examples=max_examples * int(os.environ.get("PROPTEST_SCALE", "1")),
        deadline=None,
        database=None,
        print_blob=True,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(autouse=True, scope="module")
def _quiet_gateway_logs() -> Iterator[None]:
    """Thousands of refusals and injected crashes: formatting their log lines (tracebacks included)
    would dominate the run time."""
    logger = logging.getLogger("extproc")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def immediate(step: Step) -> ep.ImmediateResponse | None:
    if step.reply is not None and step.reply.WhichOneof("response") == "immediate_response":
        return step.reply.immediate_response
    return None


def header_map(mutation: ep.HeaderMutation) -> dict[str, bytes]:
    return {o.header.key: o.header.raw_value for o in mutation.set_headers}


# -- 1. nothing escapes ---------------------------------------------------------------------------


@props(60, shrink=False)
@given(ex=exchanges(wild=True), stop_after=st.none() | st.integers(0, 6))
def test_no_exception_escapes_handle_or_finish(ex: Exchange, stop_after: int | None) -> None:
    """Arbitrary header names and bytes, missing or repeated pseudo-headers, any :path and :method,
    any body and response stream, the client gone after `stop_after` messages: handle() always
    answers a phase message with a reply whose oneof is set, and neither it nor finish() raises."""

    async def main() -> None:
        steps = await drive(await default_pipeline(Probe()), ex, stop_after)  # raises if handle/finish does
        for step in steps:
            assert step.reply is not None, f"no reply to {step.phase}"
            assert step.reply.WhichOneof("response") is not None, f"empty reply to {step.phase}"

    run(main())


async def _no_catch_all_500(ex: Exchange) -> None:
    for step in await drive(await default_pipeline(Probe()), ex):
        ir = immediate(step)
        assert ir is None or ir.status.code != 500, f"catch-all 500 on {step.phase}: {ir.body[:300]!r}"


@props(50, shrink=False)
@given(ex=exchanges())
def test_client_input_never_reaches_the_catch_all_500(ex: Exchange) -> None:
    """The processor turns any stage exception into a 500 `gateway_error`: for input Envoy can
    deliver, that answer means a stage crashed on it (the client deserves a 4xx, or success)."""
    run(_no_catch_all_500(ex))


@pytest.mark.parametrize("kind", sorted(BODY_KINDS))
@props(15)
@given(data=st.data())
def test_request_bodies_never_reach_the_catch_all_500(kind: str, data: st.DataObject) -> None:
    """1c: the same for the body of an otherwise routable request (random bytes, JSON of any shape,
    wrong types, duplicate keys, huge strings, deep nesting, broken UTF-8), one kind of body at a time."""
    ex = data.draw(exchanges(well_formed=True, hostile="as is"), "exchange")
    body = data.draw(hostile_bodies(kind, b"".join(ex.body or ())), "body")
    run(_no_catch_all_500(with_body(ex, body)))


# -- 2. every reply is a valid ext_proc reply ----------------------------------------------------

ALLOWED_REPLIES = {
    "request_headers": {"request_headers", "immediate_response"},
    "request_body": {"request_body", "immediate_response"},
    "response_headers": {"response_headers", "immediate_response"},
    # Streamed response headers already went to the client: an immediate response can only reset it.
    "response_body": {"response_body"},
}


def _check_mutation(mutation: ep.HeaderMutation, where: str) -> None:
    for opt in mutation.set_headers:
        key, raw = opt.header.key, opt.header.raw_value
        assert key, f"{where}: set_headers entry with an empty key"
        assert key == key.lower(), f"{where}: header key {key[:80]!r} is not lowercase"
        assert opt.header.value == "", f"{where}: {key} uses `value`; Envoy 1.40 reads raw_value"
        bad = [c for c in (b"\r", b"\n", b"\0") if c in raw]
        assert not bad, f"{where}: header {key} carries {bad} in {raw[:120]!r}"
    for name in mutation.remove_headers:
        assert name, f"{where}: remove_headers entry is empty"
        assert name == name.lower(), f"{where}: removed header {name[:80]!r} is not lowercase"


def _check_immediate(ir: ep.ImmediateResponse, where: str) -> None:
    status = ir.status.code
    assert 200 <= status <= 599, f"{where}: immediate status {status}"
    hdrs = header_map(ir.headers)
    assert hdrs.get("content-type"), f"{where}: immediate response without content-type: {sorted(hdrs)}"
    if status >= 400:
        try:
            payload = orjson.loads(ir.body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"{where}: error body is not JSON: {ir.body[:200]!r}") from None
        assert isinstance(payload, dict), f"{where}: error body is not an object: {ir.body[:200]!r}"
        assert isinstance(payload.get("error"), dict), f"{where}: error body has no error object: {ir.body[:200]!r}"


def check_trace(steps: list[Step]) -> None:
    for i, step in enumerate(steps):
        where = f"reply {i} (to {step.phase})"
        reply = step.reply
        assert reply is not None, f"{where}: None"
        kind = reply.WhichOneof("response")
        assert kind in ALLOWED_REPLIES[step.phase], f"{where}: {kind} does not answer {step.phase}"
        if kind == "immediate_response":
            _check_immediate(reply.immediate_response, where)
            _check_mutation(reply.immediate_response.headers, where)
            assert step.done_after, f"{where}: immediate response but the processor is not done"
        else:
            common = getattr(reply, kind).response
            _check_mutation(common.header_mutation, where)
        if reply.mode_override.response_body_mode == pm.ProcessingMode.STREAMED:
            assert step.phase == "response_headers", f"{where}: STREAMED override outside response headers"
            assert not step.done_after, f"{where}: asks for the response body, then ends the stream"
        ends = step.done_after or kind == "immediate_response"
        assert not ends or i == len(steps) - 1, f"{where}: the exchange went on after it ended"


@props(70, shrink=False)
@given(ex=exchanges())
def test_every_reply_is_a_valid_ext_proc_reply(ex: Exchange) -> None:
    """Each reply answers its phase, immediate responses are well-formed errors (or direct answers),
    header mutations are ones Envoy accepts, and the processor's `done` agrees with what it sent."""
    run(_drive_and_check(ex))


async def _drive_and_check(ex: Exchange) -> None:
    check_trace(await drive(await default_pipeline(Probe(), Fault()), ex))


@pytest.mark.parametrize("kind", ["gateway", "crash"])
@pytest.mark.parametrize("hook", HOOKS)
@props(6)
@given(ex=exchanges(well_formed=True, hostile="as is"))
def test_replies_stay_valid_when_a_stage_refuses_or_crashes(hook: str, kind: str, ex: Exchange) -> None:
    """A stage failing in `hook` with a GatewayError (`gateway`) or any other exception (`crash`)."""
    run(_drive_and_check(with_fault(ex, hook, kind)))


# -- 3. no state leaks across requests -----------------------------------------------------------


def normalized(steps: list[Step]) -> list[tuple[str, bool, bytes]]:
    """The replies, minus the request id (a gateway may mint one per request)."""
    out = []
    for step in steps:
        reply = ep.ProcessingResponse()
        if step.reply is not None:
            reply.CopyFrom(step.reply)
            kind = reply.WhichOneof("response")
            if kind == "immediate_response":
                mutation = reply.immediate_response.headers
            elif kind in ("request_headers", "request_body", "response_headers", "response_body"):
                mutation = getattr(reply, kind).response.header_mutation
            else:
                mutation = None
            if mutation is not None:
                kept = [o for o in mutation.set_headers if o.header.key not in ("x-request-id", "x-gateway-request-id")]
                del mutation.set_headers[:]
                mutation.set_headers.extend(kept)
            if "gateway" in reply.dynamic_metadata.fields:
                reply.dynamic_metadata.fields["gateway"].struct_value.fields.pop("request_id", None)
        out.append((step.phase, step.done_after, reply.SerializeToString(deterministic=True)))
    return out


def footprint(root: object, path: str, out: dict[str, int], seen: set[int], depth: int = 0) -> None:
    """Sizes of the containers reachable from a stage (lengths; str/bytes by hash, as a stage keeping
    the last request's value is a leak too), skipping attributes named like caches."""
    if id(root) in seen or depth > 6 or root is None or isinstance(root, (int, float, bool)):
        return
    seen.add(id(root))
    if isinstance(root, (str, bytes)):
        out[path] = hash(root)
        return
    if isinstance(root, Mapping):
        out[path + ".len"] = len(root)
        for k, v in list(root.items())[:64]:
            footprint(v, f"{path}[{k!r:.40}]", out, seen, depth + 1)
        return
    if isinstance(root, (list, tuple, set, frozenset, deque)):
        out[path + ".len"] = len(root)
        for i, v in enumerate(list(root)[:64]):
            footprint(v, f"{path}[{i}]", out, seen, depth + 1)
        return
    if not type(root).__module__.startswith(("extproc", "tests")):
        return
    attrs: dict[str, object] = dict(getattr(root, "__dict__", {}))
    for cls in type(root).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(root, name):
                attrs[name] = getattr(root, name)
    for name, value in attrs.items():
        if "cache" not in name.lower():
            footprint(value, f"{path}.{name}", out, seen, depth + 1)


def stage_footprint(pipeline: Pipeline) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[int] = set()
    for i, stage in enumerate(pipeline.stages):
        if not isinstance(stage, Probe):  # test instrumentation, counts on purpose
            footprint(stage, f"{i}:{stage.name}", out, seen)
    return out


def _hdr(key: str, value: str) -> Header:
    return Header(key, value.encode())


REFERENCE = Exchange(
    headers=(
        _hdr(":method", "POST"),
        _hdr(":path", "/v1/chat/completions"),
        _hdr("authorization", "Bearer " + FULL_KEY),
        _hdr("content-type", "application/json"),
        _hdr(PROBE_HEADER, "hbe"),
        _hdr("x-request-id", "ref-1"),
    ),
    body=(b'{"model":"fast","stream":true,"messages":[{"role":"user","content":"hi"}]}',),
    response_headers=(_hdr(":status", "200"), _hdr("content-type", "text/event-stream")),
    response_eos=False,
    response_body=(b'data: {"choices":[]}\n\nda', b"ta: [DONE]\n\n"),
)


@props(20, shrink=False)
@given(
    before=st.lists(st.tuples(exchanges(wild=True), st.none() | st.integers(0, 6)), min_size=1, max_size=3),
    after=exchanges(),
)
def test_no_state_leaks_across_requests(before: list[tuple[Exchange, int | None]], after: Exchange) -> None:
    """Exchange `after` gets the same replies on a fresh gateway as after arbitrary exchanges (some cut
    short) on a shared one, and the stage objects' non-cache state is the same before and after.
    The gateway allows one stream at a time, so a leaked stream or body reservation shows as a 503."""

    async def main() -> None:
        alone = normalized(await drive(await default_pipeline(Probe()), after))
        shared = await default_pipeline(Probe())
        await drive(shared, REFERENCE)  # warm up whatever is built lazily
        start = stage_footprint(shared)
        for ex, stop_after in before:
            # An exception escaping here is property 1's finding; this test is about what stays behind.
            with contextlib.suppress(Exception):
                await drive(shared, ex, stop_after)
        assert normalized(await drive(shared, after)) == alone, "the replies depend on earlier exchanges"
        end = stage_footprint(shared)
        grown = {k: (start[k], end[k]) for k in start.keys() & end.keys() if start[k] != end[k]}
        assert not grown, f"stage state changed across requests (path: (before, after)): {grown}"

    run(main())


# -- 4. finish() exactly once ---------------------------------------------------------------------


class StreamBroken(Exception):
    """The gRPC stream failed under the server (connection reset, deadline)."""


class FakeStream:
    """The part of grpc.aio.ServicerContext that serve_stream uses, ending the way the test says:
    complete, EOF early (Envoy closed the stream), a failing read or write, or cancelled while the
    server waits for the next message (the client went away)."""

    def __init__(self, messages: list[ep.ProcessingRequest], ending: str, at: int) -> None:
        self.messages, self.ending, self.at = messages, ending, at
        self.reads = 0
        self.written: list[ep.ProcessingResponse] = []
        self.blocked = asyncio.Event()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)

    async def read(self) -> object:
        n, self.reads = self.reads, self.reads + 1
        if n == self.at and self.ending == "eof":
            return grpc.aio.EOF
        if n == self.at and self.ending == "read-error":
            raise StreamBroken
        if n == self.at and self.ending == "cancel":
            self.blocked.set()
            await asyncio.Event().wait()
        return self.messages[n] if n < len(self.messages) else grpc.aio.EOF

    async def write(self, resp: ep.ProcessingResponse) -> None:
        if self.ending == "write-error" and len(self.written) == self.at:
            raise StreamBroken
        self.written.append(resp)


ENDINGS = st.one_of(
    st.just(("complete", -1)),
    st.tuples(st.sampled_from(["eof", "read-error", "write-error", "cancel"]), st.sampled_from(range(8))),
)


FAULTS = [("", "none")] + [(hook, kind) for kind in ("gateway", "crash", "cancel") for hook in HOOKS]


@pytest.mark.parametrize(("hook", "kind"), FAULTS, ids=[f"{h}:{k}" if h else k for h, k in FAULTS])
@props(4)
@given(ex=exchanges(well_formed=True), ending=ENDINGS)
def test_finish_runs_exactly_once(hook: str, kind: str, ex: Exchange, ending: tuple[str, int]) -> None:
    """However the stream ends (completed, refused, EOF, broken read or write, cancelled) and
    whichever hook of some stage fails how (`kind`: GatewayError, other exception, CancelledError),
    every stage's finish() runs once."""

    async def gateway() -> tuple[Pipeline, list[FinishRecorder]]:
        first, last = FinishRecorder(), FinishRecorder()
        # The fault stage runs first, so a finish() that fails comes before every real stage's.
        return await default_pipeline(Probe(), last, before=[Fault(), first]), [first, last]

    async def main() -> None:
        pipeline, recorders = await gateway()
        stream = FakeStream(envoy_messages(with_fault(ex, hook, kind)), *ending)
        task = asyncio.create_task(serve_stream(pipeline, cast(Any, stream)))
        blocked = asyncio.create_task(stream.blocked.wait())
        await asyncio.wait({task, blocked}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
        blocked.cancel()
        with contextlib.suppress(asyncio.CancelledError, StreamBroken):
            await task
        counts = [r.calls for r in recorders]
        probes = [s for s in pipeline.stages if isinstance(s, Probe)]
        counts.append(probes[0].finished)
        assert counts == [1, 1, 1], f"finish() calls (first stage, probe, last stage): {counts}"
        # What the stages hold per request came back: the same request is served as on a fresh gateway.
        fresh, _ = await gateway()
        expected = normalized(await drive(fresh, REFERENCE))
        assert normalized(await drive(pipeline, REFERENCE)) == expected, "the exchange left state behind"

    run(main())


# -- 5. no long echoes ----------------------------------------------------------------------------

ECHO_WINDOW = 200


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def echoed(value: str, body: bytes) -> str | None:
    """A ECHO_WINDOW-character substring of `value` found in `body` (raw or JSON-decoded), if any."""
    texts = [body.decode("utf-8", "replace"), body.decode("latin-1")]
    with contextlib.suppress(orjson.JSONDecodeError):
        texts += _strings(orjson.loads(body))
    half = ECHO_WINDOW // 2
    for text in texts:
        # Any window of `value` contains one of its aligned half-windows: a cheap filter first.
        if not any(value[i : i + half] in text for i in range(0, len(value) - half + 1, half)):
            continue
        windows = {text[i : i + ECHO_WINDOW] for i in range(len(text) - ECHO_WINDOW + 1)}
        for i in range(len(value) - ECHO_WINDOW + 1):
            if value[i : i + ECHO_WINDOW] in windows:
                return value[i : i + ECHO_WINDOW]
    return None


@pytest.mark.parametrize("location", LONG_LOCATIONS)
@props(8)
@given(data=st.data())
def test_error_bodies_do_not_echo_long_client_values(location: str, data: st.DataObject) -> None:
    """A 200..10,000-character model name, path, method or header: no error body quotes 200
    consecutive characters of it."""
    case = data.draw(long_value_cases(location), "case")

    async def main() -> None:
        for step in await drive(await default_pipeline(Probe()), case.exchange):
            ir = immediate(step)
            if ir is None or ir.status.code < 400:
                continue
            found = echoed(case.value, ir.body)
            assert found is None, (
                f"{ir.status.code} {ir.details} quotes {len(case.value)}-char {case.location} "
                f"({ECHO_WINDOW}+ chars of it): {ir.body[:400]!r}"
            )

    run(main())
