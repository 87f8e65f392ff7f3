"""What the accounting stage costs on the response path: SSE streams and plain JSON, same run.

Accounting reads every response, so the processor switches the response body to STREAMED through
ext_proc and every SSE chunk costs a gRPC round trip; for an OpenAI stream without
`stream_options.include_usage` it also injects include_usage upstream and strips the usage chunk
and the `"usage":null` members, so such a stream gets a body mutation per chunk. Compared, against
the same replay upstream (part of this script, asyncio + uvloop, never the bottleneck; its own
figures are reported as row U, the client talking to it directly):

  A    Envoy alone: the same envoy.yaml with the ext_proc filter removed (bench_gateway.envoy_alone)
  B0   gateway without accounting: the real server's runtime, pipeline from default_stages()
       without the accounting stage (the server ends its stream after the request phases)
  B    gateway with accounting, the client asks include_usage (read-only stream, no mutations)
  B'   gateway with accounting, the client does not (edited stream: a body mutation per chunk)
  R    diagnostic: B0 plus a stage that only asks to see the response (Need.JSON | EVENTS) and does
       nothing with it: R - B0 is what reading the response through ext_proc costs, B - R what the
       accounting stage itself (parsing, records, sink) adds on top

Streams: 100 SSE events each, one event per upstream write (chunk), spaced --interval-ms-1 (5 ms)
at 1 stream and --interval-ms-64 (20 ms) at --streams (64) concurrent streams. Every event carries
the upstream's CLOCK_MONOTONIC write time and the client (this process) stamps its arrival, so
per-event latency is upstream write -> client read, free of the upstream's scheduling jitter.
"Added" figures are paired with A of the same repeat. CPU comes from /proc/<pid>/stat (per thread
for the server: event loop / gRPC threads / to_thread pool) over a steady-state window with every
stream running, divided by the chunks delivered in it (B' also counts the usage chunk the gateway
removed: it crossed gRPC too). Non-streamed: wrk at 16 connections, server CPU per request.
Warm-up, then --repeats (3) rounds in rotating order; the tables show medians.

The box is shared: before each run the bench waits for other work to calm down (< --max-others
cores) and repeats a run that others disturbed (within --quiet-budget seconds); the cores other
work still used are reported per row ("other load").

Run by hand (not part of the test suite); needs wrk (apt-get install wrk); ~6 minutes full:

    .venv/bin/python tests/bench/bench_accounting.py [--quick] [--only json|streams] [--out report.json]
        [--profile "B'"]

--profile NAME runs one more window of that configuration at --streams under py-spy
(.venv/bin/pip install py-spy) and prints where the server's CPU goes, per thread; with --only json,
a wrk run of non-streamed requests instead.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

EVENTS = 100
MODEL = "gpt-5.5"
MESSAGES = [{"role": "user", "content": "hello there, how are you today?"}]
MARK = re.compile(rb'"id":"chatcmpl-t(\d+)"')
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
STREAM_CONFIGS = ("U", "A", "B0", "R", "B", "B'")
JSON_CONFIGS = ("A", "B0", "R", "B")


def _run_loop(main: Any) -> Any:
    """uvloop when installed (the gateway's server uses it too), for the upstream and the client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# -- the replay upstream (a subprocess: `bench_accounting.py _upstream --port P`) ----------------


class UpstreamState:
    def __init__(self) -> None:
        # (write time ns, lateness vs schedule ns) per SSE event; (start ns, include_usage) per stream.
        self.events: deque[tuple[int, int]] = deque(maxlen=1_000_000)
        self.streams: deque[tuple[int, bool]] = deque(maxlen=200_000)


def _completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1767225600,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "I am fine, thank you for asking.", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 8,
                "completion_tokens": 8,
                "total_tokens": 16,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }
    )


