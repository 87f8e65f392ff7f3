"""Soak test: the whole stack under bursts, thousands of open streams, disconnects and huge uploads.

Why: unit and e2e tests send a handful of requests; production sees thousands in flight at once,
slow SSE readers, clients that vanish mid-stream and 16 MiB prompts. This script checks the floors
the load issue sets (zero non-429 errors below the configured limits, server RSS <= 300 MB with
thousands of open streams, memory back within 20% of the start afterwards) and reports what Envoy
says when they are missed (its counters and the access log's %RESPONSE_CODE_DETAILS%).

It starts its own stack (mock provider, one ext_proc server process, Envoy, all from the shipped
configs via make_stack) on free loopback ports, with its own throwaway `redis-server` as the key
store, creates a virtual key, then runs the phases with an asyncio (aiohttp) client:

  burst        N concurrent non-streamed chat completions, all started at once
  streams      N concurrent SSE streams lasting ~25 s each, read by slow readers
  disconnects  N streams closed by the client right after their first event
  uploads      N concurrent ~15.9 MiB JSON bodies (one long message)

Per phase it reports HTTP statuses, `error.code` of JSON error bodies, client exceptions, latency,
Envoy / server RSS (sampled every 0.5 s) and open fds, the Envoy counters that explain failures
and the access log's non-200 lines grouped by status / details / flags. Run by hand, never by
pytest (2 cores: everything, client included, shares them; sizes are what the issue names):

    .venv/bin/python tests/bench/soak.py                      # full size, ~2.5-4 minutes
    .venv/bin/python tests/bench/soak.py --burst 500 --streams 200 --disconnects 20 --uploads 4
    .venv/bin/python tests/bench/soak.py --phases burst --burst 2000 --envoy-config /tmp/variant.yaml

It prints the Markdown report and writes soak.md / soak.json (with a 0.5 s time series) to --out-dir
(default: a new temp dir; the stack's logs are in its stack/ subdir); exit code 0 only when every
floor is met. It is bounded: --max-seconds (default 600) is a hard overall deadline (a watchdog kills the stack
and exits if the script itself hangs), every phase has its own timeout and every loop a count.
Experiment hooks (nothing shipped is edited): --envoy-config runs a variant envoy.yaml through the
same derivation; --grpc-option NAME=VALUE adds a channel option to the server's grpc.aio.server()
through a sitecustomize.py in the work dir; --env NAME=VALUE sets an environment variable for the
stack's processes (e.g. glibc MALLOC_* tunables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc import envoyconf  # noqa: E402
from extproc.config import ServerConfig  # noqa: E402
from extproc.devstack import Stack, free_port, tcp_open, wait_until  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

MODEL = "gpt-5.5"
PHASES = ("burst", "streams", "disconnects", "uploads")
MIB = 1024 * 1024
SERVER_STREAMS_RSS_FLOOR_MB = 300.0
MEMORY_RETURN_FLOOR = 0.20

# Envoy counters / gauges that explain failures; only non-zero ones are reported.
INTERESTING_STATS = re.compile(
    r"^("
    r"cluster\.extproc\.(upstream_cx_(?!.*bytes_total).*|upstream_rq_.*|.*overflow.*|http2\..*|circuit_breakers\..*)"
    r"|http\.llm\.ext_proc\..*"
    r"|overload\..*"
    r"|http\.llm\.downstream_(cx|rq)_(?!.*bytes_total).*"
    r"|listener\.(?!admin)(?!.*worker_).*\.downstream_(cx_(active|overflow|overload_reject)|global_cx_overflow|pre_cx_.*)"
    r"|cluster\.openai\.(upstream_cx_(active|overflow|connect_fail|connect_timeout|total)"
    r"|upstream_rq_(active|pending_active|pending_overflow|retry.*|timeout|5xx|503|total))"
    r"|.*rq_timeout.*"
    r")$"
)
# Sampled with RSS: how close Envoy's heap is to the overload manager's fixed_heap limit.
ENVOY_GAUGES = (
    "overload.envoy.resource_monitors.fixed_heap.pressure",
    "server.memory_allocated",
    "server.memory_heap_size",
    "http.llm.downstream_rq_active",
    "cluster.extproc.upstream_rq_active",
    "cluster.extproc.upstream_rq_pending_active",
)
ENVOY_GAUGE_FILTER = "^(" + "|".join(re.escape(g) for g in ENVOY_GAUGES) + ")$"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Gauges: reported when non-zero even if unchanged in the phase; counters only when they moved.
GAUGE_SUFFIXES = ("_active", "_buffered", "pressure", "_connections", "_open", "_remaining")


SITECUSTOMIZE = '''\
"""Written by tests/bench/soak.py: adds SOAK_GRPC_OPTIONS (JSON [[name, value], ...]) to grpc.aio.server()."""
import json
import os

_extra = json.loads(os.environ.get("SOAK_GRPC_OPTIONS") or "[]")
if _extra:
    import grpc.aio

    _orig = grpc.aio.server

    def _server(*args, **kwargs):
        opts = [o for o in (kwargs.pop("options", None) or []) if o[0] not in {n for n, _ in _extra}]
        kwargs["options"] = [*opts, *[tuple(o) for o in _extra]]
        return _orig(*args, **kwargs)

    grpc.aio.server = _server
'''


# -- /proc --------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the server might fork workers one day)."""
    kids = _children()
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 256:
        p = todo.pop()
        seen.append(p)
        todo.extend(kids.get(p, []))
    return seen


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine used (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Sample:
    t: float
    phase: str
    rss_mb: dict[str, float]
    fds: dict[str, int]
    cpu_s: dict[str, float]
    envoy: dict[str, int]  # ENVOY_GAUGES


class Sampler(threading.Thread):
    """RSS and CPU time (summed over each process tree), open fds and Envoy's heap gauges every
    `interval` s, in a thread so a busy event loop cannot delay it."""

    def __init__(self, pids: dict[str, int], admin_port: int, interval: float = 0.5, limit: int = 20_000) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.pids = pids
        self.admin_port = admin_port
        self.interval = interval
        self.limit = limit
        self.phase = "setup"
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self._stop_event = threading.Event()

    def measure(self) -> Sample:
        rss: dict[str, float] = {}
        fds: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name, pid in self.pids.items():
            tree = process_tree(pid) if name == "server" else [pid]
            rss[name] = sum(rss_kib(p) or 0 for p in tree) / 1024
            fds[name] = sum(open_fds(p) or 0 for p in tree)
            cpu[name] = sum(cpu_seconds(p) for p in tree)
        cpu["machine"] = machine_busy_seconds()
        try:
            envoy = envoy_stats(self.admin_port, ENVOY_GAUGE_FILTER, timeout=2)
        except OSError:
            envoy = {}
        return Sample(time.monotonic(), self.phase, rss, fds, cpu, {k: envoy.get(k, 0) for k in ENVOY_GAUGES})

    def run(self) -> None:
        while not self._stop_event.wait(self.interval) and len(self.samples) < self.limit:
            s = self.measure()
            with self.lock:
                self.samples.append(s)

    def stop(self) -> None:
        self._stop_event.set()

    def peak(self, phase: str) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        with self.lock:
            during = [s for s in self.samples if s.phase == phase]
        rss = {n: max((s.rss_mb[n] for s in during), default=0.0) for n in self.pids}
        fds = {n: max((s.fds[n] for s in during), default=0) for n in self.pids}
        envoy = {n: max((s.envoy[n] for s in during), default=0) for n in ENVOY_GAUGES}
        return rss, fds, envoy


# -- Envoy admin and logs -----------------------------------------------------------------------------


def envoy_stats(admin_port: int, filter_re: str | None = None, timeout: float = 10) -> dict[str, int]:
    query = "?" + urllib.parse.urlencode({"filter": filter_re}) if filter_re else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats{query}", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def interesting(stats: dict[str, int], before: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for k, v in sorted(stats.items()):
        delta = v - before.get(k, 0)
        if INTERESTING_STATS.match(k) and (delta or (v and k.endswith(GAUGE_SUFFIXES))):
            out[k] = {"value": v, "delta": delta}
    return out


class LogCursor:
    """New lines of a log file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read(self, max_bytes: int = 64 * MIB) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(max_bytes)
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode("utf-8", "replace").splitlines()


def access_log_summary(lines: list[str]) -> tuple[Counter[str], Counter[str]]:
    """(status counts, "status details flags" of non-200 lines) from Envoy's JSON access log."""
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        status = str(entry.get("status"))
        statuses[status] += 1
        if status != "200":
            failures[f"{status} {entry.get('details')} flags={entry.get('flags')}"] += 1
    return statuses, failures


def log_summary(lines: list[str], top: int = 8) -> dict[str, int]:
    """Non-access-log lines (server warnings, Envoy warnings), digits masked so repeats group."""
    c: Counter[str] = Counter()
    for line in lines:
        if line.startswith("{") or not line.strip():
            continue
        c[re.sub(r"\d+", "N", line.strip())[:200]] += 1
    return dict(c.most_common(top))


# -- results ------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    planned: int
    statuses: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    finished: int = 0
    ok: int = 0
    timed_out: bool = False
    skipped: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def non429_errors(self) -> int:
        """Failures a client would see, excluding 429 (rate limits are allowed to answer)."""
        bad = sum(n for s, n in self.statuses.items() if s not in ("200", "429"))
        return bad + sum(self.exceptions.values()) + (self.planned - self.finished)

    @contextlib.asynccontextmanager
    async def measured(self) -> AsyncIterator[float]:
        """One client request: yields its start time; counts its exception, if any, by type and
        records its latency and completion however it ends."""
        t0 = time.perf_counter()
        try:
            yield t0
        except Exception as exc:
            self.exceptions[type(exc).__name__] += 1
        finally:
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            self.finished += 1

    async def accepted(self, r: aiohttp.ClientResponse) -> bool:
        """Counts the response's status; for a non-200, reads and records its error body."""
        self.statuses[str(r.status)] += 1
        if r.status == 200:
            return True
        self.record_error_body(r.status, await r.read())
        return False

    def record_error_body(self, status: int, body: bytes) -> None:
        if status == 200:
            return
        try:
            parsed = json.loads(body)
            err = parsed.get("error") if isinstance(parsed, dict) else None
            code = err.get("code") or err.get("type") if isinstance(err, dict) else None
            self.error_codes[f"{status} {code}"] += 1
        except ValueError:
            self.error_codes[f"{status} non-json: {body[:60]!r}"] += 1


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- the client phases --------------------------------------------------------------------------------


def chat_body(stream: bool, content: str = "hello there, how are you today?") -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def upload_body(target_bytes: int) -> bytes:
    empty = len(chat_body(False, ""))
    word = "abcdefghijklmnopqrstuvwxyz0123456789 "
    n = target_bytes - empty
    content = (word * (n // len(word) + 1))[:n]
    body = chat_body(False, content)
    assert len(body) == target_bytes, len(body)
    return body


async def one_request(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, res: PhaseResult
) -> None:
    async with res.measured(), session.post(url, data=body, headers=headers) as r:
        if await res.accepted(r):
            await r.read()
            res.ok += 1


@dataclass
class StreamOpts:
    output_tokens: int
    chunk_delay_ms: int
    read_bytes: int
    read_sleep: float


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    opts: StreamOpts,
    res: PhaseResult,
    open_now: list[int],
    start_delay: float,
) -> None:
    await asyncio.sleep(start_delay)
    hdrs = {
        **headers,
        "x-mock-output-tokens": str(opts.output_tokens),
        "x-mock-chunk-delay-ms": str(opts.chunk_delay_ms),
    }
    open_now[0] += 1
    open_now[1] = max(open_now[1], open_now[0])
    events, done, last = 0, False, b""
    try:
        async with res.measured() as t0, session.post(url, data=chat_body(True), headers=hdrs) as r:
            if not await res.accepted(r):
                return
            first = True
            for _ in range(opts.output_tokens * 50 + 1000):  # bounded; ends at EOF long before
                chunk = await r.content.read(opts.read_bytes)
                if not chunk:
                    break
                if first:
                    res.ttfb_ms.append((time.perf_counter() - t0) * 1000)
                    first = False
                events += (last + chunk).count(b"\n\n")
                done = done or b"[DONE]" in last[-8:] + chunk
                last = chunk[-8:]
                await asyncio.sleep(opts.read_sleep)
            if done and events >= opts.output_tokens:
                res.ok += 1
            else:
                res.exceptions[f"incomplete stream ({'no [DONE]' if not done else 'too few events'})"] += 1
    finally:
        open_now[0] -= 1


async def one_disconnect(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], res: PhaseResult, first_event: list[int]
) -> None:
    hdrs = {**headers, "x-mock-output-tokens": "2000", "x-mock-chunk-delay-ms": "50"}  # ~100 s if not closed
    async with res.measured() as t0, session.post(url, data=chat_body(True), headers=hdrs) as r:
        if await res.accepted(r):
            buf = b""
            for _ in range(1000):
                chunk = await r.content.read(256)
                if not chunk:
                    break
                buf += chunk
                if b"\n\n" in buf:
                    res.ttfb_ms.append((time.perf_counter() - t0) * 1000)
                    first_event[0] += 1
                    res.ok += 1
                    break
            r.close()  # drops the TCP connection mid-stream


def session_for(concurrency: int, timeout: float, force_close: bool = False) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=force_close, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(30.0, timeout)),
        auto_decompress=False,
    )


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    stack: Stack
    url: str
    headers: dict[str, str]
    sampler: Sampler
    deadline: float
    access_log: LogCursor
    envoy_log: LogCursor
    server_log: LogCursor
    cold: Sample
    limits: dict[str, Any] = field(default_factory=dict)
    start_mem: dict[str, float] = field(default_factory=dict)
    start_fds: dict[str, int] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)


