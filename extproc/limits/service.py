"""The limits of one server process: which limiter answers, the requests in flight, alerts.

On the Redis backend the shared RedisLimiter answers; when Redis cannot, `limits.failure_mode`
decides: "closed" refuses (LimitsUnavailable -> 503 limits_unavailable), "open" (the default) uses a
per-process FallbackLimiter (each limit divided by `limits.expected_replicas`) until a probe finds
Redis again. Both choices are logged (at most once per outage) and counted. On the embedded backend
a LocalLimiter answers, reading budget spend from the embedded usage sink and the ledger.

Settling never raises: a settle the store could not take is retried in the background for up to one
lease, after which the store has let the reservation go anyway (it was a lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson

from ..accounting.sink import EmbeddedUsageSink, cost_pusd
from ..config import GatewayConfig
from ..ledger import Ledger
from ..store.errors import StoreUnavailable
from ..throttle import LogThrottle
from .alerts import AlertSender
from .engine import Demand, Limiter, Verdict
from .local import FallbackLimiter, LocalLimiter
from .spec import Rule

log = logging.getLogger("extproc.limits")


class LimitsUnavailable(Exception):
    """The shared limiter cannot answer and failure_mode is closed."""


@dataclass
class LimitsCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    acquired: int = 0
    refused: int = 0
    # Requests decided by the per-process fallback while Redis was unreachable (failure_mode open).
    fallback_decisions: int = 0
    # Requests refused because Redis was unreachable (failure_mode closed).
    unavailable_refusals: int = 0
    outages: int = 0
    settle_retries: int = 0
    settle_failures: int = 0


class LimitsService:
    def __init__(
        self,
        primary: Limiter,
        *,
        fallback: FallbackLimiter | None = None,
        failure_mode: Literal["open", "closed"] = "open",
        alerts: AlertSender | None = None,
        lease_seconds: float = 30.0,
        ping: Callable[[], Awaitable[None]] | None = None,
        probe_interval: float = 0.5,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failure_mode = failure_mode
        self.alerts = alerts or AlertSender()
        self.lease_seconds = lease_seconds
        self.ping = ping
        self.probe_interval = probe_interval
        self.counters = LimitsCounters()
        self.in_flight: dict[str, Demand] = {}
        self._down = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        return self._down

    async def start(self) -> None:
        await self.alerts.start()
        self._refresher = asyncio.create_task(self._refresh_forever())

    # -- the request path ---------------------------------------------------------------------------

    async def acquire(self, demand: Demand) -> Verdict:
        """Raises LimitsUnavailable (failure_mode closed, store unreachable)."""
        verdict: Verdict | None = None
        if not self._down:
            try:
                verdict = await self.primary.acquire(demand)
            except StoreUnavailable as err:
                self._mark_down(err)
            else:
                if self.fallback is not None and verdict.allowed:
                    self.fallback.remember(demand.tenant, verdict.budgets)
        if verdict is None:
            if self.fallback is None or self.failure_mode == "closed":
                self.counters.unavailable_refusals += 1
                raise LimitsUnavailable("limits store unreachable")
            self.counters.fallback_decisions += 1
            verdict = await self.fallback.acquire(demand)
        if verdict.allowed:
            self.counters.acquired += 1
            self.in_flight[demand.request_id] = demand
        else:
            self.counters.refused += 1
        return verdict

    def release_keys(self, demand: Demand) -> tuple[str, ...]:
        holder = demand.holder
        return holder.release_keys(demand) if holder is not None else ()

    async def ended(self, demand: Demand, tokens: int, pusd: int) -> None:
        """The response is complete (Limiter.ended). Never raises: when it fails, `settle` (always
        called after) releases everything anyway."""
        holder = demand.holder
        if holder is None:
            return
        try:
            alerts = await holder.ended(demand, tokens, pusd)
        except StoreUnavailable:
            return
        except Exception:
            log.exception("releasing limits at the end of the response failed (request %s)", demand.request_id)
            return
        for alert in alerts:
            self.alerts.emit(alert)

    async def settle(self, demand: Demand, tokens: int, pusd: int) -> None:
        """Never raises (runs in finish)."""
        self.in_flight.pop(demand.request_id, None)
        holder = demand.holder
        if holder is None:
            return
        try:
            alerts = await holder.settle(demand, tokens, pusd)
        except StoreUnavailable:
            self._retry_later(demand, tokens, pusd)
            return
        except Exception:
            self.counters.settle_failures += 1
            log.exception("settling limits failed (request %s)", demand.request_id)
            return
        for alert in alerts:
            self.alerts.emit(alert)

    def _retry_later(self, demand: Demand, tokens: int, pusd: int) -> None:
        self.counters.settle_retries += 1
        task = asyncio.get_running_loop().create_task(self._settle_with_retries(demand, tokens, pusd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_with_retries(self, demand: Demand, tokens: int, pusd: int) -> None:
        assert demand.holder is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_seconds
        delay = 0.2
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                alerts = await demand.holder.settle(demand, tokens, pusd)
            except StoreUnavailable:
                continue
            except Exception:
                break
            for alert in alerts:
                self.alerts.emit(alert)
            return
        # The store let the leases go by now; the tokens charged stay at the estimate.
        self.counters.settle_failures += 1
        if _throttle.allow("settle"):
            log.warning("limits: could not settle request %s; its leases expired instead", demand.request_id)

    # -- outages ------------------------------------------------------------------------------------

    def _mark_down(self, err: BaseException) -> None:
        if self._down:
            return
        self._down = True
        self.counters.outages += 1
        if self.failure_mode == "closed" or self.fallback is None:
            log.error("limits store unreachable (%s): refusing requests with limits (failure_mode closed)", err)
        else:
            log.error(
                "limits store unreachable (%s): per-process limits (each limit / %d replicas) until it is back",
                err,
                self.fallback.divisor,
            )
        if self.ping is not None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        assert self.ping is not None
        while self._down:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.ping()
            except StoreUnavailable:
                continue
            self._down = False
            if self.fallback is not None:
                self.fallback.forget()
            log.warning("limits store answers again: shared limits are back")

    # -- leases -------------------------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            by_holder: dict[int, tuple[Limiter, list[Demand]]] = {}
            for d in list(self.in_flight.values()):
                if d.holder is not None:
                    by_holder.setdefault(id(d.holder), (d.holder, []))[1].append(d)
            for holder, demands in by_holder.values():
                try:
                    await holder.refresh(demands)
                except StoreUnavailable:
                    pass  # the outage is noticed (and logged) by the request path
                except Exception:
                    log.exception("limits: refreshing leases failed")

    async def close(self) -> None:
        for task in [self._refresher, self._prober, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.alerts.close()
        await self.primary.close()


_throttle = LogThrottle(10.0)


class EmbeddedSpend:
    """Budget spend on the embedded backend: the usage sink's in-memory aggregates (every record of
    this process, counted when recorded) plus the ledger's totals from before this process started
    (read once per scope and period start, in a worker thread)."""

    def __init__(self, sink: EmbeddedUsageSink, ledger: Ledger, started: datetime | None = None) -> None:
        self.sink = sink
        self.ledger = ledger
        self.started = started or datetime.now(UTC)
        self._before: dict[tuple[str, str, str, str, str], int] = {}
        self._loading: dict[tuple[str, str, str, str], asyncio.Future[dict[str, int]]] = {}

    async def __call__(self, rule: Rule, field: str, days: list[str]) -> int:
        kind, owner = rule.kind, rule.owner
        live = sum(self.sink.counter(rule.tenant, day, kind, owner, field) for day in days)
        return live + await self._base(rule.tenant, kind, owner, days[0], field)

    async def _base(self, tenant: str, kind: str, owner: str, start: str, field: str) -> int:
        key = (tenant, kind, owner, start)
        cached = self._before.get((*key, field))
        if cached is not None:
            return cached
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._loading[key] = fut
            try:
                since = datetime.fromisoformat(start).replace(tzinfo=UTC)
                row = await self.ledger.totals(
                    since, tenant=tenant, key_id=owner if kind == "key" else None, until=self.started
                )
                values = {"cost_pusd": cost_pusd(str(row.cost_usd)) or 0, "total_tokens": row.total_tokens}
                fut.set_result(values)
            except Exception as err:
                fut.set_exception(err)
                del self._loading[key]
                raise
        values = await asyncio.shield(fut)
        for name, v in values.items():
            self._before[(*key, name)] = v
        return values.get(field, 0)


def limits_state_path(config: GatewayConfig) -> Path:
    """The embedded limiter's file, next to the embedded key store."""
    return config.state_dir / "limits.db"