_JSON_BODY = _completion_body()
_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(_JSON_BODY) + _JSON_BODY
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_CHUNK = (
    b'{"id":"chatcmpl-t%d","object":"chat.completion.chunk","created":1767225600,"model":"' + MODEL.encode() + b'",'
    b'"system_fingerprint":"fp_bench","choices":[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]%s}'
)


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (Envoy does not pipeline)."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(*NODELAY)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._drain()

    def _drain(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + n:
                return
            body = bytes(self.buf[end + 4 : end + 4 + n])
            del self.buf[: end + 4 + n]
            self._handle(method, target, headers, body)

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and target.startswith("/_stats"):
            q = parse_qs(urlsplit(target).query)
            out = orjson.dumps(self._stats(int(q["from"][0]), int(q["to"][0])))
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out)
            )
            return
        req = orjson.loads(body) if body else {}
        if not req.get("stream"):
            self.transport.write(_JSON_RESPONSE)
            return
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        events = int(headers.get("x-mock-events", EVENTS))
        interval_ns = int(headers.get("x-mock-interval-us", "10000")) * 1000
        self.busy = True
        self.transport.write(_SSE_HEAD)
        self._stream(events, interval_ns, include_usage)

    def _stream(self, n: int, interval_ns: int, include_usage: bool) -> None:
        """n events, the first `interval` after the headers: content chunks, the finish chunk, the
        usage-only chunk when include_usage (as OpenAI sends it, with "usage":null on all others),
        then [DONE]. Each is written when due, stamped with its write time."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        self.state.streams.append((t0, include_usage))
        content = n - 2 - (1 if include_usage else 0)
        usage_null = b',"usage":null' if include_usage else b""
        i = 0

        def send() -> None:
            nonlocal i
            tr = self.transport
            if tr is None or tr.is_closing():
                self.busy = False
                return
            now = time.monotonic_ns()
            self.state.events.append((now, now - (t0 + (i + 1) * interval_ns)))
            if i < content:
                delta = b'{"role":"assistant","content":"Hi"}' if i == 0 else b'{"content":" word"}'
                payload = _CHUNK % (now, delta, b"null", usage_null)
            elif i == content:
                payload = _CHUNK % (now, b"{}", b'"stop"', usage_null)
            elif include_usage and i == content + 1:
                payload = (
                    b'{"id":"chatcmpl-t%d","object":"chat.completion.chunk","created":1767225600,"model":"%s",'
                    b'"system_fingerprint":"fp_bench","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,'
                    b'"total_tokens":%d,"prompt_tokens_details":{"cached_tokens":0},'
                    b'"completion_tokens_details":{"reasoning_tokens":0}}}'
                ) % (now, MODEL.encode(), content, content + 8)
            else:
                payload = b"[DONE]"
            ev = b"data: " + payload + b"\n\n"
            tr.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            i += 1
            if i == n:
                tr.write(b"0\r\n\r\n")
                self.busy = False
                self._drain()
                return
            due = t0 + (i + 1) * interval_ns
            loop.call_later(max(0, due - time.monotonic_ns()) / 1e9, send)

        loop.call_later(interval_ns / 1e9, send)

    def _stats(self, t_from: int, t_to: int) -> dict[str, Any]:
        lags = sorted(lag for t, lag in self.state.events if t_from <= t < t_to)
        streams = [u for t, u in self.state.streams if t_from <= t < t_to]
        return {
            "events": len(lags),
            "lag_p50_ms": pct(lags, 50) / 1e6 if lags else None,
            "lag_p99_ms": pct(lags, 99) / 1e6 if lags else None,
            "lag_max_ms": lags[-1] / 1e6 if lags else None,
            "streams": len(streams),
            "streams_with_include_usage": sum(streams),
        }


def upstream_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    async def main() -> None:
        state = UpstreamState()
        server = await asyncio.get_running_loop().create_server(
            lambda: UpstreamProtocol(state), "127.0.0.1", args.port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    _run_loop(main())


# -- the ext_proc server (a subprocess: `bench_accounting.py _server --config C --listen L`) -----


def server_main(argv: list[str]) -> None:
    """--mode accounting: exactly `extproc serve` (cli.cmd_serve -> server.run). --mode plain: the
    same runtime and logging, the pipeline rebuilt by default_stages() without the accounting stage.
    --mode probe: plain plus ReadResponse where the accounting stage would be."""
    import logging

    from extproc import server
    from extproc.config import load_config
    from extproc.pipeline import Pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--mode", choices=("plain", "accounting", "probe"), required=True)
    p.add_argument("--thread-names", type=Path, required=True)
    args = p.parse_args(argv)
    config = load_config(args.config)

    def write_thread_names(signum: int, frame: Any) -> None:
        # On SIGUSR1 only (nothing on the request path): which OS thread is which Python thread, so
        # the bench can split the server's CPU into event loop / gRPC / to_thread workers.
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        tmp = args.thread_names.with_suffix(".tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(args.thread_names)

    signal.signal(signal.SIGUSR1, write_thread_names)
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.mode == "accounting":
        server.run(config, args.listen)
        return

    async def without_accounting() -> None:
        runtime = await server.build_runtime(config)
        pipeline = Pipeline(baseline_stages(config, runtime.store, probe=args.mode == "probe"))
        try:
            grpc_server, _ = server.create_server(config, pipeline, args.listen)
            await server._run_server(config, grpc_server, args.listen, lambda: None, None)
        finally:
            await runtime.close()

    _run_loop(without_accounting())


def baseline_stages(config: Any, store: Any, probe: bool) -> list[Any]:
    """B0's stages: default_stages() without accounting (nor limits, PII or metrics); with `probe`,
    R's: B0 plus ReadResponse where default_stages puts accounting."""
    from extproc.auth.credentials import load_provider_auth
    from extproc.auth.service import KeyService
    from extproc.stages import default_stages

    stages = default_stages(config, KeyService(store, config), load_provider_auth(config))
    assert not any(s.name == "accounting" for s in stages), "B0 must not account"
    if probe:
        stages.insert(len(stages) - 1, read_response_stage())
    return stages


def read_response_stage() -> Any:
    from extproc.pipeline import Need, RequestContext, ResponseChunk, Stage

    class ReadResponse(Stage):
        """Asks for what accounting asks for (the response's headers, JSON and SSE events) and does
        nothing with it."""

        name = "read_response"

        async def request_body(self, ctx: RequestContext) -> None:
            if ctx.route is not None:
                ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS)

        async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
            return None

    return ReadResponse()


# -- measuring ------------------------------------------------------------------------------------


