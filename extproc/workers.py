"""`extproc serve --workers N`: N server processes, a supervisor, one ops endpoint.

Why processes: a Python server uses one core, and the gateway's work per request is CPU (gRPC
framing, JSON, stages). Each worker is a whole server (its own event loop, Redis connections,
key and limit caches kept current by the store's change feed, admission limits); state they must
share lives in Redis, which is why N > 1 needs the redis store. The usage spool directory is
already safe to share: each process appends to its own locked segment, replay locks what it reads
(extproc.accounting.spool).

Why spawn, not fork: the workers' gRPC, Redis and aiohttp clients and their threads must be
created in the worker; the supervisor holds none and only starts, watches and restarts workers
and serves /metrics (the workers' sum, extproc.observability.aggregate), /healthz, /readyz and
/status on server.metrics_listen. Each worker's own ops endpoint is on a loopback port it picks
and announces through its pipe; /status lists them.

A worker whose supervisor died (SIGKILL) sees its pipe close and shuts down like on SIGTERM.
A worker that exits before it started (a port in use, an unreachable config path) stops the
others and the supervisor exits with its code: restarting would fail the same way. A worker that
dies later is restarted, after 1 s, then 2, 4 ... up to 30 s while it keeps dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .config import ConfigError, GatewayConfig
from .logsetup import configure_logging
from .observability.aggregate import merge

log = logging.getLogger("extproc.workers")

_START_TIMEOUT = 120.0
_STOP_GRACE = 30.0  # the workers drain for up to 25 s (server._run_server)
_MAX_BACKOFF = 30.0
_SCRAPE_TIMEOUT = 2.0
# reuse_port rebalancing: every interval, act when one worker opened more than SKEW x its fair
# share of at least MIN_STREAMS streams over two or more connections.
_BALANCE_INTERVAL = 1.0
_BALANCE_SKEW = 1.5
_BALANCE_MIN_STREAMS = 25


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the container's cgroup quota allows (cgroup v2 cpu.max, else v1 cfs), None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cores(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup quota (a pod's
    `limits.cpu`), rounded up (a quota of 1.5 CPUs still keeps two workers busy)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def worker_count(config: GatewayConfig, override: int | str | None = None) -> int:
    """How many workers `extproc serve` runs: --workers, else server.workers (auto: the cores
    available with the redis store, 1 with the embedded one)."""
    wanted = override if override is not None else config.server.workers
    if wanted == "auto":
        return available_cores() if config.store.backend == "redis" else 1
    n = int(wanted)
    if not 1 <= n <= 64:
        raise ConfigError(f"--workers: expected 1 to 64, got {n}")
    if n > 1 and config.store.backend != "redis":
        raise ConfigError(
            f"server.workers: {n} workers need store.backend redis (the embedded store's limits, caches and "
            "key changes belong to one process)"
        )
    return n


def _worker_main(
    config: GatewayConfig, index: int, listen: str, reuse_port: bool, metrics: str, conn: Connection
) -> None:
    """A worker process (spawned): one whole server, announcing itself on `conn`."""
    configure_logging(config.server.log_level, f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")

    def watch_parent() -> None:
        # The supervisor never writes: recv returns only at EOF, when it is gone.
        with contextlib.suppress(EOFError, OSError):
            conn.recv()
        log.warning("supervisor gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="watch-supervisor", daemon=True).start()
    from .server import run

    try:
        run(config, listen, metrics_listen=metrics, reuse_port=reuse_port, announce=conn.send)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)


def to_shed(reports: list[dict[str, Any] | None]) -> int | None:
    """The worker that should give up a connection: it opened more than _BALANCE_SKEW times its
    fair share of the streams of the last window (when there were enough to judge) and over two
    or more connections (moving its only one would only move the imbalance)."""
    if not reports or any(r is None for r in reports):
        return None
    opened = [int(r["opened"]) for r in reports if r is not None]
    total = sum(opened)
    busiest = max(range(len(opened)), key=opened.__getitem__)
    report = reports[busiest]
    assert report is not None
    if total < _BALANCE_MIN_STREAMS or opened[busiest] * len(opened) <= _BALANCE_SKEW * total:
        return None
    return busiest if int(report["active"]) >= 2 else None


@dataclass
class Worker:
    index: int
    listen: str
    proc: BaseProcess | None = None
    conn: Connection | None = None
    pid: int | None = None
    ops_port: int | None = None
    started: bool = False  # announced at least once: later exits are restarted
    announced: bool = False  # the current process announced
    restarts: int = 0
    failures: int = 0  # consecutive exits, for the backoff
    restart_at: float | None = None


@dataclass
class Supervisor:
    config: GatewayConfig
    listens: list[str]
    reuse_port: bool
    # The supervisor's ops address (server.metrics_listen or --metrics-listen); None: it serves
    # none (each worker still has its own on loopback, for the supervisor's rebalancing).
    metrics_listen: str | None
    workers: list[Worker] = field(default_factory=list)
    exit_code: int | None = None
    # Connections a worker was told to give up (reuse_port: Envoy reconnects, maybe elsewhere).
    rebalances: int = 0
    _ctx: Any = None
    _session: aiohttp.ClientSession | None = None
    _started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.workers = [Worker(i, listen) for i, listen in enumerate(self.listens)]

    def _start(self, w: Worker) -> None:
        parent, child = self._ctx.Pipe()
        # Always an ops port of its own on loopback: the supervisor reads it (metrics, status,
        # balance) even when it serves none itself.
        metrics = "127.0.0.1:0"
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.config, w.index, w.listen, self.reuse_port, metrics, child),
            name=f"extproc-worker-{w.index}",
        )
        proc.start()
        child.close()  # only the worker holds its end: the worker's death closes the pipe
        w.proc, w.conn, w.pid, w.ops_port, w.announced, w.restart_at = proc, parent, proc.pid, None, False, None
        log.info("worker %d started (pid %d) on %s", w.index, proc.pid, w.listen)

    def _poll(self, stopping: bool) -> None:
        """Read announcements; note exits; restart what is due."""
        now = time.monotonic()
        for w in self.workers:
            if w.conn is not None:
                with contextlib.suppress(EOFError, OSError):
                    while w.conn.poll():
                        msg = w.conn.recv()
                        w.ops_port, w.announced, w.started, w.failures = msg.get("ops_port"), True, True, 0
                        log.info("worker %d ready (pid %s)", w.index, msg.get("pid"))
            if w.proc is not None and not w.proc.is_alive():
                code = w.proc.exitcode
                w.proc.join()
                if w.conn is not None:
                    w.conn.close()
                w.proc, w.conn, w.announced, w.ops_port = None, None, False, None
                if stopping:
                    continue
                if not w.started:
                    log.error("worker %d exited with code %s before it started; stopping", w.index, code)
                    self.exit_code = code if code else 1
                    return
                w.failures += 1
                delay = min(_MAX_BACKOFF, 2.0 ** (w.failures - 1))
                w.restart_at = now + delay
                log.error("worker %d (pid %s) exited with code %s; restarting in %.0fs", w.index, w.pid, code, delay)
            if not stopping and w.proc is None and w.restart_at is not None and now >= w.restart_at:
                w.restarts += 1
                self._start(w)

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        for w in self.workers:
            self._start(w)
        log.info("%d workers (%s)", len(self.workers), "reuse_port" if self.reuse_port else "one port each")
        runner: web.AppRunner | None = None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_SCRAPE_TIMEOUT))
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while not stop.is_set() and self.exit_code is None and not all(w.announced for w in self.workers):
                if time.monotonic() > deadline:
                    log.error("workers did not start within %.0fs; stopping", _START_TIMEOUT)
                    self.exit_code = 1
                    break
                self._poll(stopping=False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)
            if self.exit_code is None and not stop.is_set():
                if self.metrics_listen:
                    runner = await self._serve_ops(self.metrics_listen)
                balancing = self.reuse_port and self.config.server.transport == "native"
                next_balance = time.monotonic() + _BALANCE_INTERVAL
                while not stop.is_set() and self.exit_code is None:
                    self._poll(stopping=False)
                    if balancing and time.monotonic() >= next_balance:
                        shed = await self._rebalance()
                        # After a shed, skip a window: the next one still mixes before and after.
                        next_balance = time.monotonic() + _BALANCE_INTERVAL * (2 if shed else 1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            if runner is not None:
                await runner.cleanup()
            await self._stop_all()
            await self._session.close()
        return self.exit_code or 0

    async def _stop_all(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.is_alive() and w.proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for w in self.workers:
            if w.proc is None:
                continue
            await asyncio.to_thread(w.proc.join, max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                log.error("worker %d did not stop within %.0fs; killing it", w.index, _STOP_GRACE)
                w.proc.kill()
                await asyncio.to_thread(w.proc.join, 5)
        self._poll(stopping=True)

    async def _rebalance(self) -> bool:
        """Why: with reuse_port the kernel hands each of Envoy's few long-lived HTTP/2 connections
        to a worker at random, and measured over restarts all of them landed on one worker half
        the time. A worker that opened more than its share of streams over two or more
        connections is told to GOAWAY its busiest; Envoy's next stream opens a new connection,
        which lands on a random worker: a few tries even it out. True when a worker shed one."""
        busiest = to_shed(await self._gather_json("/balance"))
        if busiest is None:
            return False
        w = self.workers[busiest]
        assert self._session is not None
        try:
            async with self._session.post(f"http://127.0.0.1:{w.ops_port}/shed") as resp:
                shed = bool((await resp.json()).get("shed"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return False
        if shed:
            self.rebalances += 1
            log.info("worker %d opened more than its share of streams: it shed a connection", w.index)
        return shed

    # The supervisor's ops endpoint.

    async def _serve_ops(self, address: str) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = address.rpartition(":")
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(f"server.metrics_listen {address}: cannot listen ({err})") from None
        log.info("metrics and health of %d workers on http://%s", len(self.workers), address)
        return runner

    async def _fetch(self, w: Worker, path: str) -> str | None:
        if w.ops_port is None or self._session is None:
            return None
        try:
            async with self._session.get(f"http://127.0.0.1:{w.ops_port}{path}") as resp:
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _gather(self, path: str) -> list[str | None]:
        return list(await asyncio.gather(*(self._fetch(w, path) for w in self.workers)))

    async def _metrics(self, request: web.Request) -> web.Response:
        texts = await self._gather("/metrics")
        up = GaugeMetricFamily("gateway_worker_up", "1 when the worker answered this scrape.", labels=["worker"])
        restarts = CounterMetricFamily(
            "gateway_worker_restarts", "Worker processes restarted after they died.", labels=["worker"]
        )
        for w, text in zip(self.workers, texts, strict=True):
            up.add_metric([str(w.index)], 1.0 if text is not None else 0.0)
            restarts.add_metric([str(w.index)], float(w.restarts))
        workers = GaugeMetricFamily("gateway_workers", "Worker processes configured.", value=len(self.workers))
        rebalances = CounterMetricFamily(
            "gateway_worker_rebalances",
            "Envoy connections a busy worker gave up so the kernel reassigns them (reuse_port).",
            value=self.rebalances,
        )
        body = merge([t for t in texts if t is not None], [workers, up, restarts, rebalances])
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        # Liveness is the supervisor's: it restarts workers itself.
        alive = sum(1 for w in self.workers if w.proc is not None and w.proc.is_alive())
        return _json({"status": "ok", "workers_alive": alive})

    async def _gather_json(self, path: str) -> list[dict[str, Any] | None]:
        """Each worker's JSON answer at `path`; None for one that did not answer, or not in JSON."""
        out: list[dict[str, Any] | None] = []
        for text in await self._gather(path):
            try:
                out.append(orjson.loads(text) if text is not None else None)
            except orjson.JSONDecodeError:
                out.append(None)
        return out

    @staticmethod
    def _reasons(statuses: list[dict[str, Any] | None]) -> list[str]:
        reasons: list[str] = []
        for i, s in enumerate(statuses):
            if s is None:
                reasons.append(f"worker {i}: not answering")
            else:
                reasons += [f"worker {i}: {r}" for r in s.get("reasons") or ()]
                if not s.get("ready") and not s.get("reasons"):
                    reasons.append(f"worker {i}: not ready")
        return reasons

    async def _readyz(self, request: web.Request) -> web.Response:
        statuses = await self._gather_json("/status")
        ready = all(s is not None and s.get("ready") for s in statuses)
        return _json({"ready": ready, "reasons": self._reasons(statuses)}, 200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        statuses = await self._gather_json("/status")
        live = [s for s in statuses if s is not None]

        def total(key: str) -> int:
            return sum(int(s.get(key) or 0) for s in live)

        return _json(
            {
                "version": __version__,
                "uptime_seconds": round(time.time() - self._started, 1),
                "transport": self.config.server.transport,
                "store": self.config.store.backend,
                "store_reachable": all(s.get("store_reachable") for s in live) and len(live) == len(statuses),
                "ready": all(s is not None and s.get("ready") for s in statuses),
                "reasons": self._reasons(statuses),
                "in_flight": total("in_flight"),
                "open_streams": total("open_streams"),
                # One directory for all workers: each reports its size.
                "spool_bytes": max((int(s.get("spool_bytes") or 0) for s in live), default=0),
                "records_replayed": total("records_replayed"),
                "tracing": any(s.get("tracing") for s in live),
                "rebalances": self.rebalances,
                "workers": [
                    {
                        "index": w.index,
                        "pid": w.pid if w.proc is not None else None,
                        "listen": w.listen,
                        "ops_port": w.ops_port,
                        "restarts": w.restarts,
                        "ready": bool(s and s.get("ready")),
                        "in_flight": int(s.get("in_flight") or 0) if s else 0,
                    }
                    for w, s in zip(self.workers, statuses, strict=True)
                ],
            }
        )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def run(config: GatewayConfig, n: int, listen: str | None = None, metrics_listen: str | None = None) -> int:
    """Run n workers until SIGTERM/SIGINT; the exit code of the whole."""
    server = config.server
    listens = server.worker_addresses(n, listen)
    supervisor = Supervisor(config, listens, server.worker_listen == "reuse_port", server.ops_address(metrics_listen))
    return asyncio.run(supervisor.run())
