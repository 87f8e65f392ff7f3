"""One ext_proc stream = one HTTP exchange: walk its phases through the pipeline.

The processor owns the protocol (which reply answers which message, when the stream can end); the
stages own the policy. It ends its side of the stream as soon as no stage needs the rest of the
exchange, so Envoy stops sending messages for it: most requests cost two round trips (request
headers + buffered body), not four or more.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc
import orjson
from google.protobuf import text_format

from . import replies
from .errors import ErrorKind, GatewayError
from .pipeline import Need, Outcome, Pipeline, RequestContext, ResponseChunk, Stage, has_lossy_integers
from .providers import ADAPTERS, ENDPOINTS, client_adapter
from .sse import SSEError, SSEParser
from .stages.targets import REFUSED_HEADER
from .wire import core_pb2
from .wire import external_processor_pb2 as ep

log = logging.getLogger("extproc.processor")

_OPENAI = ADAPTERS["openai"]
# A non-SSE response larger than this is passed through unparsed (no stage sees its JSON).
MAX_JSON_RESPONSE_BYTES = 16 * 1024 * 1024
# finish() calls still running after their stream was cancelled (kept so they are not collected).
_FINISHING: set[asyncio.Task[None]] = set()


def _headers_of(msg: ep.HttpHeaders, ctx: RequestContext | None = None) -> dict[str, str]:
    """Headers by name (repeats joined with ','); with `ctx`, also records the request's header
    count and size as the client sent them, for the header limits."""
    out: dict[str, str] = {}
    size = 0
    for h in msg.headers.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        key = h.key
        size += len(key) + len(value)
        out[key] = f"{out[key]},{value}" if key in out else value
    if ctx is not None:
        ctx.header_count = len(msg.headers.headers)
        ctx.header_bytes = size
    return out


def _rewritten_body(ctx: RequestContext) -> bytes:
    """The edited request body (`ctx.json`) serialized, refusing what re-serializing would change:
    integers beyond 64 bits (orjson reads them as floats) and nesting orjson cannot write."""
    if ctx.body is not None and has_lossy_integers(ctx.body):
        raise GatewayError(
            ErrorKind.INVALID_REQUEST,
            "Request body has an integer beyond 64 bits; the gateway cannot forward it unchanged.",
            "invalid_json",
        )
    body = ctx.json
    ctx.body = None  # the raw bytes are not needed any more: do not hold both copies
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson writes at most 254 levels of nesting (it reads 1,024)
        raise GatewayError(ErrorKind.INVALID_REQUEST, "Request body is nested too deeply.", "invalid_json") from None


def _take_request_headers(ctx: RequestContext, msg: ep.HttpHeaders) -> None:
    """Method, path (and query), the client's schema and endpoint from the path, and the headers."""
    headers = _headers_of(msg, ctx)
    ctx.method = headers.pop(":method", "")
    ctx.path, _, ctx.query = headers.pop(":path", "").partition("?")
    found = ENDPOINTS.get(ctx.path)
    if found is not None:
        ctx.adapter, ctx.endpoint = found
    else:
        ctx.adapter = client_adapter(headers)
    ctx.headers = headers


