"""The mock provider's HTTP server.

Behaviour is steered per request by `x-mock-*` headers, which pass through Envoy untouched:

  x-mock-status: N           answer with provider-style error N (401, 404, 429, 500, 503, 529 ...)
  x-mock-retry-after: S      retry-after seconds on 429/529 (default 1)
  x-mock-latency-ms: N       wait before the response headers
  x-mock-chunk-delay-ms: N   wait between SSE events
  x-mock-split: N            write each SSE event in N-byte pieces (separate writes)
  x-mock-crlf: 1             frame SSE lines with CRLF instead of LF
  x-mock-output-tokens: N    tokens in each text block (default 8; the whole answer is capped by max_tokens)
  x-mock-fail-after: N       abort the connection after N SSE events (a broken stream)
  x-mock-stream-error: TYPE  after some events send the provider's in-stream error of that type
                             (Anthropic `event: error`, e.g. overloaded_error; OpenAI `data: {"error":...}`)
                             and end the stream there (no message_stop / [DONE])
  x-mock-stream-error-after: N  events before that error (default: half the stream)
  x-mock-tag: T              label for GET /_mock/requests?tag=T
  x-mock-echo: 1             the answer repeats the last user message (3-character pieces when streamed;
                             tool calls get {"echo": <that text>} as arguments, in 4-character pieces)

Content and token accounting (all counts deterministic; see wire.build_answer):

  x-mock-content: K,K,...    the answer's blocks in order, each text | thinking | tool (default text).
                             tool: OpenAI tool_calls / Anthropic tool_use, arguments streamed in pieces,
                             calling the request's tools in turn with {"location":"Paris, France",
                             "unit":"celsius"} in 11 one-token pieces; thinking: Anthropic thinking block
                             (thinking_delta + signature_delta), hidden reasoning tokens for OpenAI.
                             Stops follow: tool_calls / tool_use, stop / end_turn, length / max_tokens
  x-mock-input-tokens: N     prompt / input tokens (default: whitespace-separated words in the messages
                             and system prompt)
  x-mock-reasoning-tokens: N tokens of each thinking block (default 6 when the content names one; a
                             thinking block is added first when it does not). Part of completion_tokens
                             (OpenAI, reasoning_tokens) / output_tokens (Anthropic)
  x-mock-cached-tokens: N    OpenAI prompt_tokens_details.cached_tokens (part of prompt_tokens, so at most it)
  x-mock-cache-creation-tokens: N  Anthropic cache_creation_input_tokens (not part of input_tokens)
  x-mock-cache-read-tokens: N      Anthropic cache_read_input_tokens (not part of input_tokens)
  x-mock-cache-ttl: 5m|1h    which cache_creation.ephemeral_*_input_tokens holds the written tokens (5m)
  x-mock-delta-usage: full|output  Anthropic message_delta usage: input, cache and output counts as the
                             API sends today (full, default), or output_tokens alone (the older form)
  x-mock-only-model: M[,M2]  the failure headers (x-mock-status, x-mock-latency-ms, x-mock-stream-error,
                             x-mock-fail-after) apply only to requests whose body names one of these
                             models: one target of a fallback list fails, the next answers

Every request is recorded (path, headers, raw body, status, when each SSE event went out, and `usage`:
the usage object exactly as the provider reported it, in its own field names, or null when it reported
none; for a stream, what the events that actually went out reported, merged the way the SDKs merge
them) in a bounded ring buffer that tests read from GET /_mock/requests. With $MOCK_OPENAI_KEY /
$MOCK_ANTHROPIC_KEY set the mock rejects requests that do not carry that credential, as the real APIs
would.

The mock imports nothing from the gateway: it is what the gateway is checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson
from aiohttp import web

from . import wire

WORDS = list(wire.WORDS)
_ids = itertools.count(1)
# The request's log entry, for the middleware that records the response status.
RECORD = web.RequestKey("mock_record", dict)
# False when x-mock-only-model names another model: this request is spared the failure headers.
FAILS = web.RequestKey("mock_fails", bool)


@dataclass
class MockOptions:
    openai_key: str | None = None
    anthropic_key: str | None = None
    history: int = 2000


def _tokens(obj: Any) -> int:
    """A deterministic stand-in for a tokenizer: whitespace-separated words in every string."""
    if isinstance(obj, str):
        return len(obj.split())
    if isinstance(obj, list):
        return sum(_tokens(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tokens(v) for k, v in obj.items() if k in ("content", "text", "system", "messages"))
    return 0


def _int_header(request: web.Request, name: str, default: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(0, int(raw))
    except ValueError:
        return default


def _opt_int_header(request: web.Request, name: str) -> int | None:
    return _int_header(request, name, 0) if name in request.headers else None


class SteeringError(ValueError):
    """An x-mock-* header the mock cannot honour: answered with a 400 so a test's typo fails loudly."""