def pct(sorted_values: list[float] | list[int], q: float) -> float:
    """Percentile q (0-100) of an ascending list, linear interpolation."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo))


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def box_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (OS thread name, CPU seconds) for every thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        f = st.rsplit(")", 1)[1].split()
        out[tid] = (st[st.index("(") + 1 : st.rindex(")")], (int(f[11]) + int(f[12])) / CLK)
    return out


THREAD_GROUPS = ("loop", "grpc", "pool", "other")


def thread_group(pid: int, tid: str, os_name: str, py_names: dict[str, str]) -> str:
    """loop: the main thread (event loop: all request handling, and gRPC's Cython callbacks);
    grpc: gRPC core's threads (event_engine, timer) and grpc.aio's poller thread; pool: the
    asyncio.to_thread workers (spool write + fsync, SQLite ledger, spool -> ledger moves)."""
    py = py_names.get(tid, "")
    if tid == str(pid):
        return "loop"
    if os_name.startswith(("event_engine", "grpc")) or "_poll_wrapper" in py:
        return "grpc"
    if py.startswith(("uvloop_", "asyncio_", "ThreadPoolExecutor")):
        return "pool"
    return "other"


@dataclass
class Meter:
    """CPU of the processes one configuration runs on, and of the machine, for what *other* work on
    the box (not this bench) takes while we measure: the box is shared, and that noise is reported."""

    named: dict[str, int]
    bench: list[int]
    server: int | None
    thread_names: Path | None = None

    def snap(self) -> dict[str, Any]:
        s: dict[str, Any] = {n: cpu_seconds(p) for n, p in self.named.items()}
        if self.server:
            s["_threads"] = thread_cpu(self.server)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished wrk runs
        s["_bench"] = sum(cpu_seconds(p) for p in self.bench) + children.ru_utime + children.ru_stime
        s["_box"] = box_busy_seconds()
        s["_t"] = time.monotonic()
        return s

    def py_thread_names(self) -> dict[str, str]:
        """Asks the server (SIGUSR1) which thread is which; {} when it does not answer."""
        if not self.server or self.thread_names is None:
            return {}
        self.thread_names.unlink(missing_ok=True)
        os.kill(self.server, signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if self.thread_names.exists():
                return dict(json.loads(self.thread_names.read_text()))
            time.sleep(0.01)
        return {}

    def used(self, a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, float], float]:
        used, others = cpu_used(a, b)
        if self.server:
            names = self.py_thread_names()
            groups = dict.fromkeys(THREAD_GROUPS, 0.0)
            for tid, (os_name, cpu) in b["_threads"].items():
                groups[thread_group(self.server, tid, os_name, names)] += cpu - a["_threads"].get(tid, ("", 0.0))[1]
            used.update({f"server.{k}": v for k, v in groups.items()})
        return used, others


def cpu_used(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Per-process CPU seconds between two snaps, and the cores other work on the box used."""
    wall = b["_t"] - a["_t"]
    used = {k: b[k] - a[k] for k in a if not k.startswith("_")}
    others = max(0.0, ((b["_box"] - a["_box"]) - (b["_bench"] - a["_bench"])) / wall)
    return used, others


class Quiet:
    """Waits for the box to be quiet before each run and repeats a run (at most twice) that other
    work disturbed, keeping the least disturbed; `budget_s` bounds the time spent on this."""

    def __init__(self, threshold: float, budget_s: float) -> None:
        self.threshold = threshold
        self.budget_s = budget_s
        self.spent = 0.0  # waiting for quiet plus repeated runs
        self.waited = 0.0
        self.retries = 0

    def wait(self, meter: Meter) -> float:
        t0 = time.monotonic()
        while True:
            a = meter.snap()
            time.sleep(0.3)
            _, others = cpu_used(a, meter.snap())
            # The first 0.3 s sample is part of every run; only longer waits count against the budget.
            waited = time.monotonic() - t0
            if others < self.threshold or self.spent + waited > self.budget_s:
                break
        self.spent += max(0.0, waited - 0.3)
        self.waited += waited
        return others

    def measure(self, meter: Meter, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        best: dict[str, Any] | None = None
        for attempt in range(3):
            before = self.wait(meter)
            t0 = time.monotonic()
            r = run()
            if attempt:
                self.spent += time.monotonic() - t0
            r["attempt"] = attempt
            r["others_before_cores"] = before
            if best is None or r["others_cores"] < best["others_cores"]:
                best = r
            if r["others_cores"] <= self.threshold or self.spent > self.budget_s:
                break
            self.retries += 1
            print(f"    (other work on the box used {r['others_cores']:.2f} cores: again)", file=sys.stderr)
        assert best is not None
        return best


class Response:
    """One HTTP/1.1 response read incrementally: status, first byte, SSE events as they arrive."""

    __slots__ = (
        "body",
        "buf",
        "chunked",
        "done",
        "events",
        "first_ns",
        "head_done",
        "http_chunks",
        "need",
        "pending",
        "remaining",
        "sent_ns",
        "status",
    )

    def __init__(self, keep_body: bool) -> None:
        self.sent_ns = 0
        self.first_ns = 0
        self.status = 0
        self.head_done = False
        self.chunked = False
        self.remaining = 0
        self.need: int | None = None
        self.buf = bytearray()
        self.pending = b""
        # (arrival ns, latency ns or -1 when the event carries no upstream stamp, is [DONE])
        self.events: list[tuple[int, int, bool]] = []
        self.http_chunks = 0
        self.done = False
        self.body: bytearray | None = bytearray() if keep_body else None

    def feed(self, data: bytes, now: int) -> None:
        if not self.first_ns:
            self.first_ns = now
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                m = re.search(rb"content-length:\s*(\d+)", head)
                self.remaining = int(m.group(1)) if m else 0
            self.head_done = True
        if not self.chunked:
            take = min(len(buf), self.remaining)
            if take:
                self._body(bytes(buf[:take]), now)
                del buf[:take]
                self.remaining -= take
            self.done = self.remaining == 0
            return
        while True:
            if self.need is None:
                j = buf.find(b"\r\n")
                if j < 0:
                    return
                size = int(bytes(buf[:j]).split(b";")[0], 16)
                if size == 0:
                    if len(buf) < j + 4:  # "0\r\n\r\n" (Envoy sends no trailers here)
                        return
                    del buf[: j + 4]
                    self.done = True
                    return
                del buf[: j + 2]
                self.need = size
            if len(buf) < self.need + 2:
                return
            piece = bytes(buf[: self.need])
            del buf[: self.need + 2]
            self.need = None
            self.http_chunks += 1
            self._body(piece, now)

    def _body(self, piece: bytes, now: int) -> None:
        if self.body is not None:
            self.body += piece
        parts = (self.pending + piece).split(b"\n\n")
        self.pending = parts.pop()
        for ev in parts:
            if not ev:
                continue
            m = MARK.search(ev)
            self.events.append((now, now - int(m.group(1)) if m else -1, ev.startswith(b"data: [DONE]")))


class ClientConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.fut: asyncio.Future[Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        transport.get_extra_info("socket").setsockopt(*NODELAY)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        r = self.resp
        if r is None:
            return
        r.feed(data, now)
        if r.done and self.fut is not None:
            fut, self.resp, self.fut = self.fut, None, None
            fut.set_result(r)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection closed mid-response: {exc}"))

    async def request(self, raw: bytes, keep_body: bool = False) -> Response:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.resp = Response(keep_body)
        self.resp.sent_ns = time.monotonic_ns()
        self.transport.write(raw)
        return await self.fut


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n{head}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def stream_body(include_usage: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "stream": True, "messages": MESSAGES}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


@dataclass
class Target:
    name: str
    port: int
    key: str
    include_usage: bool  # what the client sends
    strips_usage: bool  # the gateway removes the usage chunk from what the client gets
    server_pid: int | None
    envoy_pid: int | None
    description: str


async def upstream_stats(port: int, t_from: int, t_to: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_connection(ClientConn, "127.0.0.1", port)
    try:
        raw = f"GET /_stats?from={t_from}&to={t_to} HTTP/1.1\r\nhost: up\r\n\r\n".encode()
        r = await proto.request(raw, keep_body=True)
        assert r.body is not None
        return dict(orjson.loads(bytes(r.body)))
    finally:
        tr.close()


async def stream_run(
    t: Target,
    upstream: int,
    meter: Meter,
    streams: int,
    interval_ms: float,
    window_s: float,
    on_window: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`streams` connections, each running 100-event streams back to back; starts are spread over
    one stream's duration so arrivals do not come in lockstep. Figures cover [w0, w1): all
    connections busy. Returns per-run figures."""
    loop = asyncio.get_running_loop()
    raw = http_request(
        "/v1/chat/completions",
        stream_body(t.include_usage),
        {
            "authorization": f"Bearer {t.key}",
            "x-mock-events": str(EVENTS),
            "x-mock-interval-us": str(int(interval_ms * 1000)),
        },
    )
    stream_s = EVENTS * interval_ms / 1000
    spread = stream_s if streams > 1 else 0.0
    start = time.monotonic_ns()
    w0 = start + int((spread + 0.25) * 1e9)
    w1 = w0 + int(window_s * 1e9)
    responses: list[Response] = []
    snaps: list[dict[str, float]] = []

    async def worker(k: int) -> None:
        await asyncio.sleep(spread * k / streams)
        tr, proto = await loop.create_connection(ClientConn, "127.0.0.1", t.port)
        try:
            first = True
            while time.monotonic_ns() < w1:
                r = await proto.request(raw, keep_body=first and k == 0)
                first = False
                if r.status != 200:
                    raise RuntimeError(f"{t.name}: HTTP {r.status}")
                responses.append(r)
        finally:
            tr.close()

    async def sampler() -> None:
        await asyncio.sleep(max(0, w0 - time.monotonic_ns()) / 1e9)
        snaps.append(meter.snap())
        if on_window is not None:
            on_window("start")
        await asyncio.sleep(max(0, w1 - time.monotonic_ns()) / 1e9)
        snaps.append(meter.snap())

    await asyncio.gather(sampler(), *(worker(k) for k in range(streams)))
    up = await upstream_stats(upstream, w0, w1)

    lat: list[int] = []
    n_events = n_done = 0
    ttfb: list[int] = []
    for r in responses:
        if w0 <= r.sent_ns < w1:
            ttfb.append(r.first_ns - r.sent_ns)
        for at, latency, done in r.events:
            if w0 <= at < w1:
                n_events += 1
                n_done += done
                if latency >= 0:
                    lat.append(latency)
    lat.sort()
    ttfb.sort()
    # Chunks that crossed Envoy (and gRPC, for the gateway): what the client got, plus in B' the
    # usage chunk the gateway removed (one per stream, right before [DONE]).
    chunks = n_events + (n_done if t.strips_usage else 0)
    wall = (w1 - w0) / 1e9
    used, others = meter.used(*snaps)
    all_events = sum(len(r.events) for r in responses)
    all_http_chunks = sum(r.http_chunks for r in responses)
    check = verify(t, next(r for r in responses if r.body is not None))
    # Every stream must reach the upstream with include_usage: asked by the client, or (B') injected.
    check["upstream_include_usage"] = up["streams"] > 0 and up["streams_with_include_usage"] == up["streams"]
    check["ok"] = check["ok"] and check["upstream_include_usage"]
    return {
        "config": t.name,
        "streams": streams,
        "interval_ms": interval_ms,
        "window_s": wall,
        "responses": len(responses),
        "events_in_window": n_events,
        "chunks_in_window": chunks,
        "event_ms": {
            "p50": pct(lat, 50) / 1e6,
            "p90": pct(lat, 90) / 1e6,
            "p99": pct(lat, 99) / 1e6,
            "max": lat[-1] / 1e6 if lat else None,
        },
        "ttfb_ms": {"p50": pct(ttfb, 50) / 1e6, "p99": pct(ttfb, 99) / 1e6, "n": len(ttfb)},
        "cpu_s": used,
        "cpu_busy_fraction": {n: c / wall for n, c in used.items()},
        "cpu_us_per_chunk": {n: c / chunks * 1e6 for n, c in used.items()} if chunks else {},
        "others_cores": others,
        "events_per_client_http_chunk": all_events / all_http_chunks if all_http_chunks else None,
        "upstream": up,
        "check": check,
    }


def verify(t: Target, r: Response) -> dict[str, Any]:
    """The stream each configuration must deliver: A, B0, B pass the upstream's bytes (100 events,
    the usage chunk included); B' must show the client no usage at all (99 events)."""
    assert r.body is not None
    body = bytes(r.body)
    n = len([e for e in body.split(b"\n\n") if e.strip()])
    has_usage = b'"usage"' in body
    want_usage = t.include_usage
    want_n = EVENTS - (1 if t.strips_usage else 0)
    ok = has_usage == want_usage and n == want_n and body.rstrip().endswith(b"data: [DONE]")
    if not ok:
        print(
            f"WARNING {t.name}: stream not as expected (events {n}, want {want_n}; usage {has_usage})", file=sys.stderr
        )
    return {"ok": ok, "events": n, "usage_visible": has_usage}


def wrk_run(t: Target, meter: Meter, connections: int, duration: int, lua: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{t.port}/v1/chat/completions"
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {orjson.dumps({'model': MODEL, 'messages': MESSAGES}).decode()!r}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {t.key}"\n'
    )
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", "-s", str(lua), url], capture_output=True, check=True)
    before = meter.snap()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used, others = meter.used(before, meter.snap())
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"{t.name}: wrk saw errors:\n{out}")

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    m = re.search(r"(\d+) requests in", out)
    assert m, out
    n = int(m.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {
        "config": t.name,
        "connections": connections,
        "requests": n,
        "rps": rps,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "cpu_s": used,
        "cpu_us_per_request": {k: v / n * 1e6 for k, v in used.items()},
        "others_cores": others,
    }


# -- the stack ------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, work: Path, backend: str = "embedded", transport: str = "native", consumer: str = "in-server"
    ) -> None:
        self.work = work
        # How the servers speak to Envoy (server.transport): native (the default) or grpcio.
        self.transport = transport
        # embedded: SQLite ledger fed through the spool; redis: the production path (Redis stream +
        # aggregates by script, the consumer moving records into the SQLite ledger).
        self.backend = backend
        # redis: "in-server" (each server process runs the ledger consumer, the default) or "apart"
        # (ledger.consumer false; `extproc db consume` beside the accounting gateway, its CPU reported
        # on its own).
        self.consumer = consumer
        self.consumer_pid: int | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stacks: list[Any] = []
        self.logs: list[Any] = []
        self.thread_names: dict[int, Path] = {}

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115  # closed in stop()
        self.logs.append(log)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=full_env)
        self.procs.append(proc)
        return proc

    def start(self) -> tuple[dict[str, Target], int, int]:
        from extproc import envoyconf
        from extproc.devstack import free_port, http_ok, tcp_open, wait_until
        from tests.bench.bench_gateway import envoy_alone
        from tests.e2e.conftest import PROVIDER_KEYS, make_stack

        me = str(Path(__file__).resolve())
        up_port = free_port()
        up = self.spawn("upstream", [sys.executable, me, "_upstream", "--port", str(up_port)])
        wait_until("replay upstream", lambda: tcp_open(up_port), [up], 30)

        redis_url: str | None = None
        if self.backend == "redis":
            redis_port = free_port()
            redis = self.spawn(
                "redis",
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            )
            wait_until("redis", lambda: tcp_open(redis_port), [redis], 30)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        gateways: dict[str, tuple[str, int, int, int]] = {}
        for mode in ("plain", "accounting", "probe"):
            name = f"gw-{mode}"
            ports = envoyconf.LocalPorts(listener=free_port(), admin=free_port(), extproc=free_port(), mock=up_port)
            stack, admin = make_stack(
                self.work / name,
                redis_url,
                prefix=f"{name}:",
                overrides={
                    "server": {"transport": self.transport},
                    **({"ledger": {"consumer": False}} if self.consumer == "apart" else {}),
                },
                ports=ports,
                with_mock=False,
                with_server=False,
            )
            secret, _ = admin.key("bench", name)
            srv = self.spawn(
                f"server-{name}",
                [
                    sys.executable,
                    me,
                    "_server",
                    "--config",
                    str(admin.config_path),
                    "--listen",
                    f"127.0.0.1:{ports.extproc}",
                    "--mode",
                    mode,
                    "--thread-names",
                    str(self.work / f"{name}-threads.json"),
                ],
                env={**PROVIDER_KEYS, **({"REDIS_URL": redis_url} if redis_url else {})},
            )
            self.thread_names[srv.pid] = self.work / f"{name}-threads.json"
            wait_until(f"server {name}", functools.partial(tcp_open, ports.extproc), [srv], 30)
            self.stacks.append(stack)
            stack.start()
            gateways[mode] = (secret, ports.listener, srv.pid, stack.procs["envoy"].pid)
            if self.consumer == "apart" and mode == "accounting":
                assert redis_url is not None
                consumer = self.spawn(
                    "consumer",
                    [sys.executable, "-m", "extproc", "db", "consume", "--config", str(admin.config_path)],
                    env={"REDIS_URL": redis_url},
                )
                self.consumer_pid = consumer.pid

        alone_ports = envoyconf.LocalPorts(listener=free_port(), admin=free_port(), extproc=free_port(), mock=up_port)
        alone_cfg = envoy_alone(envoyconf.derive_local(envoyconf.load(ROOT / "envoy" / "envoy.yaml"), alone_ports))
        (self.work / "alone.yaml").write_text(envoyconf.dump(alone_cfg))
        # Same flags as devstack.Stack starts the gateway's Envoy with, access log to a file too.
        alone = self.spawn(
            "envoy-alone",
            [
                envoyconf.envoy_binary(),
                "-c",
                str(self.work / "alone.yaml"),
                "--concurrency",
                "2",
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "100",
            ],
        )
        wait_until("envoy alone", lambda: http_ok(f"http://127.0.0.1:{alone_ports.admin}/ready"), [alone], 30)

        provider_key = PROVIDER_KEYS["OPENAI_API_KEY"]
        plain_key, plain_port, plain_srv, plain_envoy = gateways["plain"]
        acc_key, acc_port, acc_srv, acc_envoy = gateways["accounting"]
        probe_key, probe_port, probe_srv, probe_envoy = gateways["probe"]
        targets = {
            "U": Target("U", up_port, provider_key, True, False, None, None, "replay upstream, direct (no Envoy)"),
            "A": Target("A", alone_ports.listener, provider_key, True, False, None, alone.pid, "Envoy alone"),
            "B0": Target(
                "B0", plain_port, plain_key, True, False, plain_srv, plain_envoy, "gateway without accounting"
            ),
            "B": Target(
                "B", acc_port, acc_key, True, False, acc_srv, acc_envoy, "accounting, client asks include_usage"
            ),
            "B'": Target(
                "B'", acc_port, acc_key, False, True, acc_srv, acc_envoy, "accounting, no include_usage (edited)"
            ),
            "R": Target(
                "R",
                probe_port,
                probe_key,
                True,
                False,
                probe_srv,
                probe_envoy,
                "B0 + a stage that only reads the response",
            ),
        }
        return targets, up_port, up.pid

    def stop(self) -> None:
        for stack in self.stacks:
            stack.stop()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in self.logs:
            log.close()

    def meter(self, t: Target, up_pid: int) -> Meter:
        named = {"upstream": up_pid, "client": os.getpid()}
        if t.server_pid:
            named["server"] = t.server_pid
        if t.envoy_pid:
            named["envoy"] = t.envoy_pid
        if self.consumer_pid and t.name in ("B", "B'"):
            named["consumer"] = self.consumer_pid
        every = [p.pid for p in self.procs] + [p.pid for st in self.stacks for p in st.procs.values()]
        names = self.thread_names.get(t.server_pid) if t.server_pid else None
        return Meter(named, [*every, os.getpid()], t.server_pid, names)


# -- profile --------------------------------------------------------------------------------------


# Frames every sample of a thread has (the process's and threads' entry points): not informative.
_ROOT_FRAMES = ("<module> (", "main (", "server_main (", "run (", "Runner.run (", "Thread.", "_worker (")


def summarize_profile(raw: Path, top: int = 18) -> dict[str, Any]:
    """py-spy --threads --format raw: 'thread;frame;...;leaf count' per line. Per thread (busy
    threads only): own time per leaf function and inclusive time per function."""
    own: dict[str, Counter[str]] = {}
    incl: dict[str, Counter[str]] = {}
    per_thread: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        frames = [f.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "") for f in frames]
        per_thread[thread] += n
        if frames:
            own.setdefault(thread, Counter())[frames[-1]] += n
        for f in set(frames):
            if not f.startswith(_ROOT_FRAMES):
                incl.setdefault(thread, Counter())[f] += n
    total = sum(per_thread.values())
    threads = []
    for thread, n in per_thread.most_common():
        if n < 0.05 * total:
            continue
        threads.append(
            {
                "thread": thread,
                "share": round(100 * n / total, 1),
                "own": [(f, round(100 * k / n, 1)) for f, k in own.get(thread, Counter()).most_common(top)],
                "inclusive": [(f, round(100 * k / n, 1)) for f, k in incl.get(thread, Counter()).most_common(top + 8)],
            }
        )
    return {"samples": total, "threads": threads}


# -- main -----------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def git_state() -> dict[str, Any]:
    """Which code was measured: other people edit the tree while benches run."""

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--porcelain").splitlines()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        upstream_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, short windows (~1.5 minutes)")
    parser.add_argument(
        "--backend", choices=("embedded", "redis"), default="embedded", help="store backend of the gateways"
    )
    parser.add_argument(
        "--transport", choices=("native", "grpcio"), default="native", help="how the servers speak to Envoy"
    )
    parser.add_argument("--out", type=Path, help="JSON report path (default: in the bench's tmp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval-ms-1", type=float, default=5.0, help="event spacing at 1 stream")
    parser.add_argument(
        "--interval-ms-64", type=float, default=20.0, help="event spacing at --streams (20 ms: a 50 token/s model)"
    )
    parser.add_argument("--streams", type=int, default=64, help="the 'many streams' level")
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured per stream run")
    parser.add_argument("--wrk-duration", type=int, default=5)
    parser.add_argument("--wrk-connections", type=int, default=16)
    parser.add_argument(
        "--max-others", type=float, default=0.3, help="cores other work may use during a run before it is repeated"
    )
    parser.add_argument(
        "--quiet-budget", type=float, default=120, help="seconds at most spent waiting for quiet / repeating runs"
    )
    parser.add_argument("--profile", metavar="CONFIG", help="profile the server under CONFIG at --streams (py-spy)")
    parser.add_argument("--only", choices=("streams", "json"), help="run only the stream or the non-streamed part")
    parser.add_argument(
        "--consumer",
        choices=("in-server", "apart"),
        default="in-server",
        help="redis backend: the ledger consumer in each server (default) or `extproc db consume` apart",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.window, args.wrk_duration, args.quiet_budget = 1, 2.0, 2, 20
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if args.consumer == "apart" and args.backend != "redis":
        raise SystemExit("--consumer apart needs --backend redis (the embedded backend has no consumer)")
    if args.profile and args.profile not in ("B0", "R", "B", "B'"):
        raise SystemExit("--profile takes a gateway configuration: B0, R, B or B'")
    if (
        args.profile
        and shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}") is None
    ):
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")

    work = Path(tempfile.mkdtemp(prefix="bench-accounting-"))
    out_path = args.out or work / "report.json"
    bench = Bench(work, args.backend, args.transport, args.consumer)
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {
            "events_per_stream": EVENTS,
            "interval_ms": {"1": args.interval_ms_1, str(args.streams): args.interval_ms_64},
            "window_s": args.window,
            "repeats": args.repeats,
            "backend": args.backend,
            "consumer": args.consumer,
            "transport": args.transport,
            "wrk": {"connections": args.wrk_connections, "duration_s": args.wrk_duration},
        },
        "workdir": str(work),
        "code": git_state(),
    }
    try:
        targets, up_port, up_pid = bench.start()
        report["configs"] = {n: t.description for n, t in targets.items()}
        run_streams, run_json = args.only != "json", args.only != "streams"
        stream_names = list(STREAM_CONFIGS) if run_streams else []
        levels = [(1, args.interval_ms_1), (args.streams, args.interval_ms_64)]

        quiet = Quiet(args.max_others, args.quiet_budget)
        print(f"warm-up ({work})", file=sys.stderr)
        for name in stream_names:
            t = targets[name]
            _run_loop(stream_run(t, up_port, bench.meter(t, up_pid), args.streams, args.interval_ms_64, 0.5))
        stream_runs: list[dict[str, Any]] = []
        for rep in range(args.repeats if run_streams else 0):
            for n_streams, interval in levels:
                # Rotate the order each repeat: drift on a shared box does not favour one config.
                order = stream_names[rep % len(stream_names) :] + stream_names[: rep % len(stream_names)]
                for name in order:
                    t = targets[name]
                    meter = bench.meter(t, up_pid)

                    def one(t: Target = t, meter: Meter = meter, n: int = n_streams, iv: float = interval) -> Any:
                        return _run_loop(stream_run(t, up_port, meter, n, iv, args.window))

                    r = quiet.measure(meter, one)
                    r["repeat"] = rep
                    stream_runs.append(r)
                    cpu = r["cpu_us_per_chunk"].get("server")
                    print(
                        f"  rep {rep} {name:3} x{n_streams:<3} event p50 {r['event_ms']['p50']:.3f} ms "
                        f"p99 {r['event_ms']['p99']:.3f} ms ttfb {r['ttfb_ms']['p50']:.2f} ms "
                        f"server {'-' if cpu is None else f'{cpu:.0f} us/chunk'} "
                        f"({r['chunks_in_window']} chunks, others {r['others_cores']:.2f} cores)",
                        file=sys.stderr,
                    )
        report["stream_runs"] = stream_runs

        json_runs: list[dict[str, Any]] = []
        for rep in range(args.repeats if run_json else 0):
            for name in JSON_CONFIGS if rep % 2 == 0 else JSON_CONFIGS[::-1]:
                t = targets[name]
                meter = bench.meter(t, up_pid)

                def one_json(t: Target = t, meter: Meter = meter) -> dict[str, Any]:
                    return wrk_run(t, meter, args.wrk_connections, args.wrk_duration, work / "post.lua")

                r = quiet.measure(meter, one_json)
                r["repeat"] = rep
                json_runs.append(r)
                cpu = r["cpu_us_per_request"].get("server")
                print(
                    f"  rep {rep} {name:3} JSON x{args.wrk_connections}: {r['rps']:.0f} req/s p50 {r['p50_ms']:.2f} ms "
                    f"server {'-' if cpu is None else f'{cpu:.0f} us/req'} (others {r['others_cores']:.2f} cores)",
                    file=sys.stderr,
                )
        report["json_runs"] = json_runs

        if args.profile:
            t = targets[args.profile]
            report["profile"] = run_profile(t, up_port, bench.meter(t, up_pid), quiet, args, work)

        summary = summarize(report, args)
        report["summary"] = summary
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["quiet"] = {
            "waited_s": round(quiet.waited, 1),
            "repeated_runs": quiet.retries,
            "budget_used": quiet.spent >= quiet.budget_s,
        }
        print_tables(report, args)
    finally:
        bench.stop()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON report: {out_path}", file=sys.stderr)


