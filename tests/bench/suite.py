"""The whole gateway against Envoy alone and against LiteLLM, in one command, one process, one machine.

    .venv/bin/python tests/bench/suite.py [--duration 5] [--repeats 3] [--out DIR] [--skip-litellm]
                                          [--streams 500,1000,2000] [--litellm-venv PATH]

Writes DIR/bench-report.md and DIR/bench-report.json (DIR: a new temp dir unless given) and prints
the Markdown. Run by hand, not part of the test suite; needs wrk and redis-server.

Targets, all in front of the same upstream (the stack's mock provider, steered by x-mock-* headers):

  U   the mock provider alone (wrk straight to it). Its own req/s shows the upstream is never what
      limits the others: every other target's figures are the upstream's plus what it adds.
  A   Envoy alone, from the shipped envoy.yaml with the ext_proc filter removed (bench_gateway's
      `envoy_alone`), called with the provider key as a client calling the provider directly would.
  B   the full gateway on the Redis backend: tenant `bench` with limits that never refuse, so auth,
      limits, routing and accounting (usage records through Redis to the default SQLite ledger) run.
  B'  the same stack, tenant `bench-pii` with PII redaction (`action: mask`) and the same limits; the
      prompt holds an email address and a phone number, so the scanner finds and masks something.
  C   the LiteLLM proxy (a throwaway venv, one worker, no database) with one model on the same mock.

Figures (medians over --repeats rounds of --duration seconds; the targets' order alternates from
round to round so drift on a shared machine hits all of them alike; every target is warmed up first):

  1. sequential non-streamed (wrk -c1): p50 / p90 / p99, and what B, B', C add over A;
  2. throughput at 16 and 64 connections (wrk -t1): req/s and p50 / p99;
  3. SSE (100 output tokens), one stream at a time from an asyncio client on a keep-alive
     connection: time to first body byte (the first event) and total time; added time per event as
     (total B - total A) / events. The mock writes those events at once, so the gateway sees a few
     coalesced chunks; 3b has the mock space them 2 ms apart (one event per chunk, as a model sends
     tokens) and measures each event's lag from the mock's write (it records the time) to the client;
  4. open streams: N concurrent SSE streams through B that stay open ~4 s (20 events, 200 ms apart),
     opened over 2 s; errors, and the server's peak RSS (/proc/<pid>/status VmRSS);
  5. the server's CPU per request and per streamed event (/proc/<pid>/stat deltas over the runs);
  6. ratios B/A, B'/A and C/B; then the issue's targets, met or not.

Why wrk: a C load generator with an exact latency histogram, light enough on a 2-core machine that
the client does not become the figure; the SSE figures need per-event timing, so a small asyncio
client of raw sockets does those (uvloop when installed). Everything shares the same cores, so the
figures are relative: compare targets of one report, not reports of different machines or loads.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc import envoyconf  # noqa: E402
from extproc.devstack import Stack, free_port, http_ok, stop_process, wait_until  # noqa: E402
from extproc.ledger.sqlite import TABLE as LEDGER_TABLE  # noqa: E402
from tests.bench.bench_gateway import CHAT, STREAM, start_envoy_alone, start_redis, wrk  # noqa: E402
from tests.bench.bench_pii import cpu_seconds  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, make_stack  # noqa: E402

T = TypeVar("T")
PATH = "/v1/chat/completions"
# A few entities for the PII scanner (not documentation values, which it leaves alone by default).
ENTITIES = " Reach me at jane.doe@acme-corp.io or +1 415 867 5309 about the invoice."


def _with_entities(body: str) -> str:
    data = json.loads(body)
    data["messages"][-1]["content"] += ENTITIES
    return json.dumps(data, separators=(",", ":"))


# CHAT / STREAM of bench_gateway with the entities added; every target gets the same bodies.
BODY = _with_entities(CHAT)
STREAM_BODY = _with_entities(STREAM)
SSE_TOKENS = 100
SSE_HEADERS = {"x-mock-output-tokens": str(SSE_TOKENS)}
SPACED_DELAY_MS = 2
OPEN_HEADERS = {"x-mock-output-tokens": "20", "x-mock-chunk-delay-ms": "200"}
LIMITS = {"limits": {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000}}
OVERRIDES: dict[str, Any] = {"tenants": {"bench": LIMITS, "bench-pii": {**LIMITS, "pii": {"action": "mask"}}}}
LABELS = {
    "U": "U mock provider alone",
    "A": "A Envoy alone",
    "B": "B full gateway (Redis)",
    "BP": "B' full gateway + PII mask",
    "C": "C LiteLLM proxy",
}
SHORT = {"U": "U", "A": "A", "B": "B", "BP": "B'", "C": "C"}
WRK_ERRORS = (RuntimeError, AssertionError, subprocess.CalledProcessError)


@dataclass
class Target:
    name: str
    url: str  # the chat completions URL
    headers: dict[str, str]
    pid: int | None = None  # the process whose CPU is counted (the ext_proc server)
    # `extproc db consume` when the ledger consumer runs apart (--consumer apart): counted on its own.
    consumer_pid: int | None = None
    failed: str | None = None  # why the target was dropped (LiteLLM only)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


@dataclass
class Response:
    status: int
    t_head: float
    t_first: float | None  # first body byte
    body: bytes
    reusable: bool
    arrivals: list[tuple[int, float]]  # (end offset in body, wall-clock time) of each read


@dataclass
class Results:
    """Every run, by figure and target, and the medians the report is made of."""

    raw: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, figure: str, target: str, run: dict[str, float]) -> None:
        self.raw.setdefault(figure, {}).setdefault(target, []).append(run)

    def fail(self, figure: str, target: str, why: str) -> None:
        self.errors.setdefault(figure, {})[target] = why

    def med(self, figure: str, target: str, key: str) -> float | None:
        runs = self.raw.get(figure, {}).get(target, [])
        values = [r[key] for r in runs if key in r]
        return statistics.median(values) if values else None

    def medians(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for figure, targets in self.raw.items():
            for target, runs in targets.items():
                keys = sorted({k for r in runs for k in r})
                out.setdefault(figure, {})[target] = {
                    k: v for k in keys if (v := self.med(figure, target, k)) is not None
                }
        return out


# --- small helpers -----------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def orders(names: list[str], repeats: int) -> Iterator[list[str]]:
    """The targets' order in each round: forwards, backwards, forwards..."""
    for rnd in range(repeats):
        yield names if rnd % 2 == 0 else names[::-1]


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "mem_total_mb": int(mem.group(1)) // 1024 if mem else None,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    commit = out.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def envoy_version() -> str:
    out = subprocess.run([envoyconf.envoy_binary(), "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"version: \S+/([\d.]+)", out.stdout)
    return m.group(1) if m else out.stdout.strip()[:80]


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --- wrk ---------------------------------------------------------------------------------------


def wrk_run(
    results: Results, figure: str, t: Target, body: str, conns: int, duration: int, extra: dict[str, str] | None = None
) -> dict[str, float] | None:
    """One wrk run against `t` (its CPU per request when it has a server pid); None when it failed."""
    before = cpu_seconds(t.pid) if t.pid else 0.0
    consumer_before = cpu_seconds(t.consumer_pid) if t.consumer_pid else 0.0
    try:
        r = wrk(t.url, body, conns, duration, {**t.headers, **(extra or {})})
    except WRK_ERRORS as e:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        results.fail(figure, t.name, why)
        print(f"  {figure} {SHORT[t.name]}: failed ({why})")
        return None
    if t.pid and r["rps"] > 0:
        r["cpu_us"] = (cpu_seconds(t.pid) - before) / (r["rps"] * duration) * 1e6
    if t.consumer_pid and r["rps"] > 0:
        r["consumer_cpu_us"] = (cpu_seconds(t.consumer_pid) - consumer_before) / (r["rps"] * duration) * 1e6
    return r


def wrk_figure(
    results: Results,
    figure: str,
    targets: list[Target],
    body: str,
    conns: int,
    args: argparse.Namespace,
    extra: dict[str, str] | None = None,
) -> None:
    print(f"{figure}: wrk -c{conns}, {len(targets)} targets, {args.repeats} x {args.duration} s")
    for t in targets:
        wrk_run(Results(), figure, t, body, conns, min(2, args.duration), extra)  # warm-up
    for order in orders([t.name for t in targets], args.repeats):
        for name in order:
            t = next(x for x in targets if x.name == name)
            if t.failed or name in results.errors.get(figure, {}):
                continue
            r = wrk_run(results, figure, t, body, conns, args.duration, extra)
            if r is None:
                if t.name == "C":
                    t.failed = f"wrk failed in {figure}: {results.errors[figure]['C']}"
                continue
            results.add(figure, name, r)
            print(f"  {SHORT[name]:3} {r['rps']:8.0f} req/s  p50 {r['p50']:7.2f}  p99 {r['p99']:7.2f} ms")


# --- raw HTTP/1.1 client for SSE ---------------------------------------------------------------


def raw_request(t: Target, body: str, extra: dict[str, str], close: bool = False) -> bytes:
    data = body.encode()
    lines = [
        f"POST {urlsplit(t.url).path} HTTP/1.1",
        f"Host: {t.host}:{t.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *(f"{k}: {v}" for k, v in {**t.headers, **extra}.items()),
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    t_head = time.perf_counter()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    chunks: list[bytes] = []
    arrivals: list[tuple[int, float]] = []
    got = 0
    t_first: float | None = None
    reusable = hdrs.get("connection", "").lower() != "close"
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            data = await reader.readexactly(size + 2)
            if t_first is None:
                t_first = time.perf_counter()
            chunks.append(data[:-2])
            got += size
            arrivals.append((got, time.time()))
    elif "content-length" in hdrs:
        size = int(hdrs["content-length"])
        if size:
            chunks.append(await reader.readexactly(size))
            t_first = time.perf_counter()
    else:
        reusable = False
        while data := await reader.read(65536):
            if t_first is None:
                t_first = time.perf_counter()
            chunks.append(data)
            got += len(data)
            arrivals.append((got, time.time()))
    return Response(status, t_head, t_first, b"".join(chunks), reusable, arrivals)


def event_times(resp: Response) -> list[float]:
    """When each SSE event of `resp` was complete at the client (wall clock, as the mock records)."""
    ends = [end for end, _ in resp.arrivals]
    out: list[float] = []
    for m in re.finditer(rb"^data:", resp.body, re.M):
        end = resp.body.find(b"\n\n", m.start())
        i = bisect.bisect_left(ends, len(resp.body) if end < 0 else end + 2)
        out.append(resp.arrivals[min(i, len(ends) - 1)][1])
    return out


def count_events(body: bytes) -> int:
    return len(re.findall(rb"^data:", body, re.M))


async def sse_sequential(t: Target, duration: float, mock_url: str | None = None) -> dict[str, float]:
    """Streams of SSE_TOKENS tokens one after another on one keep-alive connection for `duration`
    seconds: medians and p90 of time to first body byte and of total time, events per stream.

    With `mock_url`, the mock spaces the events SPACED_DELAY_MS apart (one event per chunk, as a
    model producing tokens sends them) and tags each request; the mock's record of when it sent
    each event, against when the client had it, gives every event's delivery lag."""
    extra = {**SSE_HEADERS, **({"x-mock-chunk-delay-ms": str(SPACED_DELAY_MS)} if mock_url else {})}
    ttfb: list[float] = []
    total: list[float] = []
    events: list[int] = []
    lags: list[float] = []
    unmatched = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    deadline = time.perf_counter() + duration
    async with httpx.AsyncClient(trust_env=False, timeout=10) as mock:
        try:
            while time.perf_counter() < deadline or not total:
                tag = uuid.uuid4().hex
                raw = raw_request(t, STREAM_BODY, {**extra, "x-mock-tag": tag} if mock_url else extra)
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(t.host, t.port)
                t0 = time.perf_counter()
                writer.write(raw)
                await writer.drain()
                async with asyncio.timeout(30):
                    resp = await read_response(reader)
                t_end = time.perf_counter()
                if resp.status != 200 or b"[DONE]" not in resp.body or resp.t_first is None:
                    raise RuntimeError(f"{SHORT[t.name]}: bad stream (HTTP {resp.status}): {resp.body[:300]!r}")
                ttfb.append((resp.t_first - t0) * 1000)
                total.append((t_end - t0) * 1000)
                events.append(count_events(resp.body))
                if not resp.reusable:
                    writer.close()
                    reader = writer = None
                if mock_url:
                    records = (await mock.get(f"{mock_url}/_mock/requests", params={"tag": tag})).json()
                    sent: list[float] = records[0]["events_sent_at"] if records else []
                    got = event_times(resp)
                    unmatched += abs(len(sent) - len(got))
                    # In order; the last ([DONE]) with the last even when the gateway dropped an
                    # event it asked for itself (the usage chunk when the client did not ask for it).
                    n = min(len(sent), len(got))
                    pairs = [*zip(got[: n - 1], sent[: n - 1], strict=True), (got[-1], sent[-1])] if n else []
                    lags += [(a - b) * 1000 for a, b in pairs]
        finally:
            if writer is not None:
                writer.close()
    out: dict[str, float] = {
        "streams": len(total),
        "events": statistics.median(events),
        "ttfb_p50": statistics.median(ttfb),
        "ttfb_p90": pct(ttfb, 90),
        "total_p50": statistics.median(total),
        "total_p90": pct(total, 90),
    }
    if mock_url:
        if not lags:
            raise RuntimeError(f"{SHORT[t.name]}: the mock recorded no event times")
        out |= {"lag_p50": statistics.median(lags), "lag_p90": pct(lags, 90), "lag_p99": pct(lags, 99)}
        out["events_unmatched"] = unmatched
    return out


def sse_figure(
    results: Results, figure: str, targets: list[Target], args: argparse.Namespace, mock_url: str | None = None
) -> None:
    spacing = f", events {SPACED_DELAY_MS} ms apart" if mock_url else ""
    print(f"{figure}: {SSE_TOKENS}-token streams one at a time{spacing}, {args.repeats} x {args.duration} s")
    for t in targets:
        run_async(sse_sequential(t, min(2, args.duration), mock_url))  # warm-up
    for order in orders([t.name for t in targets], args.repeats):
        for name in order:
            t = next(x for x in targets if x.name == name)
            before = cpu_seconds(t.pid) if t.pid else 0.0
            try:
                r = run_async(sse_sequential(t, args.duration, mock_url))
            except (RuntimeError, OSError, TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError) as e:
                results.fail(figure, name, f"{type(e).__name__}: {e}")
                print(f"  {SHORT[name]}: failed ({e})")
                continue
            if t.pid:
                r["cpu_us_per_event"] = (cpu_seconds(t.pid) - before) / (r["streams"] * r["events"]) * 1e6
            results.add(figure, name, r)
            lag = f"  event lag p50 {r['lag_p50']:6.3f} ms" if "lag_p50" in r else ""
            print(
                f"  {SHORT[name]:3} {r['streams']:5.0f} streams of {r['events']:.0f} events  "
                f"TTFB p50 {r['ttfb_p50']:6.2f}  total p50 {r['total_p50']:7.2f} ms{lag}"
            )


# --- open streams ------------------------------------------------------------------------------


async def open_streams(t: Target, count: int, ramp: float, watch: dict[str, int]) -> dict[str, Any]:
    """`count` SSE streams through `t`, opened over `ramp` seconds, each ~20 events 200 ms apart
    (so all are open together for a while); errors by kind, most streams open at once, and the
    peak RSS of the `watch` processes while they ran."""
    raw = raw_request(t, STREAM_BODY, OPEN_HEADERS, close=True)
    errors: Counter[str] = Counter()
    state = {"open": 0, "peak_open": 0, "ok": 0}
    peak = dict.fromkeys(watch, 0)
    done = asyncio.Event()

    def sample() -> None:
        for name, pid in watch.items():
            with contextlib.suppress(OSError):
                peak[name] = max(peak[name], rss_kb(pid))

    async def sampler() -> None:
        while not done.is_set():
            sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    async def one() -> None:
        opened = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection(t.host, t.port)
                writer.write(raw)
                buf = bytearray()
                while b"\r\n\r\n" not in buf:
                    data = await reader.read(65536)
                    if not data:
                        errors["closed before the response headers"] += 1
                        return
                    buf += data
                status = int(buf.split(b" ", 2)[1])
                if status != 200:
                    errors[f"HTTP {status}"] += 1
                    return
                opened = True
                state["open"] += 1
                state["peak_open"] = max(state["peak_open"], state["open"])
                while data := await reader.read(65536):
                    buf += data
                head = bytes(buf[: buf.index(b"\r\n\r\n")]).lower()
                chunked = b"transfer-encoding: chunked" in head
                if b"[DONE]" not in buf or (chunked and not buf.endswith(b"0\r\n\r\n")):
                    errors["stream cut short"] += 1
                elif count_events(bytes(buf)) < 20:
                    errors["too few events"] += 1
                else:
                    state["ok"] += 1
        except TimeoutError:
            errors["timeout (60 s)"] += 1
        except (OSError, ValueError, IndexError) as e:
            errors[type(e).__name__] += 1
        finally:
            if opened:
                state["open"] -= 1
            if writer is not None:
                writer.close()

    started = time.perf_counter()
    watcher = asyncio.create_task(sampler())
    tasks: list[asyncio.Task[None]] = []
    batches = min(100, count)
    for i in range(batches):
        n = count * (i + 1) // batches - count * i // batches
        tasks += [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(ramp / batches)
    await asyncio.gather(*tasks)
    done.set()
    await watcher
    return {
        "streams": count,
        "ok": state["ok"],
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "peak_open": state["peak_open"],
        "seconds": time.perf_counter() - started,
        **{f"peak_rss_mb_{name}": kb / 1024 for name, kb in peak.items()},
    }


def open_streams_figure(results: Results, b: Target, stack: Stack, counts: list[int]) -> list[dict[str, Any]]:
    watch = {"server": stack.procs["server"].pid, "envoy": stack.procs["envoy"].pid}
    rows: list[dict[str, Any]] = []
    print(f"open streams through B: {', '.join(map(str, counts))}")
    for count in counts:
        before = rss_kb(watch["server"]) / 1024
        row = run_async(open_streams(b, count, 2.0, watch))
        row["rss_mb_server_before"] = before
        rows.append(row)
        kinds = ", ".join(f"{k}: {v}" for k, v in row["error_kinds"].items()) or "none"
        print(
            f"  {count:5} streams: {row['errors']} errors ({kinds}), peak open {row['peak_open']}, "
            f"server RSS {before:.0f} -> {row['peak_rss_mb_server']:.0f} MB, envoy {row['peak_rss_mb_envoy']:.0f} MB"
        )
        time.sleep(1)
    return rows


# --- LiteLLM -----------------------------------------------------------------------------------


def install_litellm(venv: Path, log: Path) -> Path:
    """`litellm[proxy]` in a venv of its own (reused when it already has litellm); the executable."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        print(f"litellm: reusing {venv}")
        return exe
    python = shutil.which("python3") or sys.executable
    print(f"litellm: creating {venv} and installing 'litellm[proxy]' from PyPI (several minutes)...")
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "pip"), "install", "--progress-bar", "off", "litellm[proxy]"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        collected, shown = 0, 0.0
        try:
            for line in proc.stdout:
                out.write(line)
                now = time.monotonic() - started
                collected += line.startswith("Collecting")
                if line.startswith("Collecting") and now - shown >= 5:
                    print(f"  [{now:4.0f} s] {collected} packages collected", flush=True)
                    shown = now
                elif line.startswith(("Installing", "ERROR")):
                    print(f"  [{now:4.0f} s] {line.rstrip()[:100]}", flush=True)
            proc.wait(1800)
        finally:
            stop_process(proc)
    if proc.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install failed with code {proc.returncode}; see {log}")
    print(f"litellm: installed in {time.monotonic() - started:.0f} s")
    return exe


def litellm_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def start_litellm(exe: Path, work: Path, mock_port: int) -> tuple[subprocess.Popen[bytes], str, str, float]:
    """LiteLLM's proxy on a free port with one model on the mock provider; (process, URL, master key,
    seconds until it answers). Recent releases refuse to start without a master key."""
    port = free_port()
    master_key = "sk-bench-" + secrets.token_hex(16)
    cfg: dict[str, Any] = {
        "model_list": [
            {
                "model_name": "gpt-5.5",
                "litellm_params": {
                    "model": "openai/gpt-5.5",
                    "api_base": f"http://127.0.0.1:{mock_port}/v1",
                    "api_key": PROVIDER_KEYS["OPENAI_API_KEY"],
                },
            }
        ],
        "general_settings": {"master_key": master_key},
    }
    (work / "litellm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    drop = ("DATABASE_URL", "LITELLM_MASTER_KEY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # The price map ships with the package: no fetch from GitHub at start-up; no proxy for loopback.
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    args = [str(exe), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    started = time.monotonic()
    with (work / "litellm.log").open("wb") as log:
        proc = subprocess.Popen(
            [*args, "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until("litellm", lambda: http_ok(f"{url}/health/liveliness"), [proc], 180)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url, master_key, time.monotonic() - started


# --- checks ------------------------------------------------------------------------------------


def check_targets(targets: list[Target], pii: Target) -> dict[str, Any]:
    """One request to each target (200 or the target is dropped / the run stops) and whether B'
    masks: the mock echoes the prompt back (x-mock-echo), so the answer shows what it received."""
    out: dict[str, Any] = {}
    with httpx.Client(trust_env=False, timeout=30) as client:
        for t in targets:
            r = client.post(t.url, content=BODY, headers={**t.headers, "content-type": "application/json"})
            if r.status_code != 200:
                why = f"HTTP {r.status_code}: {r.text[:300]}"
                if t.name == "C":
                    t.failed = f"first request failed: {why}"
                    continue
                raise RuntimeError(f"{LABELS[t.name]}: {why}")
        echo = client.post(
            pii.url, content=BODY, headers={**pii.headers, "content-type": "application/json", "x-mock-echo": "1"}
        )
        answer = echo.json()["choices"][0]["message"]["content"]
        out["pii_echo"] = answer
        out["pii_masked"] = "jane.doe@acme-corp.io" not in answer and "867 5309" not in answer
    return out


def ledger_counts(path: Path) -> dict[str, Any]:
    """Usage records in the SQLite ledger by tenant: accounting ran end to end."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute(f"SELECT tenant, count(*) FROM {LEDGER_TABLE} GROUP BY tenant").fetchall()
    except sqlite3.Error as e:
        return {"error": f"{path}: {e}"}
    return {str(tenant): int(n) for tenant, n in rows}


# --- report ------------------------------------------------------------------------------------


def f2(v: float | None, fmt: str = ".2f", sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+{fmt}}" if sign else f"{v:{fmt}}"


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def analyse(res: Results, info: dict[str, Any]) -> dict[str, Any]:
    """Derived figures: added latency, ratios, per-event costs, and the targets' verdicts."""
    m = res.med
    d: dict[str, Any] = {}
    for n in ("B", "BP", "C"):
        d[f"seq_added_p50_{n}"] = diff(m("seq", n, "p50"), m("seq", "A", "p50"))
        d[f"seq_added_p99_{n}"] = diff(m("seq", n, "p99"), m("seq", "A", "p99"))
    for n in ("B", "BP"):
        events = m("sse", n, "events")
        d[f"sse_added_ttfb_{n}"] = diff(m("sse", n, "ttfb_p50"), m("sse", "A", "ttfb_p50"))
        added = diff(m("sse", n, "total_p50"), m("sse", "A", "total_p50"))
        d[f"sse_added_per_event_{n}"] = None if added is None or not events else added / events
        for key in ("lag_p50", "lag_p90"):
            d[f"sse_spaced_added_{key}_{n}"] = diff(m("sse_spaced", n, key), m("sse_spaced", "A", key))
        for key in ("p50", "p99"):
            d[f"ratio_{n}_A_seq_{key}"] = ratio(m("seq", n, key), m("seq", "A", key))
        for c in (16, 64):
            d[f"ratio_{n}_A_rps_c{c}"] = ratio(m(f"c{c}", n, "rps"), m(f"c{c}", "A", "rps"))
            d[f"ratio_{n}_A_p50_c{c}"] = ratio(m(f"c{c}", n, "p50"), m(f"c{c}", "A", "p50"))
    for c in (16, 64):
        d[f"ratio_B_over_C_rps_c{c}"] = ratio(m(f"c{c}", "B", "rps"), m(f"c{c}", "C", "rps"))
    d["ratio_B_over_C_added_p50"] = ratio(d["seq_added_p50_B"], d["seq_added_p50_C"])

    open_rows: list[dict[str, Any]] = info.get("open_streams", [])
    clean = [r for r in open_rows if r["errors"] == 0]
    best = max(clean, key=lambda r: r["streams"]) if clean else None
    d["open_streams_max_clean"] = best["streams"] if best else None
    d["open_streams_max_clean_rss_mb"] = best["peak_rss_mb_server"] if best else None
    at_2000 = next((r for r in open_rows if r["streams"] == 2000), None)

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "NOT met"

    def le(v: float | None, limit: float) -> bool | None:
        return None if v is None else v <= limit

    def ge(v: float | None, limit: float) -> bool | None:
        return None if v is None else v >= limit

    c_note = "" if info.get("litellm_ok") else f" (C not run: {info.get('litellm_skipped', 'skipped')})"
    rps_b16 = m("c16", "B", "rps")
    targets = [
        (
            "Full pipeline, sequential: added p50 over Envoy alone",
            "≤ 1.0 ms",
            f"{f2(d['seq_added_p50_B'], sign=True)} ms",
            verdict(le(d["seq_added_p50_B"], 1.0)),
        ),
        (
            "Full pipeline, sequential: added p99 over Envoy alone",
            "≤ 3 ms",
            f"{f2(d['seq_added_p99_B'], sign=True)} ms",
            verdict(le(d["seq_added_p99_B"], 3.0)),
        ),
        (
            "One server process, non-streamed, 16 connections, full pipeline",
            "≥ 1,200 req/s",
            f"{f2(rps_b16, '.0f')} req/s",
            verdict(ge(rps_b16, 1200)),
        ),
        (
            "Throughput vs LiteLLM (B ÷ C, 16 connections)" + c_note,
            "≥ 15x",
            f"{f2(d['ratio_B_over_C_rps_c16'], '.1f')}x "
            f"({f2(rps_b16, '.0f')} vs {f2(m('c16', 'C', 'rps'), '.0f')} req/s)",
            verdict(ge(d["ratio_B_over_C_rps_c16"], 15)),
        ),
        (
            "Added p50 vs LiteLLM's (B added ÷ C added, sequential)" + c_note,
            "≤ 1/10",
            f"{f2(d['ratio_B_over_C_added_p50'], '.3f')} ({f2(d['seq_added_p50_B'], sign=True)} vs "
            f"{f2(d['seq_added_p50_C'], sign=True)} ms)",
            verdict(le(d["ratio_B_over_C_added_p50"], 0.1)),
        ),
        (
            "Streaming with accounting: added time per event, (total p50 B - A) / events (figure 3)",
            "≤ 0.5 ms",
            f"{f2(d['sse_added_per_event_B'], '.3f', sign=True)} ms",
            verdict(le(d["sse_added_per_event_B"], 0.5)),
        ),
        (
            f"Streaming with accounting: added p50 lag of each event, events {SPACED_DELAY_MS} ms apart (figure 3b)",
            "≤ 0.5 ms",
            f"{f2(d['sse_spaced_added_lag_p50_B'], '.3f', sign=True)} ms",
            verdict(le(d["sse_spaced_added_lag_p50_B"], 0.5)),
        ),
        (
            "Streaming with PII (B': action mask, answers not restored): added time per event (figure 3)",
            "≤ 1 ms",
            f"{f2(d['sse_added_per_event_BP'], '.3f', sign=True)} ms",
            verdict(le(d["sse_added_per_event_BP"], 1.0)),
        ),
        (
            f"Streaming with PII (B', mask): added p50 lag of each event, events {SPACED_DELAY_MS} ms apart (3b)",
            "≤ 1 ms",
            f"{f2(d['sse_spaced_added_lag_p50_BP'], '.3f', sign=True)} ms",
            verdict(le(d["sse_spaced_added_lag_p50_BP"], 1.0)),
        ),
        (
            "2,000 concurrent open SSE streams: errors, server RSS at the peak",
            "0 errors, ≤ 300 MB",
            "not in --streams"
            if at_2000 is None
            else f"{at_2000['errors']} errors, {at_2000['peak_rss_mb_server']:.0f} MB, "
            f"{at_2000['peak_open']} open at once",
            verdict(None if at_2000 is None else at_2000["errors"] == 0 and at_2000["peak_rss_mb_server"] <= 300),
        ),
    ]
    d["targets"] = [{"target": a, "threshold": b, "measured": c, "verdict": v} for a, b, c, v in targets]
    return d


def markdown(res: Results, info: dict[str, Any], d: dict[str, Any], names: list[str]) -> str:
    m = res.med
    args = info["settings"]
    md: list[str] = ["# Gateway benchmark suite", ""]
    md.append(f"`{info['command']}`  ")
    md.append(
        f"{info['date']} · commit `{info['git_commit']}` · {info['machine']['nproc']} CPUs "
        f"({info['machine']['cpu_model']}) · Envoy {info['envoy_version']}"
    )
    md.append("")
    md.append(
        f"Medians of {args['repeats']} alternating rounds of {args['duration']} s per target, each target warmed "
        "up first; everything (load generator included) shares this machine, so compare targets within this "
        "report, not across machines."
    )
    if args["duration"] < 5 or args["repeats"] < 3:
        md.append("")
        md.append("**Short run: these numbers are not meaningful** (use the defaults or longer).")
    md += ["", "Targets, all in front of the same mock provider:", ""]
    for n in ("U", "A", "B", "BP", "C"):
        note = {
            "U": "wrk straight to the mock (its req/s is the upstream's ceiling)",
            "A": "same envoy.yaml, ext_proc filter removed, provider key",
            "B": "tenant `bench`: auth, limits (Redis, never refusing), routing, accounting to the SQLite ledger",
            "BP": "tenant `bench-pii`: B plus PII redaction, `action: mask`; prompt with an email and a phone number",
            "C": f"LiteLLM {info.get('litellm_version', '')} proxy, 1 worker, no database",
        }[n]
        if n == "C" and not info.get("litellm_ok"):
            note = f"**not run**: {info.get('litellm_skipped', 'skipped')}"
        md.append(f"- **{LABELS[n]}**: {note}")
    if args.get("consumer") == "apart":
        md.append(
            "- the ledger consumer runs apart (`--consumer apart`: `extproc db consume` on the same Redis and "
            "machine, as k8s/ledger-consumer.yaml runs it); its CPU is in section 5, not in the server's"
        )
    if not info.get("checks", {}).get("pii_masked", True):
        md.append("- **warning**: B' prompt reached the mock unmasked (see the JSON `checks`).")
    if info.get("ledger"):
        counts = ", ".join(f"{k}: {v}" for k, v in info["ledger"].items())
        md.append(f"- usage records in the SQLite ledger after the run, by tenant: {counts}")

    md += ["", "## 1. Sequential, non-streamed (wrk -c1)", ""]
    md += [
        "| target | p50 ms | p90 ms | p99 ms | req/s | added p50 over A | added p99 over A |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        added = (
            f"{f2(d.get(f'seq_added_p50_{n}'), sign=True)} ms | {f2(d.get(f'seq_added_p99_{n}'), sign=True)} ms"
            if n in ("B", "BP", "C")
            else "| "
        )
        md.append(
            f"| {LABELS[n]} | {f2(m('seq', n, 'p50'))} | {f2(m('seq', n, 'p90'))} | {f2(m('seq', n, 'p99'))} | "
            f"{f2(m('seq', n, 'rps'), '.0f')} | {added} |"
        )

    md += ["", "## 2. Throughput, non-streamed (wrk -t1)", ""]
    md += ["| target | req/s c16 | p50 / p99 ms c16 | req/s c64 | p50 / p99 ms c64 |", "|---|---|---|---|---|"]
    for n in names:
        cells = [
            f"{f2(m(f'c{c}', n, 'rps'), '.0f')} | {f2(m(f'c{c}', n, 'p50'))} / {f2(m(f'c{c}', n, 'p99'))}"
            for c in (16, 64)
        ]
        md.append(f"| {LABELS[n]} | {cells[0]} | {cells[1]} |")
    headroom = ratio(m("c16", "U", "rps"), m("c16", "B", "rps"))
    md.append("")
    md.append(
        f"The mock alone serves {headroom:.1f}x B's req/s at 16 connections: the upstream is not what limits "
        "the gateway. wrk counts a request slower than 2 s as a timeout, outside the latency figures."
        if headroom
        else "wrk counts a request slower than 2 s as a timeout, outside the latency figures."
    )

    md += ["", f"## 3. SSE, {SSE_TOKENS} output tokens, one stream at a time (asyncio client, keep-alive)", ""]
    md += [
        "| target | streams | events | TTFB p50 ms | TTFB p90 ms | total p50 ms | total p90 ms "
        "| added TTFB | added per event |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in [x for x in names if x != "C"]:
        added = (
            f"{f2(d.get(f'sse_added_ttfb_{n}'), sign=True)} ms | "
            f"{f2(d.get(f'sse_added_per_event_{n}'), '.3f', True)} ms"
            if n in ("B", "BP")
            else "| "
        )
        md.append(
            f"| {LABELS[n]} | {f2(m('sse', n, 'streams'), '.0f')} | {f2(m('sse', n, 'events'), '.0f')} | "
            f"{f2(m('sse', n, 'ttfb_p50'))} | {f2(m('sse', n, 'ttfb_p90'))} | {f2(m('sse', n, 'total_p50'))} | "
            f"{f2(m('sse', n, 'total_p90'))} | {added} |"
        )
    md.append("")
    md.append(
        "TTFB: request written to first body byte (the first event). Added per event: (total p50 of B - total p50 "
        "of A) ÷ events in B's stream. Streams per round: as many as fit in the duration. LiteLLM is not in this "
        "figure (it does not forward the mock's x-mock-* steering headers)."
    )

    md += ["", f"## 3b. SSE, {SSE_TOKENS} output tokens {SPACED_DELAY_MS} ms apart, one stream at a time", ""]
    md += [
        "| target | streams | events | event lag p50 ms | p90 ms | p99 ms | added lag p50 | added lag p90 "
        "| total p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in [x for x in names if x != "C"]:
        added = (
            f"{f2(d.get(f'sse_spaced_added_lag_p50_{n}'), '.3f', True)} ms | "
            f"{f2(d.get(f'sse_spaced_added_lag_p90_{n}'), '.3f', True)} ms"
            if n in ("B", "BP")
            else "| "
        )
        md.append(
            f"| {LABELS[n]} | {f2(m('sse_spaced', n, 'streams'), '.0f')} | {f2(m('sse_spaced', n, 'events'), '.0f')} "
            f"| {f2(m('sse_spaced', n, 'lag_p50'), '.3f')} | {f2(m('sse_spaced', n, 'lag_p90'), '.3f')} "
            f"| {f2(m('sse_spaced', n, 'lag_p99'), '.3f')} | {added} | {f2(m('sse_spaced', n, 'total_p50'))} |"
        )
    md.append("")
    md.append(
        "In figure 3 the mock writes all events at once, so Envoy and the server see them coalesced into a few "
        "chunks and the per-event figure is the cost of a burst. Here the mock waits "
        f"{SPACED_DELAY_MS} ms between events (x-mock-chunk-delay-ms), so each event crosses the gateway on its "
        "own, as tokens from a model do. Event lag: when the client had the event minus when the mock wrote it "
        "(the mock records that time per event; same clock), over every event of every stream."
    )

    md += ["", "## 4. Open SSE streams through B (20 events 200 ms apart, opened over 2 s)", ""]
    md += ["| streams | errors | error kinds | most open at once | server RSS MB before → peak | Envoy RSS MB peak |"]
    md.append("|---|---|---|---|---|---|")
    for r in info.get("open_streams", []):
        kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items()) or "-"
        md.append(
            f"| {r['streams']} | {r['errors']} | {kinds} | {r['peak_open']} | "
            f"{r['rss_mb_server_before']:.0f} → {r['peak_rss_mb_server']:.0f} | {r['peak_rss_mb_envoy']:.0f} |"
        )
    best = d["open_streams_max_clean"]
    md.append("")
    md.append(
        f"Largest count with zero errors: **{best}**, "
        f"server RSS at its peak **{d['open_streams_max_clean_rss_mb']:.0f} MB**."
        if best
        else "No count ran without errors."
    )

    md += ["", "## 5. Server CPU (ext_proc server process, /proc/<pid>/stat)", ""]
    md += ["| load | B µs | B' µs |", "|---|---|---|"]
    for label, fig, key in (
        ("per request, non-streamed, 1 connection", "seq", "cpu_us"),
        ("per request, non-streamed, 16 connections", "c16", "cpu_us"),
        ("per request, non-streamed, 64 connections", "c64", "cpu_us"),
        (f"per streamed event, 1 stream ({SSE_TOKENS} tokens at once)", "sse", "cpu_us_per_event"),
        (
            f"per streamed event, 1 stream ({SSE_TOKENS} tokens {SPACED_DELAY_MS} ms apart)",
            "sse_spaced",
            "cpu_us_per_event",
        ),
        (f"per streamed event, 16 connections (wrk, {SSE_TOKENS} tokens)", "stream_c16", "cpu_us_per_event"),
        (f"per stream, 16 connections (wrk, {SSE_TOKENS} tokens)", "stream_c16", "cpu_us"),
    ):
        md.append(f"| {label} | {f2(m(fig, 'B', key), '.0f')} | {f2(m(fig, 'BP', key), '.0f')} |")
    if args.get("consumer") == "apart":
        md.append(
            "| the ledger consumer apart (`extproc db consume`), per request, non-streamed, 16 connections "
            f"| {f2(m('c16', 'B', 'consumer_cpu_us'), '.0f')} | {f2(m('c16', 'BP', 'consumer_cpu_us'), '.0f')} |"
        )

    md += ["", "## 6. Ratios", ""]
    md += ["| ratio | B / A | B' / A |", "|---|---|---|"]
    for label, key in (
        ("p50, sequential", "seq_p50"),
        ("p99, sequential", "seq_p99"),
        ("req/s, 16 connections", "rps_c16"),
        ("req/s, 64 connections", "rps_c64"),
        ("p50, 16 connections", "p50_c16"),
        ("p50, 64 connections", "p50_c64"),
    ):
        md.append(f"| {label} | {f2(d[f'ratio_B_A_{key}'])} | {f2(d[f'ratio_BP_A_{key}'])} |")
    md += ["", "| B against LiteLLM (C) | value |", "|---|---|"]
    md.append(f"| B req/s ÷ C req/s, 16 connections | {f2(d['ratio_B_over_C_rps_c16'], '.1f')}x |")
    md.append(f"| B req/s ÷ C req/s, 64 connections | {f2(d['ratio_B_over_C_rps_c64'], '.1f')}x |")
    md.append(
        f"| added p50 over A: B ÷ C | {f2(d['ratio_B_over_C_added_p50'], '.3f')} "
        f"({f2(d['seq_added_p50_B'], sign=True)} vs {f2(d['seq_added_p50_C'], sign=True)} ms) |"
    )
    c_over_b = ratio(d["seq_added_p50_C"], d["seq_added_p50_B"])
    md.append(f"| added p50 over A: C ÷ B (how many times more LiteLLM adds) | {f2(c_over_b, '.1f')}x |")
    if info.get("litellm_ok"):
        md.append(
            f"| LiteLLM start-up / RSS after the run | {info['litellm_startup_s']:.1f} s / "
            f"{info.get('litellm_rss_mb', 0):.0f} MB |"
        )

    md += ["", "## Targets", ""]
    md += ["| target | threshold | measured | verdict |", "|---|---|---|---|"]
    for t in d["targets"]:
        md.append(f"| {t['target']} | {t['threshold']} | {t['measured']} | {t['verdict']} |")
    if res.errors:
        md += ["", "## Failed runs", ""]
        for figure, errs in res.errors.items():
            for n, why in errs.items():
                md.append(f"- {figure} / {LABELS[n]}: {why}")
    return "\n".join(md) + "\n"


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians reported)")
    parser.add_argument("--out", type=Path, help="report directory (default: a new temp dir)")
    parser.add_argument("--skip-litellm", action="store_true", help="leave target C out")
    parser.add_argument("--streams", default="500,1000,2000", help="open-stream counts, comma-separated")
    parser.add_argument("--litellm-venv", type=Path, help="venv for LiteLLM (default OUT/litellm-venv; reused)")
    parser.add_argument(
        "--consumer",
        choices=("in-server", "apart"),
        default="in-server",
        help="the ledger consumer in the server (the repo's gateway.yaml) or apart (as k8s/ runs it)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found")
    counts = sorted({int(x) for x in args.streams.split(",") if x.strip()})
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="bench-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    # Ctrl-C and SIGTERM both unwind through the `finally` that stops everything (also when the
    # shell started this in the background with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    # Each open stream is one client socket; Envoy and the mock (children) inherit the limit too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(counts, default=0) * 3 + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))

    began = time.monotonic()
    info: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "tests/bench/suite.py", *sys.argv[1:]]),
        "argv": sys.argv,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "envoy_version": envoy_version(),
        "settings": {
            "duration": args.duration,
            "repeats": args.repeats,
            "streams": counts,
            "out": str(out),
            "consumer": args.consumer,
        },
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    results = Results()
    litellm_exe: Path | None = None
    if args.skip_litellm:
        info["litellm_skipped"] = "--skip-litellm"
    else:
        venv = args.litellm_venv or out / "litellm-venv"
        try:
            litellm_exe = install_litellm(venv, out / "litellm-pip.log")
            info["litellm_version"] = litellm_version(venv)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            info["litellm_skipped"] = f"install failed: {e}"
            print(f"litellm: skipped ({info['litellm_skipped']})")

    cleanup = contextlib.ExitStack()
    try:
        redis, redis_url = start_redis()
        cleanup.callback(stop_process, redis)
        overrides = {**OVERRIDES, **({"ledger": {"consumer": False}} if args.consumer == "apart" else {})}
        stack, admin = make_stack(out / "stack", redis_url, overrides=overrides)
        key_b, _ = admin.key("bench", "suite")
        key_bp, _ = admin.key("bench-pii", "suite")
        cleanup.callback(stack.stop)
        stack.start()
        server_pid = stack.procs["server"].pid
        consumer_pid: int | None = None
        if args.consumer == "apart":
            # As k8s/ledger-consumer.yaml runs it: a process of its own on the same Redis.
            consumer = subprocess.Popen(
                [sys.executable, "-m", "extproc", "db", "consume", "--config", str(admin.config_path)],
                env={**os.environ, "REDIS_URL": redis_url},
                stdout=subprocess.DEVNULL,
                stderr=(out / "consumer.log").open("wb"),
            )
            cleanup.callback(stop_process, consumer)
            consumer_pid = consumer.pid

        alone, alone_ports = start_envoy_alone(out, stack.ports.mock)
        cleanup.callback(stop_process, alone)

        provider = {"Authorization": f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"}
        targets = [
            Target("U", stack.mock_url + PATH, provider),
            Target("A", f"http://127.0.0.1:{alone_ports.listener}{PATH}", provider),
            Target("B", stack.base_url + PATH, {"Authorization": f"Bearer {key_b}"}, server_pid, consumer_pid),
            Target("BP", stack.base_url + PATH, {"Authorization": f"Bearer {key_bp}"}, server_pid, consumer_pid),
        ]
        litellm: subprocess.Popen[bytes] | None = None
        if litellm_exe is not None:
            print("litellm: starting the proxy...")
            try:
                litellm, litellm_url, master_key, startup = start_litellm(litellm_exe, out, stack.ports.mock)
                cleanup.callback(stop_process, litellm)
                info["litellm_startup_s"] = startup
                print(f"litellm: answering after {startup:.1f} s")
                targets.append(Target("C", litellm_url + PATH, {"Authorization": f"Bearer {master_key}"}))
            except (OSError, RuntimeError, TimeoutError) as e:
                info["litellm_skipped"] = f"start failed: {e} (log: {out / 'litellm.log'})"
                print(f"litellm: skipped ({info['litellm_skipped']})")
        by_name = {t.name: t for t in targets}
        info["checks"] = check_targets(targets, by_name["BP"])
        if "C" in by_name and by_name["C"].failed:
            info["litellm_skipped"] = by_name["C"].failed
            targets.remove(by_name["C"])

        def live() -> list[Target]:
            return [t for t in targets if not t.failed]

        wrk_figure(results, "seq", live(), BODY, 1, args)
        for conns in (16, 64):
            wrk_figure(results, f"c{conns}", live(), BODY, conns, args)
        sse_targets = [t for t in live() if t.name != "C"]
        sse_figure(results, "sse", sse_targets, args)
        sse_figure(results, "sse_spaced", sse_targets, args, stack.mock_url)
        # The server's CPU per streamed event under load: B and B' streams at 16 connections.
        wrk_figure(results, "stream_c16", [by_name["B"], by_name["BP"]], STREAM_BODY, 16, args, SSE_HEADERS)
        for n in ("B", "BP"):
            events = results.med("sse", n, "events")
            for r in results.raw.get("stream_c16", {}).get(n, []):
                if events and "cpu_us" in r:
                    r["cpu_us_per_event"] = r["cpu_us"] / events
        info["open_streams"] = open_streams_figure(results, by_name["B"], stack, counts)
        if "C" in by_name:
            c = by_name["C"]
            info["litellm_ok"] = c.failed is None
            if c.failed:
                info["litellm_skipped"] = c.failed
            if litellm is not None and litellm.poll() is None:
                info["litellm_rss_mb"] = rss_kb(litellm.pid) / 1024
        info["server_rss_mb_end"] = rss_kb(server_pid) / 1024
        time.sleep(1)  # let the usage consumer drain into the ledger
        info["ledger"] = ledger_counts(admin.config.ledger_path)
    finally:
        print("stopping everything...")
        cleanup.close()

    info["elapsed_s"] = time.monotonic() - began
    names = [n for n in ("U", "A", "B", "BP", "C") if n != "C" or info.get("litellm_ok")]
    derived = analyse(results, info)
    report = markdown(results, info, derived, names)
    report += f"\nWall time: {info['elapsed_s']:.0f} s.\n"
    md_path, json_path = out / "bench-report.md", out / "bench-report.json"
    md_path.write_text(report)
    json_path.write_text(
        json.dumps(
            {
                **info,
                "targets": LABELS,
                "medians": results.medians(),
                "derived": derived,
                "runs": results.raw,
                "failed_runs": results.errors,
            },
            indent=2,
            ensure_ascii=False,
            default=str,
        )
    )
    print()
    print(report)
    print(f"wrote {md_path}\nwrote {json_path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; everything this run started has been stopped", file=sys.stderr)
        sys.exit(130)