class EmbeddedLimitsState:
    """The embedded limiter's state and sent alerts, kept in the embedded state directory: the
    snapshot lets `extproc limits show` (another process) see the counters, and the alert markers
    keep "once per threshold per period" across restarts."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS limits_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL,
                                                written REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS limits_alerts (once TEXT PRIMARY KEY, sent REAL NOT NULL);
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(self._SCHEMA)
            self._conn = conn
        return self._conn

    def write_snapshot(self, state: dict[str, object]) -> None:
        data = orjson.dumps(state).decode()
        with self._lock:
            self._db().execute(
                "INSERT INTO limits_snapshot (id, state, written) VALUES (1, ?, strftime('%s','now')) "
                "ON CONFLICT(id) DO UPDATE SET state=excluded.state, written=excluded.written",
                (data,),
            )

    def read_snapshot(self) -> dict[str, object]:
        with self._lock:
            row = self._db().execute("SELECT state FROM limits_snapshot WHERE id = 1").fetchone()
        return dict(orjson.loads(row[0])) if row else {}

    def mark_once(self, once: str) -> bool:
        with self._lock:
            cur = self._db().execute(
                "INSERT OR IGNORE INTO limits_alerts (once, sent) VALUES (?, strftime('%s','now'))", (once,)
            )
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


async def snapshot_forever(limiter: LocalLimiter, state: EmbeddedLimitsState, interval: float = 0.5) -> None:
    """Write the limiter's state out when it may have changed (cheap when idle)."""
    last = b""
    while True:
        await asyncio.sleep(interval)
        snap = limiter.snapshot()
        blob = orjson.dumps(snap)
        if blob != last:
            try:
                await asyncio.to_thread(state.write_snapshot, snap)
                last = blob
            except (OSError, sqlite3.Error) as err:
                if _throttle.allow("snapshot"):
                    log.warning("limits: cannot write the state snapshot (%s)", err)