async def probe(ctx: Ctx) -> str:
    """One ordinary request: is the stack still serving?"""
    res = PhaseResult("probe", 1)
    async with session_for(1, 10) as s:
        await one_request(s, ctx.url, ctx.headers, chat_body(False), res)
    return ", ".join([*(f"HTTP {k}" for k in res.statuses), *res.exceptions]) or "nothing"


async def run_phase(
    ctx: Ctx, name: str, planned: int, limit_s: float, body: Callable[[PhaseResult], Awaitable[None]]
) -> PhaseResult:
    res = PhaseResult(name, planned)
    remaining = ctx.deadline - time.monotonic() - ctx.args.settle - 20  # keep time for the final report
    if remaining < 10:
        res.skipped = f"not enough time left before --max-seconds ({remaining:.0f}s)"
        print(f"[soak] {name}: skipped: {res.skipped}", flush=True)
        ctx.reports.append(phase_report(res, {}, {}, {}))
        return res
    timeout = min(limit_s, remaining)
    before_stats = await asyncio.to_thread(envoy_stats, ctx.stack.ports.admin)
    before = ctx.sampler.measure()
    for cursor in (ctx.access_log, ctx.envoy_log, ctx.server_log):
        cursor.read()
    ctx.sampler.phase = name
    print(f"[soak] {name}: {planned} (timeout {timeout:.0f}s)", flush=True)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(body(res), timeout)
    except TimeoutError:
        res.timed_out = True
    res.seconds = time.monotonic() - t0
    end = ctx.sampler.measure()
    stats = await asyncio.to_thread(envoy_stats, ctx.stack.ports.admin)
    ctx.sampler.phase = f"{name}-settle"
    peak_rss, peak_fds, peak_envoy = ctx.sampler.peak(name)
    settle = min(ctx.args.settle, max(0.0, ctx.deadline - time.monotonic() - 20))
    await asyncio.sleep(settle)
    after = ctx.sampler.measure()
    settled_stats = await asyncio.to_thread(envoy_stats, ctx.stack.ports.admin)
    res.extra["probe after settle"] = await probe(ctx)
    res.extra["gauges after settle"] = {
        k: settled_stats.get(k, 0)
        for k in (
            "http.llm.downstream_cx_active",
            "http.llm.downstream_rq_active",
            "cluster.extproc.upstream_rq_active",
            "cluster.openai.upstream_rq_active",
            "cluster.openai.upstream_cx_active",
        )
    }
    await asyncio.sleep(0.3)  # Envoy flushes its access log every 100 ms in local stacks
    cpu = {n: round(end.cpu_s[n] - before.cpu_s[n], 2) for n in end.cpu_s}
    # Whatever else runs on the box (other test runs) competes for the same cores: say how much.
    cpu["other processes"] = round(cpu.pop("machine") - sum(cpu.values()), 2)
    measures: dict[str, Any] = {
        "rss_mb": {"before": before.rss_mb, "peak": peak_rss, "after": after.rss_mb},
        "fds": {"before": before.fds, "peak": peak_fds, "after": after.fds},
        "cpu_seconds": cpu,
        "cpu_cores": {n: round(v / res.seconds, 2) if res.seconds else 0.0 for n, v in cpu.items()},
        "envoy_peak_gauges": peak_envoy,
    }
    report = phase_report(
        res,
        measures,
        interesting(stats, before_stats),
        {"access": ctx.access_log.read(), "envoy": ctx.envoy_log.read(), "server": ctx.server_log.read()},
    )
    ctx.reports.append(report)
    print(
        f"[soak] {name}: done in {res.seconds:.1f}s ok={res.ok}/{planned} statuses={dict(res.statuses)} "
        f"exceptions={dict(res.exceptions)}",
        flush=True,
    )
    return res