class Processor:
    __slots__ = ("body", "body_size", "ctx", "done", "edit", "finished", "pipeline", "sse", "withheld")

    def __init__(self, pipeline: Pipeline, traceparent: str | None = None) -> None:
        self.pipeline = pipeline
        self.ctx = RequestContext()
        self.ctx.traceparent = traceparent
        self.done = False
        self.finished = False
        self.sse: SSEParser | None = None
        # Need.EDIT for this response; whether the last reply held back part of an event.
        self.edit = False
        self.withheld = False
        # Chunks of a non-SSE body being collected for Need.JSON.
        self.body: list[bytes] | None = None
        self.body_size = 0

    async def handle(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return await self._request_headers(req.request_headers)
            if kind == "request_body":
                return await self._request_body(req.request_body)
            if kind == "response_headers":
                return await self._response_headers(req.response_headers)
            if kind == "response_body":
                return await self._response_body(req.response_body)
        except GatewayError as err:
            return self._error(err)
        except Exception as exc:
            # The exception text may quote the prompt: log its type and place, the traceback only at debug.
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            log.error("stage failed on %s (request %s): %s at %s", kind, self.ctx.request_id, type(exc).__name__, where)
            log.debug("stage failure", exc_info=True)
            return self._error(
                GatewayError(ErrorKind.INTERNAL, "The gateway failed to process this request.", "gateway_error")
            )
        resp = ep.ProcessingResponse()
        if kind == "request_trailers":
            resp.request_trailers.SetInParent()
        elif kind == "response_trailers":
            resp.response_trailers.SetInParent()
            self.done = True
        else:
            return None  # not a phase message (e.g. flow control): nothing to answer
        return resp

    async def finish(self) -> None:
        """Every stage's finish runs exactly once, even when one fails or the stream is cancelled: a
        skipped finish would leak what a stage holds (admission slots, reservations) or lose a usage
        record. A cancellation is re-raised once all have run."""
        if self.finished:
            return
        self.finished = True
        ctx = self.ctx
        if ctx.outcome is None:
            ctx.outcome = Outcome.INCOMPLETE if ctx.response_status else Outcome.NO_RESPONSE
        cancelled: BaseException | None = None
        timings = ctx.timings
        for stage in self.pipeline.on_finish:
            name = stage.name
            t0 = perf_counter()
            try:
                await stage.finish(ctx)
            except asyncio.CancelledError as err:
                cancelled = cancelled or err
            except Exception:
                log.exception("stage %s failed in finish (request %s)", name, ctx.request_id)
            timings[name] = timings.get(name, 0.0) + perf_counter() - t0
        if cancelled is not None:
            raise cancelled

    # -- request phases ---------------------------------------------------------------------------

    async def _request_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        ctx = self.ctx
        _take_request_headers(ctx, msg)
        # Envoy's access log line names the gateway's id for the exchange (the usage record's key).
        ctx.metadata["request_id"] = ctx.request_id
        timings = ctx.timings
        for stage in self.pipeline.on_request_headers:
            ctx.stage = name = stage.name
            t0 = perf_counter()
            try:
                await stage.request_headers(ctx)
            finally:  # a refusing stage's time counts too
                timings[name] = timings.get(name, 0.0) + perf_counter() - t0
            if ctx.reply is not None:
                return self._direct()
        ctx.stage = ""
        if msg.end_of_stream and ctx.endpoint is not None:
            # A routed endpoint needs a body; Envoy will send no body message.
            ctx.body = b""
            return await self._request_body_done(phase="request_headers")
        resp = ep.ProcessingResponse()
        resp.request_headers.SetInParent()
        self._flush_edits(resp, resp.request_headers.response)
        if msg.end_of_stream and not ctx.needs:
            self.done = True
        return resp

    async def _request_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        ctx = self.ctx
        # BUFFERED mode delivers the whole body in one message; accumulate anyway in case the
        # filter is configured for streamed request bodies.
        ctx.body = msg.body if ctx.body is None else ctx.body + msg.body
        if not msg.end_of_stream:
            resp = ep.ProcessingResponse()
            resp.request_body.SetInParent()
            return resp
        return await self._request_body_done(phase="request_body")

    async def _request_body_done(self, phase: str) -> ep.ProcessingResponse:
        ctx = self.ctx
        timings = ctx.timings
        for stage in self.pipeline.on_request_body:
            ctx.stage = name = stage.name
            t0 = perf_counter()
            try:
                await stage.request_body(ctx)
            finally:  # a refusing stage's time counts too
                timings[name] = timings.get(name, 0.0) + perf_counter() - t0
            if ctx.reply is not None:
                return self._direct()
        ctx.stage = ""
        new_body: bytes | None = None
        if ctx.body_dirty:
            new_body = _rewritten_body(ctx)
            ctx.set_headers["content-length"] = str(len(new_body))
        # The request phases are over: a long stream must not keep a large body (and its parsed
        # copy) alive for minutes. Stages keep what they need of it in ctx.state.
        ctx.release_body()
        resp = ep.ProcessingResponse()
        phase_resp = resp.request_body if phase == "request_body" else resp.request_headers
        phase_resp.SetInParent()
        self._flush_edits(
            resp,
            phase_resp.response,
            body=new_body if phase == "request_body" else None,
            clear_route_cache=ctx.clear_route_cache,
        )
        self.done = not ctx.needs
        return resp

    # -- response phases --------------------------------------------------------------------------

    async def _response_headers(self, msg: ep.HttpHeaders) -> ep.ProcessingResponse:
        ctx = self.ctx
        headers = _headers_of(msg)
        status = headers.pop(":status", "0")
        ctx.response_status = int(status) if len(status) == 3 and status.isascii() and status.isdigit() else 0
        ctx.response_content_type = headers.get("content-type", "")
        ctx.response_headers = headers
        timings = ctx.timings
        for stage in self.pipeline.on_response_headers:
            name = stage.name
            t0 = perf_counter()
            await stage.response_headers(ctx)
            timings[name] = timings.get(name, 0.0) + perf_counter() - t0
        resp = ep.ProcessingResponse()
        resp.response_headers.SetInParent()
        needs = ctx.needs
        # Every answer names the gateway's id for the exchange (the usage record's key).
        ctx.set_headers["x-gateway-request-id"] = ctx.request_id
        if msg.end_of_stream:
            self._response_done()
        elif needs & (Need.JSON | Need.EVENTS):
            replies.stream_response_body_override(resp)
            # STREAMED bodies go out chunked; a stale content-length would truncate the client's view.
            ctx.remove_headers.append("content-length")
            self.edit = bool(needs & Need.EDIT)
            if "text/event-stream" in ctx.response_content_type:
                if needs & Need.EVENTS:
                    self.sse = SSEParser()
            elif needs & Need.JSON:
                self.body = []
        else:
            self.done = True
        self._flush_edits(resp, resp.response_headers.response)
        return resp

    async def _response_body(self, msg: ep.HttpBody) -> ep.ProcessingResponse:
        ctx = self.ctx
        data = msg.body
        eos = msg.end_of_stream
        if eos:
            # Stages see the ending on the last chunk itself (its reply carries their final metadata).
            ctx.response_ended_at = time.monotonic()
            ctx.outcome = Outcome.COMPLETED
        chunk = ResponseChunk(data, eos)
        out: bytes | None = None  # the body mutation, when the client must get other bytes
        if self.sse is not None:
            out = self._sse_chunk(chunk)
        elif self.body is not None:
            out = self._json_chunk(chunk)
        timings = ctx.timings
        try:
            for stage in self.pipeline.on_response_body:
                name = stage.name
                t0 = perf_counter()
                await stage.response_body(ctx, chunk)
                timings[name] = timings.get(name, 0.0) + perf_counter() - t0
        except GatewayError as err:
            # Headers already went to the client: the status cannot change any more.
            log.warning(
                "stage refused a response chunk after headers were sent (request %s): %s", ctx.request_id, err.code
            )
        except Exception as exc:
            # Same: an immediate response is no longer possible; the chunk passes as it came.
            log.error("stage failed on a response chunk (request %s): %s", ctx.request_id, type(exc).__name__)
        if chunk.replaced:
            out = chunk.data
        elif chunk.events is not None and self.edit:
            out = self._encode_events(chunk)
        elif chunk.json_changed and self.edit:
            out = orjson.dumps(chunk.json)
        resp = ep.ProcessingResponse()
        resp.response_body.SetInParent()
        # Envoy ignores header mutations on streamed body chunks; only the body and metadata count.
        ctx.set_headers, ctx.remove_headers = {}, []
        self._flush_edits(resp, resp.response_body.response, body=out)
        if eos:
            self._response_done()
        return resp

    def _sse_chunk(self, chunk: ResponseChunk) -> bytes | None:
        """Frame this chunk's events. Returns the bytes the client must get instead of the chunk
        when they differ (only possible once framing failed mid-edit)."""
        assert self.sse is not None
        try:
            chunk.events = self.sse.feed(chunk.data)
            if chunk.end_of_stream:
                chunk.events.extend(self.sse.flush())
        except SSEError as err:
            log.warning("response for request %s is not a parseable event stream", self.ctx.request_id)
            unsent = b"".join(ev.raw for ev in err.events) + self.sse.pending
            self.sse = None
            chunk.events = None
            if self.edit and self.withheld:
                # Bytes held back from earlier chunks must still reach the client, unedited.
                self.withheld = False
                return unsent
        return None

    def _encode_events(self, chunk: ResponseChunk) -> bytes | None:
        """With Need.EDIT the client gets whole events only: the bytes of an event split across
        chunks go out with the chunk that completes it. An unchanged chunk that starts and ends on
        an event boundary passes as it came (no body mutation, no copy)."""
        assert chunk.events is not None
        pending = bool(self.sse.pending) if self.sse is not None and not chunk.end_of_stream else False
        if not chunk.events_changed and not self.withheld and not pending:
            return None
        self.withheld = pending
        return b"".join(ev.encode() for ev in chunk.events)

    def _json_chunk(self, chunk: ResponseChunk) -> bytes | None:
        """Collect a non-SSE body for Need.JSON; with Need.EDIT the client gets nothing until the
        whole body is known (then the last chunk carries all of it)."""
        assert self.body is not None
        size = self.body_size + len(chunk.data)
        if size > MAX_JSON_RESPONSE_BYTES:
            log.warning("response for request %s is too large to parse; passed through", self.ctx.request_id)
            held = b"".join(self.body) if self.edit else b""
            self.body = None
            return held + chunk.data if held else None
        self.body.append(chunk.data)
        self.body_size = size
        if not chunk.end_of_stream:
            return b"" if self.edit else None
        whole = b"".join(self.body)
        self.body = None
        chunk.body = whole
        try:
            chunk.json = orjson.loads(whole) if whole else None
        except orjson.JSONDecodeError:
            chunk.json = None
        return whole if self.edit else None

    def _response_done(self) -> None:
        self.done = True
        ctx = self.ctx
        ctx.outcome = Outcome.COMPLETED
        if ctx.response_ended_at is None:
            ctx.response_ended_at = time.monotonic()

    def _flush_edits(
        self,
        resp: ep.ProcessingResponse,
        common: ep.CommonResponse,
        body: bytes | None = None,
        clear_route_cache: bool = False,
    ) -> None:
        """Move the stages' pending edits into this phase's reply; the next phase starts clean."""
        ctx = self.ctx
        replies.common(common, ctx.set_headers, ctx.remove_headers, body=body, clear_route_cache=clear_route_cache)
        replies.add_metadata(resp, ctx.metadata)
        ctx.set_headers, ctx.remove_headers, ctx.metadata = {}, [], {}

    # -- direct answers ---------------------------------------------------------------------------

    def _direct(self) -> ep.ProcessingResponse:
        reply = self.ctx.reply
        assert reply is not None
        headers = {"content-type": reply.content_type, **reply.headers, "x-gateway-request-id": self.ctx.request_id}
        self.done = True
        self.ctx.outcome = Outcome.DIRECT
        resp = replies.immediate(reply.status, reply.body, headers, "extproc_direct_reply")
        replies.add_metadata(resp, self.ctx.metadata)
        return resp

    def _error(self, err: GatewayError) -> ep.ProcessingResponse:
        ctx = self.ctx
        adapter = ctx.adapter or _OPENAI
        headers = {"content-type": "application/json", **err.headers, "x-gateway-request-id": ctx.request_id}
        self.done = True
        ctx.error = err
        ctx.outcome = Outcome.REFUSED
        resp = replies.immediate(err.status, adapter.error_body(err), headers, f"extproc_{err.code or 'error'}")
        replies.add_metadata(resp, {**ctx.metadata, "error": err.code or "error"})
        return resp


# gRPC metadata naming the ext_proc filter a stream comes from: "upstream" is the filter on a
# model's target cluster, called once per attempt (envoy.yaml `initial_metadata`).
PHASE_METADATA = "x-gateway-phase"
# The request attribute that carries the picked endpoint's metadata (Envoy text format).
_HOST_METADATA = "xds.upstream_host_metadata"
_TARGET_KEY = re.compile(r'key:\s*"target"\s*value\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"')


def target_of(req: ep.ProcessingRequest) -> str:
    """The picked endpoint's `gateway.target` metadata from the request attributes, or ""."""
    for attrs in req.attributes.values():
        value = attrs.fields.get(_HOST_METADATA)
        if value is None:
            continue
        text = value.string_value
        try:
            meta = text_format.Parse(text, core_pb2.Metadata())
            target = meta.filter_metadata["gateway"].fields["target"].string_value
        except (text_format.ParseError, KeyError):
            m = _TARGET_KEY.search(text)  # typed metadata of unknown types in the same text
            target = m.group(1) if m else ""
        return target
    return ""


class AttemptProcessor:
    """One attempt of a model with targets (Envoy's upstream ext_proc filter): request headers,
    then the buffered body, rewritten for the target by the attempt stage; nothing of the
    response. The body's new length reaches Envoy as dynamic metadata (`content_length`), which
    the cluster's header_mutation filter puts back: the header cannot change after the headers
    phase on the upstream side, so that phase drops it."""

    __slots__ = ("ctx", "done", "stage")

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.ctx = RequestContext()
        self.done = False

    async def handle(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        kind = req.WhichOneof("request")
        ctx = self.ctx
        try:
            if kind == "request_headers":
                _take_request_headers(ctx, req.request_headers)
                ctx.notes["target"] = target_of(req)
                resp = ep.ProcessingResponse()
                resp.request_headers.SetInParent()
                replies.common(resp.request_headers.response, {}, ["content-length"])
                return resp
            if kind == "request_body":
                msg = req.request_body
                ctx.body = msg.body if ctx.body is None else ctx.body + msg.body
                resp = ep.ProcessingResponse()
                resp.request_body.SetInParent()
                if not msg.end_of_stream:
                    return resp
                await self.stage.request_body(ctx)
                body = _rewritten_body(ctx) if ctx.body_dirty else ctx.body
                ctx.release_body()
                replies.common(resp.request_body.response, ctx.set_headers, ctx.remove_headers, body=body)
                replies.add_metadata(resp, {"content_length": str(len(body or b""))})
                self.done = True
                return resp
        except GatewayError as err:
            return self._error(err)
        except Exception as exc:
            log.error("attempt stage failed on %s: %s", kind, type(exc).__name__)
            log.debug("attempt stage failure", exc_info=True)
            return self._error(
                GatewayError(ErrorKind.INTERNAL, "The gateway failed to process this request.", "gateway_error")
            )
        return None

    def _error(self, err: GatewayError) -> ep.ProcessingResponse:
        """In the client's schema, marked so the downstream pipeline knows no provider wrote it
        (it would otherwise translate it as the target's answer)."""
        self.done = True
        adapter = self.ctx.adapter or _OPENAI
        headers = {"content-type": "application/json", **err.headers, REFUSED_HEADER: err.code or "error"}
        return replies.immediate(err.status, adapter.error_body(err), headers, f"extproc_{err.code or 'error'}")


async def run_stream(
    pipeline: Pipeline,
    read: Callable[[], Awaitable[ep.ProcessingRequest | None]],
    write: Callable[[ep.ProcessingResponse], Awaitable[None]],
    traceparent: str | None = None,
    phase: str | None = None,
) -> None:
    """Drive one ext_proc stream over any transport: `read` returns the next message or None at the
    end of Envoy's side; `write` sends a reply. `traceparent`: the W3C trace context Envoy sent in
    the stream's gRPC metadata (its ext_proc span), so the server's span joins Envoy's trace.
    `phase` "upstream": one attempt of a model with targets (AttemptProcessor)."""
    if phase == "upstream" and pipeline.attempt is not None:
        attempt = AttemptProcessor(pipeline.attempt)
        while not attempt.done:
            req = await read()
            if req is None:
                break
            resp = await attempt.handle(req)
            del req
            if resp is not None:
                await write(resp)
        return
    proc = Processor(pipeline, traceparent)
    try:
        while not proc.done:
            req = await read()
            if req is None:
                break
            resp = await proc.handle(req)
            # Drop the message (it may hold a 16 MiB body) before waiting on the next one.
            del req
            if resp is not None:
                await write(resp)
                del resp
    finally:
        # Shielded: a cancelled stream (client gone) must not cut a finish short; if this task is
        # cancelled again while waiting, finish carries on in its own task.
        task = asyncio.ensure_future(proc.finish())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                _FINISHING.add(task)
                task.add_done_callback(_FINISHING.discard)
            raise


async def serve_stream(pipeline: Pipeline, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """One stream on grpc.aio (context.read()/write() are cheaper than an async generator)."""

    async def read() -> ep.ProcessingRequest | None:
        req = await context.read()
        return None if req is grpc.aio.EOF else req

    traceparent = phase = None
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            traceparent = value if isinstance(value, str) else value.decode("latin-1")
        elif key == PHASE_METADATA:
            phase = value if isinstance(value, str) else value.decode("latin-1")
    await run_stream(pipeline, read, context.write, traceparent, phase)