@dataclass(frozen=True, slots=True)
class Steering:
    """What the x-mock-* headers ask of one answer (see the module docstring)."""

    content: tuple[str, ...]
    output_tokens: int
    input_tokens: int | None
    reasoning_tokens: int | None
    cached_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    cache_ttl: Literal["5m", "1h"]
    delta_usage: wire.DeltaUsage
    crlf: bool
    stream_error: str | None
    stream_error_after: int | None
    echo: bool = False

    @classmethod
    def from_request(cls, request: web.Request) -> Steering:
        h = request.headers
        content = tuple(k.strip().lower() for k in h.get("x-mock-content", "text").split(",") if k.strip())
        unknown = [k for k in content if k not in wire.BLOCK_KINDS]
        if unknown:
            raise SteeringError(f"x-mock-content: unknown block kind {unknown[0]!r}; use {', '.join(wire.BLOCK_KINDS)}")
        ttl = h.get("x-mock-cache-ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise SteeringError("x-mock-cache-ttl: use 5m or 1h")
        delta_usage = h.get("x-mock-delta-usage", "full")
        if delta_usage not in ("full", "output"):
            raise SteeringError("x-mock-delta-usage: use full or output")
        return cls(
            content=content or ("text",),
            output_tokens=_int_header(request, "x-mock-output-tokens", 8),
            input_tokens=_opt_int_header(request, "x-mock-input-tokens"),
            reasoning_tokens=_opt_int_header(request, "x-mock-reasoning-tokens"),
            cached_tokens=_int_header(request, "x-mock-cached-tokens", 0),
            cache_creation_tokens=_int_header(request, "x-mock-cache-creation-tokens", 0),
            cache_read_tokens=_int_header(request, "x-mock-cache-read-tokens", 0),
            cache_ttl="1h" if ttl == "1h" else "5m",
            delta_usage="output" if delta_usage == "output" else "full",
            crlf=h.get("x-mock-crlf", "").lower() in ("1", "true", "yes"),
            stream_error=(h.get("x-mock-stream-error") or None) if request.get(FAILS, True) else None,
            stream_error_after=_opt_int_header(request, "x-mock-stream-error-after"),
            echo=h.get("x-mock-echo", "").lower() in ("1", "true", "yes"),
        )

    def answer(self, schema: Literal["openai", "anthropic"], body: dict[str, Any], id_prefix: str) -> wire.Answer:
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        answer = wire.build_answer(
            schema,
            self.content,
            self.output_tokens,
            self.reasoning_tokens,
            cap,
            _tool_names(schema, body.get("tools")),
            id_prefix,
        )
        if not self.echo:
            return answer
        # A model that repeats what it was sent: the text of the last user message, in 3-character
        # pieces (so anything in it arrives split across events), and as {"echo": ...} in tool calls.
        text = _last_user_text(body)
        args = orjson.dumps({"echo": text}).decode()
        blocks = tuple(
            replace(b, pieces=_pieces(text, 3))
            if b.kind == "text"
            else replace(b, pieces=_pieces(args, 4))
            if b.kind == "tool"
            else b
            for b in answer.blocks
        )
        return replace(answer, blocks=blocks)


EMBEDDING_DIMS = 256


def _embedding(text: str) -> list[float]:
    vec = [0.0] * EMBEDDING_DIMS
    for raw in text.lower().split():
        word = raw.strip(".,;:!?'\"()")
        if word:
            vec[zlib.crc32(word.encode()) % EMBEDDING_DIMS] += 1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def _pieces(text: str, n: int) -> tuple[str, ...]:
    return tuple(text[i : i + n] for i in range(0, len(text), n)) or ("",)


def _last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message, either schema (a string, or its text parts joined)."""
    for msg in reversed(body.get("messages") or []):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _tool_names(schema: str, tools: Any) -> list[str]:
    """Names of the tools the request declares, in order (the model calls those, not made-up ones)."""
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if schema == "openai" else tool
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


@web.middleware
async def _record_status(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    resp = await handler(request)
    record = request.get(RECORD)
    if record is not None:
        record["status"] = resp.status
    return resp


class MockProvider:
    def __init__(self, options: MockOptions | None = None) -> None:
        self.options = options or MockOptions()
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.options.history)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_record_status])
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/v1/embeddings", self.openai_embeddings)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self.anthropic_count_tokens)
        app.router.add_get("/_mock/requests", self.list_requests)
        app.router.add_delete("/_mock/requests", self.clear_requests)
        app.router.add_get("/_mock/health", self.health)
        app.on_response_prepare.append(_rate_limit_headers)
        return app

    # -- control endpoints ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def list_requests(self, request: web.Request) -> web.Response:
        tag = request.query.get("tag")
        items = [r for r in self.requests if tag is None or r["tag"] == tag]
        return web.Response(body=orjson.dumps(items), content_type="application/json")

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    # -- helpers ----------------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = await request.read()
        record: dict[str, Any] = {
            "path": request.path,
            "query": request.query_string,
            "method": request.method,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": raw.decode("utf-8", "replace"),
            "tag": request.headers.get("x-mock-tag"),
            "received_at": time.time(),
            "status": None,
            # The usage the provider reported, exactly, in its own field names; None when none was.
            "usage": None,
            "events_sent_at": [],
        }
        self.requests.append(record)
        request[RECORD] = record
        only = request.headers.get("x-mock-only-model")
        if only is not None:
            try:
                model = orjson.loads(raw).get("model")
            except (orjson.JSONDecodeError, AttributeError):
                model = None
            request[FAILS] = model in {m.strip() for m in only.split(",")}
        latency = _int_header(request, "x-mock-latency-ms", 0) if request.get(FAILS, True) else 0
        if latency:
            await asyncio.sleep(latency / 1000)
        return record, raw

    @staticmethod
    def _with_stream_error(
        steering: Steering, events: list[wire.WireEvent], make_error: Callable[..., wire.WireEvent]
    ) -> list[wire.WireEvent]:
        """The stream cut after some events by the provider's in-stream error, when one is asked for."""
        if steering.stream_error is None:
            return events
        after = steering.stream_error_after if steering.stream_error_after is not None else len(events) // 2
        return [*events[: min(after, len(events))], make_error(steering.stream_error, crlf=steering.crlf)]

    async def _stream(
        self, request: web.Request, record: dict[str, Any], events: list[wire.WireEvent]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        )
        await resp.prepare(request)
        delay = _int_header(request, "x-mock-chunk-delay-ms", 0) / 1000
        split = _int_header(request, "x-mock-split", 0)
        fail_after = (
            _int_header(request, "x-mock-fail-after", -1)
            if "x-mock-fail-after" in request.headers and request.get(FAILS, True)
            else -1
        )
        for i, event in enumerate(events):
            if delay and i:
                await asyncio.sleep(delay)
            if i == fail_after:
                # The break comes a chunk delay after the last event, as a provider's would: an
                # abort right behind a write can make the peer's kernel drop data it had received.
                assert request.transport is not None
                request.transport.abort()
                return resp
            if split:
                for off in range(0, len(event.raw), split):
                    await resp.write(event.raw[off : off + split])
                    await asyncio.sleep(0)
            else:
                await resp.write(event.raw)
            record["events_sent_at"].append(time.time())
            if event.reported_usage is not None:
                record["usage"] = event.reported_usage
        await resp.write_eof()
        return resp

    # -- OpenAI -----------------------------------------------------------------------------------

    @staticmethod
    def _openai_error(
        status: int, message: str | None = None, param: str | None = None, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            status=status,
            body=wire.openai_error(status, message, param),
            content_type="application/json",
            headers=headers,
        )

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        record, raw = await self._record(request)
        key = self.options.openai_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return self._openai_error(401)
        forced = _int_header(request, "x-mock-status", 0) if request.get(FAILS, True) else 0
        if forced:
            headers = {"retry-after": request.headers.get("x-mock-retry-after", "1")} if forced == 429 else {}
            return self._openai_error(forced, headers=headers)
        try:
            steering = Steering.from_request(request)
        except SteeringError as e:
            return self._openai_error(400, str(e))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._openai_error(400, "you must provide a model parameter", "model")
        if not isinstance(body.get("messages"), list):
            return self._openai_error(400, "Missing required parameter: 'messages'.", "messages")
        n = next(_ids)
        answer = steering.answer("openai", body, f"call_mock{n}")
        prompt = steering.input_tokens if steering.input_tokens is not None else _tokens(body["messages"])
        usage = wire.openai_usage(
            prompt,
            answer.output_tokens,
            cached=min(steering.cached_tokens, prompt),
            reasoning=answer.reasoning_tokens,
        )
        cid, created, model = f"chatcmpl-mock{n}", int(time.time()), body["model"]
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            obfuscation = not (isinstance(opts, dict) and opts.get("include_obfuscation") is False)
            events = wire.openai_stream_events(
                cid,
                created,
                model,
                answer,
                usage if include_usage else None,
                obfuscation=obfuscation,
                crlf=steering.crlf,
            )
            events = self._with_stream_error(steering, events, wire.openai_stream_error)
            return await self._stream(request, record, events)
        record["usage"] = usage
        payload = wire.openai_completion_body(cid, created, model, answer, usage)
        return web.Response(body=payload, content_type="application/json")

    async def openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        """Embeddings as OpenAI answers them, deterministic: a text's vector is its word counts
        hashed into EMBEDDING_DIMS dimensions, L2-normalized, so two texts with nearly the same
        words are nearly parallel (tests steer similarity by the words they choose)."""
        record, raw = await self._record(request)
        key = self.options.openai_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return self._openai_error(401)
        forced = _int_header(request, "x-mock-status", 0) if request.get(FAILS, True) else 0
        if forced:
            return self._openai_error(forced)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return self._openai_error(400, "'input' must be a string or an array of strings.", "input")
        data = [{"object": "embedding", "index": i, "embedding": _embedding(t)} for i, t in enumerate(inputs)]
        tokens = sum(len(t.split()) for t in inputs) or 1
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        record["usage"] = usage
        payload = {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    # -- Anthropic --------------------------------------------------------------------------------

    def _anthropic_error(self, status: int, message: str | None = None) -> web.Response:
        rid = f"req_mock{next(_ids)}"
        headers = {"request-id": rid}
        if status in (429, 529):
            headers["retry-after"] = "1"
        return web.Response(
            status=status,
            body=wire.anthropic_error(status, rid, message),
            content_type="application/json",
            headers=headers,
        )

    async def _anthropic_prelude(
        self, request: web.Request
    ) -> tuple[dict[str, Any], Steering | None, dict[str, Any] | web.Response]:
        record, raw = await self._record(request)
        key = self.options.anthropic_key
        if key is not None and request.headers.get("x-api-key") != key:
            return record, None, self._anthropic_error(401)
        forced = _int_header(request, "x-mock-status", 0) if request.get(FAILS, True) else 0
        if forced:
            resp = self._anthropic_error(forced)
            if forced == 429 and "x-mock-retry-after" in request.headers:
                resp.headers["retry-after"] = request.headers["x-mock-retry-after"]
            return record, None, resp
        try:
            steering = Steering.from_request(request)
        except SteeringError as e:
            return record, None, self._anthropic_error(400, str(e))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return record, None, self._anthropic_error(400, "There was an issue with the request body: invalid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return record, None, self._anthropic_error(400, "model: Field required")
        if not isinstance(body.get("messages"), list):
            return record, None, self._anthropic_error(400, "messages: Field required")
        return record, steering, body

    @staticmethod
    def _anthropic_input(steering: Steering, body: dict[str, Any]) -> int:
        if steering.input_tokens is not None:
            return steering.input_tokens
        return _tokens(body["messages"]) + _tokens(body.get("system", ""))

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        record, steering, body = await self._anthropic_prelude(request)
        if isinstance(body, web.Response):
            return body
        assert steering is not None
        if not isinstance(body.get("max_tokens"), int):
            return self._anthropic_error(400, "max_tokens: Field required")
        n = next(_ids)
        answer = steering.answer("anthropic", body, f"toolu_mock{n}")
        usage = wire.anthropic_usage(
            self._anthropic_input(steering, body),
            answer.output_tokens,
            cache_creation=steering.cache_creation_tokens,
            cache_read=steering.cache_read_tokens,
            cache_ttl=steering.cache_ttl,
        )
        mid, model = f"msg_mock{n}", body["model"]
        if body.get("stream") is True:
            events = wire.anthropic_stream_events(
                mid, model, answer, usage, delta_usage=steering.delta_usage, crlf=steering.crlf
            )
            events = self._with_stream_error(steering, events, wire.anthropic_stream_error)
            return await self._stream(request, record, events)
        record["usage"] = usage
        payload = wire.anthropic_message_body(mid, model, answer, usage)
        return web.Response(body=payload, content_type="application/json")

    async def anthropic_count_tokens(self, request: web.Request) -> web.Response:
        _, steering, body = await self._anthropic_prelude(request)
        if isinstance(body, web.Response):
            return body
        assert steering is not None
        tokens = self._anthropic_input(steering, body)
        return web.Response(body=orjson.dumps({"input_tokens": tokens}), content_type="application/json")


# What the real APIs send about the caller's own rate limits on every answer (OpenAI: "Rate limits"
# guide, response headers; Anthropic: "Rate limits", response headers). Fixed figures: the gateway
# only has to keep them apart from its own.
OPENAI_RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "29999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "2ms",
}
ANTHROPIC_RATE_LIMIT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
    "anthropic-ratelimit-tokens-limit": "2000000",
    "anthropic-ratelimit-tokens-remaining": "1999000",
    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:01Z",
}


async def _rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/v1/chat/completions":
        response.headers.update(OPENAI_RATE_LIMIT_HEADERS)
    elif request.path.startswith("/v1/messages"):
        response.headers.update(ANTHROPIC_RATE_LIMIT_HEADERS)


async def serve(host: str, port: int, options: MockOptions | None = None) -> None:
    runner = web.AppRunner(MockProvider(options).app(), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    print(f"mock provider listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(host: str, port: int, options: MockOptions | None = None) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, options))
    else:
        uvloop.run(serve(host, port, options))