def phase_report(
    res: PhaseResult,
    measures: dict[str, Any],
    stats: dict[str, dict[str, int]],
    logs: dict[str, list[str]],
) -> dict[str, Any]:
    access = logs.get("access", [])
    statuses, failures = access_log_summary(access)
    return {
        "name": res.name,
        "planned": res.planned,
        "finished": res.finished,
        "ok": res.ok,
        "skipped": res.skipped,
        "timed_out": res.timed_out,
        "seconds": round(res.seconds, 2),
        "statuses": dict(res.statuses.most_common()),
        "error_codes": dict(res.error_codes.most_common()),
        "exceptions": dict(res.exceptions.most_common()),
        "non_429_errors": res.non429_errors() if not res.skipped else None,
        "latency_ms": {"p50": pct(res.latencies_ms, 50), "p99": pct(res.latencies_ms, 99), "n": len(res.latencies_ms)},
        "ttfb_ms": {"p50": pct(res.ttfb_ms, 50), "p99": pct(res.ttfb_ms, 99), "n": len(res.ttfb_ms)},
        **measures,
        "envoy_stats": stats,
        "access_log_statuses": dict(statuses.most_common()),
        "access_log_failures": dict(failures.most_common(12)),
        "envoy_log": log_summary(logs.get("envoy", [])),  # skips JSON access log lines
        "server_log": log_summary(logs.get("server", [])),
        "extra": res.extra,
    }


