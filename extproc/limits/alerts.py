"""Budget alerts: a structured log line and a counter for each, and optionally a webhook.

The limiter decides that a threshold was crossed for the first time in its period (across replicas
on Redis); this module only tells people. The webhook is POSTed from a background task with retries
and backoff; a full queue drops the alert from the webhook (it is still logged and counted), so a
slow receiver never holds a request or grows memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .engine import Alert
from .spec import PUSD_PER_USD

log = logging.getLogger("extproc.alerts")


def usd(pusd: int) -> str:
    """Pico-USD as a plain decimal string."""
    whole, frac = divmod(pusd, PUSD_PER_USD)
    return f"{whole}.{frac:012d}".rstrip("0").rstrip(".") if frac else str(whole)


def payload(alert: Alert) -> dict[str, Any]:
    """The alert as ops tools receive it (log line and webhook body)."""
    c = alert.check
    rule = c.rule
    money = c.what == "budget_usd"
    return {
        "type": "budget_alert",
        "ts": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "tenant": rule.tenant,
        "scope": rule.kind,
        "key_id": rule.owner if rule.kind == "key" else None,
        "budget": "usd" if money else "tokens",
        "period": rule.period,
        "period_id": alert.period_id,
        "threshold": alert.threshold,
        "limit": usd(c.limit) if money else c.limit,
        "used": usd(alert.used) if money else alert.used,
    }


@dataclass
class AlertCounters:
    sent: int = 0
    webhook_delivered: int = 0
    webhook_failed: int = 0
    webhook_dropped: int = 0


class AlertSender:
    def __init__(
        self,
        webhook_url: str | None = None,
        *,
        timeout: float = 5.0,
        attempts: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        queue_size: int = 1000,
    ) -> None:
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.counters = AlertCounters()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.webhook_url:
            self._worker = asyncio.create_task(self._deliver_forever())

    def emit(self, alert: Alert) -> None:
        """Never blocks and never raises (called from a request's finish)."""
        body = payload(alert)
        self.counters.sent += 1
        log.warning("budget alert %s", json.dumps(body, sort_keys=True))
        if self.webhook_url is None:
            return
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self.counters.webhook_dropped += 1
            log.error("budget alert webhook queue full; this alert is only in the log")

    async def _deliver_forever(self) -> None:
        assert self.webhook_url is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                body = await self._queue.get()
                try:
                    await self._deliver(session, body)
                finally:
                    self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> None:
        assert self.webhook_url is not None
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            status: int | str
            try:
                async with session.post(self.webhook_url, json=body) as resp:
                    status = resp.status
                    if 200 <= resp.status < 300:
                        self.counters.webhook_delivered += 1
                        return
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                status = type(err).__name__
            if attempt == self.attempts:
                break
            log.info("budget alert webhook: attempt %d failed (%s); retrying in %.1fs", attempt, status, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        self.counters.webhook_failed += 1
        log.error("budget alert webhook: gave up after %d attempts (%s)", self.attempts, status)

    async def drain(self) -> None:
        """Wait until every queued alert was delivered or given up (tests, shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
