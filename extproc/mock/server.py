"""The mock provider's HTTP server.

Behaviour is steered per request by `x-mock-*` headers, which pass through Envoy untouched:

  x-mock-status: N           answer with provider-style error N (401, 404, 429, 500, 503, 529 ...)
  x-mock-retry-after: S      retry-after seconds on 429/529 (default 1)
  x-mock-latency-ms: N       wait before the response headers
  x-mock-chunk-delay-ms: N   wait between SSE events
  x-mock-split: N            write each SSE event in N-byte pieces (separate writes)
  x-mock-output-tokens: N    length of the answer in tokens (default 8; capped by max_tokens)
  x-mock-fail-after: N       abort the connection after N SSE events (a broken stream)
  x-mock-tag: T              label for GET /_mock/requests?tag=T

Every request is recorded (path, headers, raw body, when each SSE event went out) in a bounded
ring buffer that tests read from GET /_mock/requests. With $MOCK_OPENAI_KEY / $MOCK_ANTHROPIC_KEY set the mock
rejects requests that do not carry that credential, as the real APIs would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import wire

WORDS = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "gateway",
    "counts",
    "every",
    "token",
]
_ids = itertools.count(1)


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


class MockProvider:
    def __init__(self, options: MockOptions | None = None) -> None:
        self.options = options or MockOptions()
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.options.history)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self.anthropic_count_tokens)
        app.router.add_get("/_mock/requests", self.list_requests)
        app.router.add_delete("/_mock/requests", self.clear_requests)
        app.router.add_get("/_mock/health", self.health)
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
            "events_sent_at": [],
        }
        self.requests.append(record)
        latency = _int_header(request, "x-mock-latency-ms", 0)
        if latency:
            await asyncio.sleep(latency / 1000)
        return record, raw

    def _answer(self, request: web.Request, body: dict[str, Any]) -> tuple[list[str], str]:
        wanted = _int_header(request, "x-mock-output-tokens", 8)
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        finish_by_length = isinstance(cap, int) and 0 < cap < wanted
        n = cap if finish_by_length and isinstance(cap, int) else wanted
        pieces = [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n)]
        return pieces, "length" if finish_by_length else "stop"

    async def _stream(self, request: web.Request, record: dict[str, Any], events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        )
        await resp.prepare(request)
        delay = _int_header(request, "x-mock-chunk-delay-ms", 0) / 1000
        split = _int_header(request, "x-mock-split", 0)
        fail_after = _int_header(request, "x-mock-fail-after", -1) if "x-mock-fail-after" in request.headers else -1
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
                for off in range(0, len(event), split):
                    await resp.write(event[off : off + split])
                    await asyncio.sleep(0)
            else:
                await resp.write(event)
            record["events_sent_at"].append(time.time())
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
        forced = _int_header(request, "x-mock-status", 0)
        if forced:
            headers = {"retry-after": request.headers.get("x-mock-retry-after", "1")} if forced == 429 else {}
            return self._openai_error(forced, headers=headers)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._openai_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._openai_error(400, "you must provide a model parameter", "model")
        if not isinstance(body.get("messages"), list):
            return self._openai_error(400, "Missing required parameter: 'messages'.", "messages")
        pieces, finish = self._answer(request, body)
        prompt = _tokens(body["messages"])
        cid, created, model = f"chatcmpl-mock{next(_ids)}", int(time.time()), body["model"]
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream(
                request, record, wire.openai_stream(cid, created, model, pieces, finish, prompt, include_usage)
            )
        payload = wire.openai_completion(cid, created, model, "".join(pieces), finish, prompt, len(pieces))
        return web.Response(body=payload, content_type="application/json")

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

    async def _anthropic_prelude(self, request: web.Request) -> tuple[dict[str, Any], dict[str, Any] | web.Response]:
        record, raw = await self._record(request)
        key = self.options.anthropic_key
        if key is not None and request.headers.get("x-api-key") != key:
            return record, self._anthropic_error(401)
        forced = _int_header(request, "x-mock-status", 0)
        if forced:
            resp = self._anthropic_error(forced)
            if forced == 429 and "x-mock-retry-after" in request.headers:
                resp.headers["retry-after"] = request.headers["x-mock-retry-after"]
            return record, resp
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return record, self._anthropic_error(400, "There was an issue with the request body: invalid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return record, self._anthropic_error(400, "model: Field required")
        if not isinstance(body.get("messages"), list):
            return record, self._anthropic_error(400, "messages: Field required")
        return record, body

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        record, body = await self._anthropic_prelude(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("max_tokens"), int):
            return self._anthropic_error(400, "max_tokens: Field required")
        pieces, finish = self._answer(request, body)
        stop = "max_tokens" if finish == "length" else "end_turn"
        prompt = _tokens(body["messages"]) + _tokens(body.get("system", ""))
        mid, model = f"msg_mock{next(_ids)}", body["model"]
        if body.get("stream") is True:
            return await self._stream(request, record, wire.anthropic_stream(mid, model, pieces, stop, prompt))
        payload = wire.anthropic_message(mid, model, "".join(pieces), stop, prompt, len(pieces))
        return web.Response(body=payload, content_type="application/json")

    async def anthropic_count_tokens(self, request: web.Request) -> web.Response:
        _, body = await self._anthropic_prelude(request)
        if isinstance(body, web.Response):
            return body
        tokens = _tokens(body["messages"]) + _tokens(body.get("system", ""))
        return web.Response(body=orjson.dumps({"input_tokens": tokens}), content_type="application/json")


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
