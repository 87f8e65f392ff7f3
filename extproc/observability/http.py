"""The server's ops port: /metrics (Prometheus), /healthz, /readyz and /status (`extproc status`).

On the server's own event loop (aiohttp): a scrape renders a few hundred series in about a
millisecond, and there is no second thread to share the metrics' dicts with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from .health import Health
from .metrics import GatewayMetrics, MetricsCollector

log = logging.getLogger("extproc.ops")


def make_registry(metrics: GatewayMetrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics))
    # process_resident_memory_bytes, process_cpu_seconds_total, open fds, start time.
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class OpsServer:
    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        health: Health,
        status: Callable[[], dict[str, Any]],
        balance: tuple[Callable[[], dict[str, int]], Callable[[], bool]] | None = None,
    ) -> None:
        # balance: a worker's (load report, shed a connection) for its supervisor, on loopback.
        self.balance = balance
        self.address = address
        self.registry = registry
        self.health = health
        self.status = status
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        if self.balance is not None:
            app.router.add_get("/balance", self._balance)
            app.router.add_post("/shed", self._shed)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = self.address.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("metrics and health on http://%s:%d", host, self.port)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.health.ready
        return _json({"ready": ready, "reasons": self.health.reasons()}, 200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.status())

    async def _balance(self, request: web.Request) -> web.Response:
        assert self.balance is not None
        return _json(self.balance[0]())

    async def _shed(self, request: web.Request) -> web.Response:
        assert self.balance is not None
        return _json({"shed": self.balance[1]()})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