async def phase_burst(ctx: Ctx, res: PhaseResult) -> None:
    n = ctx.args.burst
    headers = dict(ctx.headers)
    if ctx.args.burst_latency_ms:
        headers["x-mock-latency-ms"] = str(ctx.args.burst_latency_ms)
    body = chat_body(False)
    async with session_for(n, ctx.args.burst_timeout) as s:
        go = asyncio.Event()

        async def fire() -> None:
            await go.wait()
            await one_request(s, ctx.url, headers, body, res)

        tasks = [asyncio.create_task(fire()) for _ in range(n)]
        await asyncio.sleep(0.1)  # every task is parked on the event: they all start together
        go.set()
        await asyncio.gather(*tasks)


async def phase_streams(ctx: Ctx, res: PhaseResult) -> None:
    a = ctx.args
    n = a.streams
    opts = StreamOpts(a.stream_tokens, a.stream_chunk_delay_ms, a.read_bytes, a.read_sleep)
    open_now = [0, 0]
    res.extra["stream"] = (
        f"{opts.output_tokens} events, {opts.chunk_delay_ms} ms apart "
        f"(~{opts.output_tokens * opts.chunk_delay_ms / 1000:.0f} s); "
        f"reader: {opts.read_bytes} B then {opts.read_sleep} s sleep; starts spread over {a.stream_ramp} s"
    )
    async with session_for(n, a.streams_timeout) as s:
        tasks = [
            asyncio.create_task(one_stream(s, ctx.url, ctx.headers, opts, res, open_now, i * a.stream_ramp / n))
            for i in range(n)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            res.extra["peak open streams (client side)"] = open_now[1]


async def phase_disconnects(ctx: Ctx, res: PhaseResult) -> None:
    n = ctx.args.disconnects
    first = [0]
    async with session_for(n, ctx.args.disconnects_timeout, force_close=True) as s:
        await asyncio.gather(*(one_disconnect(s, ctx.url, ctx.headers, res, first) for _ in range(n)))
    res.extra["closed after first event"] = first[0]
    await asyncio.sleep(2)
    stats = await asyncio.to_thread(envoy_stats, ctx.stack.ports.admin)
    res.extra["2 s after the disconnects"] = {
        k: stats.get(k, 0)
        for k in (
            "http.llm.downstream_rq_active",
            "cluster.openai.upstream_rq_active",
            "cluster.extproc.upstream_rq_active",
            "http.llm.downstream_cx_destroy_remote_active_rq",
        )
    }


async def phase_uploads(ctx: Ctx, res: PhaseResult) -> None:
    n = ctx.args.uploads
    body = upload_body(int(ctx.args.upload_mib * MIB))
    res.extra["body bytes"] = len(body)
    async with session_for(n, ctx.args.uploads_timeout) as s:
        await asyncio.gather(*(one_request(s, ctx.url, ctx.headers, body, res) for _ in range(n)))


def _find(obj: Any, key: str) -> Any:
    """First value of `key` anywhere in a nested config (the files keep changing shape)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def configured_limits(stack: Stack) -> dict[str, Any]:
    """The limits a phase may run into, read from the configs the stack actually runs."""
    gw = yaml.safe_load(stack.gateway_config.read_text()) or {}
    server = {**ServerConfig().model_dump(), **(gw.get("server") or {})}
    envoy = yaml.safe_load((stack.workdir / "envoy.yaml").read_text()) or {}
    ext: dict[str, Any] = next(
        (f["typed_config"] for hcm in envoyconf._hcms(envoy) for f in hcm["http_filters"] if "ext_proc" in f["name"]),
        {},
    )
    extproc_cluster = envoyconf.clusters(envoy).get("extproc", {})
    return {
        "server.max_concurrent_streams": server.get("max_concurrent_streams"),
        "server.max_body_bytes_in_flight": server.get("max_body_bytes_in_flight"),
        "envoy buffer max_request_bytes": _find(envoy, "max_request_bytes"),
        "envoy per_connection_buffer_limit_bytes": _find(envoy, "per_connection_buffer_limit_bytes"),
        "envoy max_active_downstream_connections": _find(envoy, "max_active_downstream_connections"),
        "envoy fixed_heap max_heap_size_bytes": _find(envoy, "max_heap_size_bytes"),
        "ext_proc message_timeout": ext.get("message_timeout", "0.2s (default)"),
        "extproc cluster circuit breakers": _find(extproc_cluster, "thresholds"),
    }


def over_limits(r: dict[str, Any], limits: dict[str, Any], args: argparse.Namespace) -> str | None:
    """Why a phase is beyond the configured limits (errors are then the limits working), else None."""
    streams = limits.get("server.max_concurrent_streams")
    budget = limits.get("server.max_body_bytes_in_flight")
    max_body = limits.get("envoy buffer max_request_bytes")
    if r["name"] in ("burst", "streams") and isinstance(streams, int) and r["planned"] > streams:
        return f"{r['planned']} requests > server.max_concurrent_streams {streams}"
    if r["name"] == "uploads":
        size = int(args.upload_mib * MIB)
        if isinstance(max_body, int) and size > max_body:
            return f"body {size} B > buffer max_request_bytes {max_body}"
        if isinstance(budget, int) and r["planned"] * size > budget:
            return f"{r['planned']} x {size} B > server.max_body_bytes_in_flight {budget}"
    return None


def floors(ctx: Ctx, end_mem: dict[str, float]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in ctx.reports:
        if r["skipped"]:
            continue
        errors = r["non_429_errors"]
        if r["name"] == "disconnects":
            errors = r["planned"] - r["ok"]  # a disconnect is the point; failing before the first event is not
        over = over_limits(r, ctx.limits, ctx.args)
        if over is None:
            out.append({"floor": f"{r['name']}: zero non-429 errors", "value": errors, "met": errors == 0})
            continue
        shed = sum(n for code, n in r["error_codes"].items() if code.endswith(" gateway_overloaded"))
        out.append(
            {
                "floor": f"{r['name']}: over the configured limits ({over}); errors must be clean sheds",
                "value": f"{errors} errors, {shed} of them 503 gateway_overloaded",
                "met": errors == shed,
            }
        )
    streams = next((r for r in ctx.reports if r["name"] == "streams" and not r["skipped"]), None)
    if streams is not None:
        peak = streams["rss_mb"]["peak"]["server"]
        out.append(
            {
                "floor": f"server RSS peak during streams <= {SERVER_STREAMS_RSS_FLOOR_MB:.0f} MB",
                "value": f"{peak:.1f} MB",
                "met": peak <= SERVER_STREAMS_RSS_FLOOR_MB,
            }
        )
    for name in ("envoy", "server"):
        start, end = ctx.start_mem[name], end_mem[name]
        rel = end / start - 1 if start else 0.0
        out.append(
            {
                "floor": f"{name} RSS after the run within {MEMORY_RETURN_FLOOR:.0%} of the start",
                "value": f"{start:.1f} -> {end:.1f} MB ({rel:+.0%})",
                "met": rel <= MEMORY_RETURN_FLOOR,
            }
        )
    return out


def fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Soak report",
        "",
        f"- started: {summary['started']}; wall time {summary['wall_seconds']:.0f} s "
        f"(deadline {summary['max_seconds']} s)",
        f"- config: {summary['config']}",
        f"- client: {summary['client']}",
        f"- args: {summary['args']}",
        f"- work dir: {summary['workdir']}",
        "",
        "## Floors",
        "",
        "| floor | value | met |",
        "|---|---|---|",
    ]
    lines += [f"| {f['floor']} | {f['value']} | {'yes' if f['met'] else '**NO**'} |" for f in summary["floors"]]
    cold, start, end = summary["memory"]["cold"], summary["memory"]["start"], summary["memory"]["end"]
    lines += [
        "",
        "## Memory and fds: cold (before any request), start (after the warm-up), end of run (after settling)",
        "",
        "| process | RSS cold MB | RSS start MB | RSS end MB | end vs start | fds cold | fds start | fds end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in start["rss_mb"]:
        s0, s1 = start["rss_mb"][name], end["rss_mb"][name]
        lines.append(
            f"| {name} | {cold['rss_mb'][name]:.1f} | {s0:.1f} | {s1:.1f} | {(s1 / s0 - 1) if s0 else 0:+.0%} "
            f"| {cold['fds'][name]} | {start['fds'][name]} | {end['fds'][name]} |"
        )
    lines += ["", "## Configured limits (from the stack's gateway.yaml and derived envoy.yaml)", ""]
    lines += [f"- {k}: {v}" for k, v in summary["limits"].items()]
    for r in summary["phases"]:
        lines += ["", f"## Phase: {r['name']} ({r['planned']})", ""]
        if r["skipped"]:
            lines.append(f"skipped: {r['skipped']}")
            continue
        lat, ttfb = r["latency_ms"], r["ttfb_ms"]
        lines += [
            f"- finished {r['finished']}/{r['planned']} in {r['seconds']} s"
            f"{' (PHASE TIMED OUT)' if r['timed_out'] else ''}; "
            f"ok {r['ok']}; non-429 errors {r['non_429_errors']}",
            f"- HTTP statuses: {r['statuses'] or '-'}",
            f"- error.code of error bodies: {r['error_codes'] or '-'}",
            f"- client exceptions: {r['exceptions'] or '-'}",
            f"- latency ms: p50 {fmt(lat['p50'])}, p99 {fmt(lat['p99'])}"
            + (f"; first byte ms: p50 {fmt(ttfb['p50'])}, p99 {fmt(ttfb['p99'])}" if ttfb["n"] else ""),
        ]
        lines += [f"- {k}: {v}" for k, v in r["extra"].items()]
        gauges = r["envoy_peak_gauges"]
        lines.append(
            f"- Envoy peaks (0.5 s samples): fixed_heap pressure {gauges.get(ENVOY_GAUGES[0], 0)}%, "
            f"heap allocated {gauges.get('server.memory_allocated', 0) / MIB:.0f} MiB, "
            f"downstream rq active {gauges.get('http.llm.downstream_rq_active', 0)}, "
            f"ext_proc rq active {gauges.get('cluster.extproc.upstream_rq_active', 0)}, "
            f"ext_proc rq pending {gauges.get('cluster.extproc.upstream_rq_pending_active', 0)}"
        )
        cores = r["cpu_cores"]
        lines.append(
            "- CPU cores used in the phase: "
            + ", ".join(f"{n} {v:.2f}" for n, v in cores.items())
            + f" (of {os.cpu_count()})"
        )
        lines += [
            "",
            "| process | RSS MB before | peak | after settle | after - start | fds before | peak | after "
            "| CPU s in phase |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in r["rss_mb"]["before"]:
            rss, fds = r["rss_mb"], r["fds"]
            rel = rss["after"][name] - start["rss_mb"].get(name, 0.0)
            lines.append(
                f"| {name} | {rss['before'][name]:.1f} | {rss['peak'][name]:.1f} | {rss['after'][name]:.1f} "
                f"| {rel:+.1f} | {fds['before'][name]} | {fds['peak'][name]} | {fds['after'][name]} "
                f"| {r['cpu_seconds'][name]:.1f} |"
            )
        if r["access_log_failures"]:
            lines += ["", "Envoy access log, non-200 (status details flags): count", ""]
            lines += [f"- `{k}`: {v}" for k, v in r["access_log_failures"].items()]
        if r["envoy_stats"]:
            lines += [
                "",
                "<details><summary>Envoy stats (counters that moved, non-zero gauges; value, delta in phase)</summary>",
                "",
            ]
            lines += [f"    {k}: {v['value']} ({v['delta']:+d})" for k, v in r["envoy_stats"].items()]
            lines += ["", "</details>"]
        for which in ("server_log", "envoy_log"):
            if r[which]:
                lines += ["", f"{which.replace('_', ' ')} (masked, count):", ""]
                lines += [f"    {v:5d}  {k}" for k, v in r[which].items()]
    return "\n".join(lines) + "\n"


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (bash scripts/test installs it)")
    port = free_port()
    rdir = workdir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(rdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until("redis-server", lambda: tcp_open(port), [proc], 10)
    return proc, f"redis://127.0.0.1:{port}/0"


def raise_fd_limit(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    note = f"client fd limit {soft} (hard {hard}), needed ~{needed}"
    if soft < needed:
        note += " -- TOO LOW, expect EMFILE"
    return note


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--max-seconds", type=float, default=600, help="hard overall deadline")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--burst", type=int, default=5000)
    p.add_argument("--burst-timeout", type=float, default=90)
    p.add_argument("--burst-latency-ms", type=int, default=0, help="x-mock-latency-ms for burst requests")
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--streams-timeout", type=float, default=150)
    p.add_argument("--stream-tokens", type=int, default=250, help="events per stream (x-mock-output-tokens)")
    p.add_argument("--stream-chunk-delay-ms", type=int, default=100, help="x-mock-chunk-delay-ms")
    p.add_argument("--stream-ramp", type=float, default=5.0, help="spread stream starts over this many seconds")
    p.add_argument("--read-bytes", type=int, default=2048, help="slow reader: bytes per read")
    p.add_argument("--read-sleep", type=float, default=0.25, help="slow reader: sleep between reads")
    p.add_argument("--disconnects", type=int, default=100)
    p.add_argument("--disconnects-timeout", type=float, default=60)
    p.add_argument("--uploads", type=int, default=20)
    p.add_argument("--upload-mib", type=float, default=15.9)
    p.add_argument("--uploads-timeout", type=float, default=120)
    p.add_argument("--warmup", type=int, default=50, help="requests and streams sent before the baseline")
    p.add_argument("--settle", type=float, default=10, help="seconds to wait after each phase before 'after'")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--envoy-config", type=Path, default=None, help="experiment: a variant of envoy/envoy.yaml")
    p.add_argument(
        "--grpc-option", action="append", default=[], metavar="NAME=VALUE", help="experiment: server channel option"
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="experiment: env var for the stack's processes"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="experiment: env var for the server only (an allocator: PYTHONMALLOC=malloc, LD_PRELOAD=...)",
    )
    args = p.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    return args


def grpc_options(raw: list[str]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for item in raw:
        name, _, value = item.partition("=")
        out.append([name, int(value) if value.lstrip("-").isdigit() else value])
    return out


async def warm_up(ctx: Ctx) -> None:
    """A few ordinary requests and streams before the baseline: the first requests import modules,
    fill caches and grow allocator arenas, which is not what "memory back to the start" is about."""
    n = ctx.args.warmup
    res = PhaseResult("warmup", 2 * n)
    opts = StreamOpts(20, 5, 4096, 0)
    async with session_for(n, 60) as s:
        await asyncio.wait_for(
            asyncio.gather(
                *(one_request(s, ctx.url, ctx.headers, chat_body(False), res) for _ in range(n)),
                *(one_stream(s, ctx.url, ctx.headers, opts, res, [0, 0], 0) for _ in range(n)),
            ),
            60,
        )
    await asyncio.sleep(2)
    start = ctx.sampler.measure()
    ctx.start_mem, ctx.start_fds = start.rss_mb, start.fds
    print(f"[soak] warm-up: {dict(res.statuses)} {dict(res.exceptions)}; baseline RSS MB {start.rss_mb}", flush=True)


async def run_phases(ctx: Ctx) -> None:
    a = ctx.args
    await warm_up(ctx)
    wanted = a.phases.split(",")
    table: list[tuple[str, int, float, Callable[[Ctx, PhaseResult], Awaitable[None]]]] = [
        ("burst", a.burst, a.burst_timeout, phase_burst),
        ("streams", a.streams, a.streams_timeout, phase_streams),
        ("disconnects", a.disconnects, a.disconnects_timeout, phase_disconnects),
        ("uploads", a.uploads, a.uploads_timeout, phase_uploads),
    ]
    for name, n, timeout, fn in table:
        if name in wanted and n > 0:
            await run_phase(ctx, name, n, timeout, functools.partial(fn, ctx))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    deadline = t_start + args.max_seconds
    out_dir: Path = args.out_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = out_dir / "stack"
    fd_note = raise_fd_limit(args.burst + args.streams + args.disconnects + args.uploads + 1000)
    print(f"[soak] {fd_note}; output in {out_dir}", flush=True)

    redis, redis_url = start_redis(out_dir)
    stack, admin = make_stack(workdir, redis_url, prefix="soak:")
    if args.envoy_config:
        stack.envoy_config = args.envoy_config.resolve()
    if args.grpc_option:
        site = workdir / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        stack.env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        stack.env["SOAK_GRPC_OPTIONS"] = json.dumps(grpc_options(args.grpc_option))

    for item in args.env:
        name, _, value = item.partition("=")
        stack.env[name] = value
    if args.server_env:
        # The server alone (an allocator preloaded into Envoy would meet its own tcmalloc).
        stack.wrap["server"] = ["env", *args.server_env]

    stopped = threading.Event()

    def teardown() -> None:
        if stopped.is_set():
            return
        stopped.set()
        stack.stop()
        if redis.poll() is None:
            redis.terminate()
            try:
                redis.wait(10)
            except subprocess.TimeoutExpired:
                redis.kill()

    def watchdog() -> None:
        print(f"[soak] watchdog: --max-seconds {args.max_seconds} exceeded; stopping the stack", flush=True)
        teardown()
        os._exit(3)

    dog = threading.Timer(args.max_seconds + 30, watchdog)
    dog.daemon = True
    dog.start()
    sampler: Sampler | None = None
    try:
        secret, _ = admin.key("soak", "soak")
        stack.start()
        pids = {"envoy": stack.procs["envoy"].pid, "server": stack.procs["server"].pid}
        pids.update(mock=stack.procs["mock"].pid, client=os.getpid())  # CPU share on the shared cores
        sampler = Sampler(pids, stack.ports.admin)
        time.sleep(1)
        cold = sampler.measure()
        sampler.start()
        ctx = Ctx(
            args=args,
            stack=stack,
            url=f"{stack.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
            sampler=sampler,
            deadline=deadline,
            # Newer stacks write Envoy's JSON access log (stdout) to access.log, apart from envoy.log.
            access_log=LogCursor(
                stack.log_path("access") if stack.log_path("access").exists() else stack.log_path("envoy")
            ),
            envoy_log=LogCursor(stack.log_path("envoy")),
            server_log=LogCursor(stack.log_path("server")),
            cold=cold,
            limits=configured_limits(stack),
        )
        try:
            import uvloop

            uvloop.run(run_phases(ctx))
        except ImportError:
            asyncio.run(run_phases(ctx))
        sampler.phase = "final-settle"
        time.sleep(max(0.0, min(args.settle, deadline - time.monotonic() - 5)))
        end_sample = sampler.measure()
        config = f"envoy {stack.envoy_config}" + (f"; grpc options {args.grpc_option}" if args.grpc_option else "")
        config += f"; env {args.env}" if args.env else ""
        config += f"; server env {args.server_env}" if args.server_env else ""
        summary: dict[str, Any] = {
            "started": started,
            "wall_seconds": time.monotonic() - t_start,
            "max_seconds": args.max_seconds,
            "args": {k: str(v) for k, v in vars(args).items()},
            "config": config,
            "workdir": str(workdir),
            "client": fd_note,
            "memory": {
                "cold": {"rss_mb": cold.rss_mb, "fds": cold.fds},
                "start": {"rss_mb": ctx.start_mem, "fds": ctx.start_fds},
                "end": {"rss_mb": end_sample.rss_mb, "fds": end_sample.fds},
            },
            "limits": ctx.limits,
            "floors": floors(ctx, end_sample.rss_mb),
            "phases": ctx.reports,
            # Time series (0.5 s): RSS MB, cumulative CPU s, Envoy gauges.
            "samples": [
                {
                    "t": round(s.t - t_start, 2),
                    "phase": s.phase,
                    "rss_mb": s.rss_mb,
                    "cpu_s": {k: round(v, 2) for k, v in s.cpu_s.items()},
                    "envoy": s.envoy,
                }
                for s in sampler.samples
            ],
        }
    finally:
        if sampler is not None:
            sampler.stop()
        teardown()
        dog.cancel()
    md = markdown(summary)
    (out_dir / "soak.md").write_text(md)
    (out_dir / "soak.json").write_text(json.dumps(summary, indent=2, default=str))
    print(md)
    print(f"[soak] reports: {out_dir / 'soak.md'} {out_dir / 'soak.json'}; stack logs in {workdir}", flush=True)
    return 0 if all(f["met"] for f in summary["floors"]) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
