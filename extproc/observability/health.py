"""Readiness: may this process take requests now?

Liveness is only "the event loop answers" (/healthz). Readiness also asks whether requests would be
served rather than refused: with the Redis store, a Redis that does not answer means every request
gets 503 when authentication or limits fail closed, so the pod should leave the Service's endpoints
until it is back; when both fail open it still serves (degraded) and stays ready. Probed in the
background (one PING a second), so /readyz and the gRPC health check answer from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ..config import GatewayConfig

log = logging.getLogger("extproc.health")


class Health:
    def __init__(
        self, config: GatewayConfig, ping: Callable[[], Awaitable[None]] | None, interval: float = 1.0
    ) -> None:
        self.ping = ping
        self.interval = interval
        # Whether a store outage stops this process serving (either gate fails closed).
        self.fail_closed = config.auth.failure_mode == "closed" or config.limits.failure_mode == "closed"
        self.store_ok = True
        self.store_error = ""
        self.stopping = False
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.ping is not None:
            await self.check()
            self._task = asyncio.create_task(self._loop())

    async def check(self) -> None:
        assert self.ping is not None
        try:
            await asyncio.wait_for(self.ping(), max(self.interval, 0.5))
        except Exception as err:
            if self.store_ok:
                log.warning(
                    "store unreachable (%s): %s",
                    type(err).__name__,
                    "not ready" if self.fail_closed else "serving degraded (failure modes open)",
                )
            self.store_ok, self.store_error = False, type(err).__name__
        else:
            if not self.store_ok:
                log.info("store reachable again")
            self.store_ok, self.store_error = True, ""

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    @property
    def ready(self) -> bool:
        return not self.stopping and (self.store_ok or not self.fail_closed)

    def reasons(self) -> list[str]:
        out: list[str] = []
        if self.stopping:
            out.append("shutting down")
        if not self.store_ok:
            out.append(f"store unreachable ({self.store_error})" + ("" if self.fail_closed else ", serving degraded"))
        return out

    async def close(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