def run_profile(
    t: Target, up_port: int, meter: Meter, quiet: Quiet, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    assert t.server_pid, "profile a gateway configuration (B0, B or B')"
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert py_spy is not None
    raw = work / "profile.txt"
    procs: list[subprocess.Popen[bytes]] = []
    seconds = max(2, int(args.window) - 1)

    def on_window(_: str) -> None:
        procs.append(
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(t.server_pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--threads",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    quiet.wait(meter)
    if args.only == "json":
        # Non-streamed requests instead: wrk for the window plus a second, py-spy once it runs.
        timer = threading.Timer(1.0, on_window, ("start",))
        timer.start()
        run = wrk_run(t, meter, args.wrk_connections, seconds + 2, work / "post.lua")
        timer.join()
        kept = ("rps", "p50_ms", "cpu_us_per_request", "others_cores")
    else:
        run = _run_loop(stream_run(t, up_port, meter, args.streams, args.interval_ms_64, args.window, on_window))
        kept = ("event_ms", "cpu_us_per_chunk", "chunks_in_window", "others_cores")
    for p in procs:
        p.wait(60)
    prof: dict[str, Any] = summarize_profile(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
    prof["config"] = t.name
    prof["run"] = {k: run[k] for k in kept}
    return prof


def summarize(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    runs = report["stream_runs"]
    levels = sorted({r["streams"] for r in runs})
    stream: dict[str, dict[str, Any]] = {}
    for n in levels:
        by_rep_a = {r["repeat"]: r for r in runs if r["config"] == "A" and r["streams"] == n}
        for name in STREAM_CONFIGS:
            rs = [r for r in runs if r["config"] == name and r["streams"] == n]
            row: dict[str, Any] = {
                "event_p50_ms": med([r["event_ms"]["p50"] for r in rs]),
                "event_p99_ms": med([r["event_ms"]["p99"] for r in rs]),
                "ttfb_p50_ms": med([r["ttfb_ms"]["p50"] for r in rs]),
                # Paired with A of the same repeat, then the median over repeats.
                "added_p50_ms": med([r["event_ms"]["p50"] - by_rep_a[r["repeat"]]["event_ms"]["p50"] for r in rs]),
                "added_p99_ms": med([r["event_ms"]["p99"] - by_rep_a[r["repeat"]]["event_ms"]["p99"] for r in rs]),
                "added_ttfb_ms": med([r["ttfb_ms"]["p50"] - by_rep_a[r["repeat"]]["ttfb_ms"]["p50"] for r in rs]),
                "events_per_http_chunk": med([r["events_per_client_http_chunk"] for r in rs]),
                "chunks_per_run": med([r["chunks_in_window"] for r in rs]),
                "upstream_lag_p99_ms": med([r["upstream"]["lag_p99_ms"] for r in rs]),
                "checks_ok": all(r["check"]["ok"] for r in rs),
                "others_cores": med([r["others_cores"] for r in rs]),
            }
            for proc in ("server", *(f"server.{g}" for g in THREAD_GROUPS), "envoy", "upstream", "client"):
                vals = [r["cpu_us_per_chunk"].get(proc) for r in rs]
                if all(v is not None for v in vals):
                    row[f"{proc}_cpu_us_per_chunk"] = med(vals)
                    row[f"{proc}_busy"] = med([r["cpu_busy_fraction"][proc] for r in rs])
            stream[f"{name}@{n}"] = row
    jr = report["json_runs"]
    json_rows: dict[str, Any] = {}
    for name in JSON_CONFIGS:
        rs = [r for r in jr if r["config"] == name]
        json_rows[name] = {
            "rps": med([r["rps"] for r in rs]),
            "p50_ms": med([r["p50_ms"] for r in rs]),
            "p99_ms": med([r["p99_ms"] for r in rs]),
            "server_cpu_us_per_request": med([r["cpu_us_per_request"].get("server") for r in rs]),
            **{
                f"server_{g}_cpu_us_per_request": med([r["cpu_us_per_request"].get(f"server.{g}") for r in rs])
                for g in THREAD_GROUPS
            },
            "envoy_cpu_us_per_request": med([r["cpu_us_per_request"].get("envoy") for r in rs]),
            "consumer_cpu_us_per_request": med([r["cpu_us_per_request"].get("consumer") for r in rs]),
            "others_cores": med([r["others_cores"] for r in rs]),
        }

    def json_diff(a: str, b: str) -> float:
        """Server CPU per request of a minus b, paired by repeat, median."""
        by = {r["repeat"]: r for r in jr if r["config"] == b}
        return med(
            [
                r["cpu_us_per_request"]["server"] - by[r["repeat"]]["cpu_us_per_request"]["server"]
                for r in jr
                if r["config"] == a and r["repeat"] in by
            ]
        )

    def stream_diff(a: str, b: str, n: int) -> float:
        """Server CPU per chunk of a minus b at n streams, paired by repeat, median."""
        rs = [r for r in runs if r["streams"] == n]
        by = {r["repeat"]: r for r in rs if r["config"] == b}
        return med(
            [
                r["cpu_us_per_chunk"]["server"] - by[r["repeat"]]["cpu_us_per_chunk"]["server"]
                for r in rs
                if r["config"] == a and r["repeat"] in by
            ]
        )

    added_cpu = json_diff("B", "B0")
    breakdown = {
        "non-streamed, µs per request": {
            "reading the response through ext_proc (R - B0)": json_diff("R", "B0"),
            "the accounting stage itself (B - R)": json_diff("B", "R"),
        },
        **{
            f"SSE at {n} stream(s), µs per chunk": {
                "reading the response through ext_proc (R - B0)": stream_diff("R", "B0", n),
                "the accounting stage itself (B - R)": stream_diff("B", "R", n),
                "editing the stream (B' - B)": stream_diff("B'", "B", n),
            }
            for n in levels
        },
    }
    floors = []
    for name in ("B", "B'"):
        for n in levels:
            v = stream[f"{name}@{n}"]["added_p50_ms"]
            floors.append(
                {
                    "floor": f"{name}: added per-event p50 <= 0.5 ms at {n} stream(s)",
                    "value": round(v, 3),
                    "unit": "ms",
                    "met": v <= 0.5,
                }
            )
    for name in ("B", "B'") if levels else ():
        many = max(levels)
        v = stream[f"{name}@{many}"]["server_cpu_us_per_chunk"]
        floors.append(
            {
                "floor": f"{name}: server CPU <= 80 us per chunk at {many} streams",
                "value": round(v, 1),
                "unit": "us",
                "met": v <= 80,
            }
        )
    if report["json_runs"]:
        floors.append(
            {
                "floor": "non-streamed: accounting adds <= 0.2 ms server CPU per request (B - B0)",
                "value": round(added_cpu, 1),
                "unit": "us",
                "met": added_cpu <= 200,
            }
        )
    return {
        "stream": stream,
        "json": json_rows,
        "json_added_server_cpu_us": added_cpu,
        "server_cpu_breakdown": breakdown,
        "floors": floors,
    }


def print_tables(report: dict[str, Any], args: argparse.Namespace) -> None:
    s = report["summary"]
    st = s["stream"]
    levels = sorted({r["streams"] for r in report["stream_runs"]})

    def f(v: Any, fmt: str = ".3f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    if levels:
        print()
        print(
            f"### SSE, {EVENTS} events per stream, one event per chunk "
            f"(spacing {args.interval_ms_1:g} ms at 1 stream, {args.interval_ms_64:g} ms at {args.streams}); "
            f"median of {args.repeats} run(s) of {args.window:g} s"
        )
        print()
        print(
            "| config | streams | event p50 ms | event p99 ms | added p50 ms | added p99 ms | TTFB p50 ms "
            "| added TTFB ms | server CPU µs/chunk | (loop / gRPC threads / to_thread pool) | server busy "
            "| Envoy CPU µs/chunk | upstream CPU µs/chunk | events/HTTP chunk | other load (cores) | ok |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
        for n in levels:
            for name in STREAM_CONFIGS:
                r = st[f"{name}@{n}"]
                base = name in ("U", "A")
                split = (
                    " / ".join(f(r.get(f"server.{k}_cpu_us_per_chunk"), ".0f") for k in ("loop", "grpc", "pool"))
                    if "server_cpu_us_per_chunk" in r
                    else "-"
                )
                print(
                    f"| {name} | {n} | {f(r['event_p50_ms'])} | {f(r['event_p99_ms'])} "
                    f"| {'-' if base else f(r['added_p50_ms'])} | {'-' if base else f(r['added_p99_ms'])} "
                    f"| {f(r['ttfb_p50_ms'], '.2f')} | {'-' if base else f(r['added_ttfb_ms'], '.2f')} "
                    f"| {f(r.get('server_cpu_us_per_chunk'), '.0f')} | {split} | {f(r.get('server_busy'), '.0%')} "
                    f"| {f(r.get('envoy_cpu_us_per_chunk'), '.0f')} | {f(r.get('upstream_cpu_us_per_chunk'), '.1f')} "
                    f"| {f(r['events_per_http_chunk'], '.2f')} | {f(r['others_cores'], '.2f')} "
                    f"| {'yes' if r['checks_ok'] else 'NO'} |"
                )
        u = st[f"U@{levels[-1]}"]
        worst_lag = max(st[f"{c}@{levels[-1]}"]["upstream_lag_p99_ms"] for c in STREAM_CONFIGS[1:])
        print()
        print(
            f"Upstream at {levels[-1]} streams: {f(u.get('upstream_cpu_us_per_chunk'), '.1f')} µs CPU per chunk, "
            f"{f(u.get('upstream_busy'), '.0%')} of a core, scheduling lag p99 {f(u['upstream_lag_p99_ms'], '.2f')} ms "
            f"(worst over configs: {f(worst_lag, '.2f')} ms)."
        )
    if s["json"]:
        print()
        print(
            f"### Non-streamed chat JSON, wrk {args.wrk_connections} connections, "
            f"median of {args.repeats} x {args.wrk_duration} s"
        )
        print()
        print(
            "| config | req/s | p50 ms | p99 ms | server CPU µs/req | (loop / gRPC threads / to_thread pool) "
            "| Envoy CPU µs/req | other load (cores) |"
        )
        print("|---|---:|---:|---:|---:|---|---:|---:|")
        for name, r in s["json"].items():
            print(
                f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {f(r['server_cpu_us_per_request'], '.0f')} | "
                + " / ".join(f(r[f"server_{k}_cpu_us_per_request"], ".0f") for k in ("loop", "grpc", "pool"))
                + f" | {f(r['envoy_cpu_us_per_request'], '.0f')} | {f(r['others_cores'], '.2f')} |"
            )
        print(
            f"\nAccounting adds {s['json_added_server_cpu_us']:.0f} µs server CPU per non-streamed request "
            "(B - B0, paired by repeat)."
        )
        apart = s["json"].get("B", {}).get("consumer_cpu_us_per_request")
        if apart is not None and not math.isnan(apart):
            print(
                f"The ledger consumer runs apart (`--consumer apart`: `extproc db consume`): {apart:.0f} µs of its "
                "CPU per request of B, not in the server's figures."
            )
    print()
    print("### Where the server CPU added by accounting goes (paired medians)")
    print()
    print("| added server CPU | " + " | ".join(k for k in s["server_cpu_breakdown"]) + " |")
    print("|---|" + "---:|" * len(s["server_cpu_breakdown"]))
    parts = list(next(iter(s["server_cpu_breakdown"].values())))
    parts += [k for k in list(s["server_cpu_breakdown"].values())[-1] if k not in parts]
    for part in parts:
        cells = [f(v.get(part), ".0f") for v in s["server_cpu_breakdown"].values()]
        print(f"| {part} | " + " | ".join(cells) + " |")
    print()
    print("### Floors")
    print()
    print("| floor | value | met |")
    print("|---|---:|---|")
    for fl in s["floors"]:
        print(f"| {fl['floor']} | {fl['value']} {fl['unit']} | {'met' if fl['met'] else 'NOT met'} |")
    q = report.get("quiet", {})
    print(
        f"\nOther work on the box: waited {q.get('waited_s', 0)} s for it to calm down, repeated "
        f"{q.get('repeated_runs', 0)} disturbed run(s)"
        f"{' (budget exhausted: later runs were not repeated)' if q.get('budget_used') else ''}; "
        "'other load' is what it still used during each kept run."
    )
    prof = report.get("profile")
    if prof and "threads" in prof:
        print()
        print(
            f"### Server profile under {prof['config']} "
            f"{'non-streamed (wrk)' if args.only == 'json' else f'at {args.streams} streams'} "
            f"(py-spy, {prof['samples']} samples of busy threads; % of that thread's samples)"
        )
        print(
            "\nOwn time in `Runner.run` / `serve_stream` is time in C under that frame: uvloop and "
            "grpc.aio's Cython (message read/write, completion queue), not Python code of the gateway."
        )
        for th in prof["threads"]:
            print(f"\n{th['thread']}: {th['share']}% of the samples\n")
            print("| own | function | | inclusive | function |")
            print("|---:|---|---|---:|---|")
            for i in range(max(len(th["own"]), len(th["inclusive"]))):
                o = th["own"][i] if i < len(th["own"]) else ("", "")
                c = th["inclusive"][i] if i < len(th["inclusive"]) else ("", "")
                print(
                    f"| {o[1]}{'%' if o[0] else ''} | {f'`{o[0]}`' if o[0] else ''} | "
                    f"| {c[1]}{'%' if c[0] else ''} | {f'`{c[0]}`' if c[0] else ''} |"
                )


if __name__ == "__main__":
    main()
