"""Moves usage records from the per-tenant Redis streams into the durable ledger.

Every server process runs one, all in the same consumer group, so the work spreads over replicas
and survives any of them. The order that makes it exactly-once: insert into the ledger (idempotent
by request_id, one transaction), and only then XACK + XDEL. A crash in between leaves the entries
pending; XAUTOCLAIM hands entries idle for `claim_idle_ms` (a dead or stuck consumer's) to a live
one, which inserts them again, and the ledger ignores the rows it already has. A read whose reply
was lost (Redis killed after delivering it: the delivery is in its append-only file, the reply
never arrived) leaves entries pending on this very consumer; so after starting and after any
failed round the consumer first reads its own pending list (XREADGROUP from id 0) instead of
leaving them to a claim `claim_idle_ms` later. While the ledger is
down the entries simply wait in the stream (pending, or not yet read), never in memory only.

An entry that does not parse, or whose record the ledger refuses as invalid (InvalidRecord, a
ValueError: the batch is bisected to find it), is copied to `<p>usage:dead` with its stream, id and
error, logged, and only then acknowledged: never dropped silently, and it cannot block the stream.
Any other insert error (LedgerUnavailable) keeps the batch pending and is retried with backoff.

XREADGROUP blocks for up to `block_ms`, longer than the shared client's socket timeout, so the
blocking read uses its own single connection; every other command goes through the backend.
The one XREADGROUP names every tenant stream, which a Redis Cluster refuses (CROSSSLOT): on a
cluster the read would have to be split per slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ..store.errors import StoreUnavailable
from ..store.redis import RedisBackend, bounded
from ..throttle import LogThrottle
from .record import UsageRecord
from .sink import LedgerWriter, insert_setting_aside
from .spool import parse_record

if TYPE_CHECKING:
    from ..observability.metrics import GatewayMetrics

log = logging.getLogger("extproc.accounting.consumer")

T = TypeVar("T")


async def _call(coro: Awaitable[T], seconds: float) -> T:
    """Like RedisBackend.call, but lets Redis's own answers (ResponseError: BUSYGROUP, NOGROUP)
    through, because they mean something here."""
    try:
        return await bounded(coro, seconds)
    except ResponseError:
        raise
    except (RedisError, OSError, TimeoutError) as err:
        raise StoreUnavailable(f"redis: {type(err).__name__}") from None


@dataclass
class ConsumerCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    read: int = 0
    claimed: int = 0
    inserted: int = 0
    # Rows the ledger already had: redeliveries after a crash or a claim, harmless by design.
    duplicates: int = 0
    acked: int = 0
    dead_lettered: int = 0
    insert_failures: int = 0
    # Records in the usage streams (all tenants, this prefix) when last measured; -1: not yet.
    backlog: int = -1


@dataclass(frozen=True, slots=True)
class _Entry:
    stream: str
    id: str
    fields: dict[str, Any] | None


class _Stopping(Exception):
    pass


class LedgerConsumer:
    def __init__(
        self,
        backend: RedisBackend,
        ledger: LedgerWriter,
        group: str = "ledger",
        consumer: str | None = None,
        *,
        count: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        refresh_interval: float = 10.0,
        backlog_interval: float = 5.0,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
        linger: float = 0.1,
    ) -> None:
        self.backend = backend
        self.ledger = ledger
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.count = count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.refresh_interval = refresh_interval
        # How often the backlog (records in the usage streams, not in the ledger yet) is measured.
        self.backlog_interval = backlog_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # After a round that moved less than a full batch, wait this long before reading again, so
        # that records arriving one by one move in batches: every round costs a read and an
        # acknowledgement (Redis round trips), a ledger transaction (a sync to disk) and two thread
        # hops, ~2 ms of CPU per round on a 2-core VM, where a lone record took ~1.7 ms of the
        # server's CPU at one request at a time. Records reach the ledger up to `linger` later;
        # they are in the stream (durable) all along.
        self.linger = linger
        self.prefix = backend.prefix
        self.streams_key = f"{self.prefix}usage:streams"
        self.dead_key = f"{self.prefix}usage:dead"
        self.counters = ConsumerCounters()
        self._client = backend.client
        self._blocking: aioredis.Redis | None = None
        self._streams: list[str] = []
        self._groups: set[str] = set()
        self._next_refresh = 0.0
        self._next_claim = 0.0
        self._next_backlog = 0.0
        # Read this consumer's own pending entries before new ones (see the module docstring).
        self._own_pending = True
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warnings = LogThrottle(5.0)

    async def start(self) -> None:
        self._stop.clear()
        self._blocking = aioredis.Redis.from_url(
            self.backend.url,
            socket_timeout=self.block_ms / 1000 + self.backend.timeout * 2,
            socket_connect_timeout=self.backend.timeout,
            max_connections=1,
            decode_responses=True,
        )
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stops after the step in flight (a blocking read ends within block_ms); whatever is not
        acknowledged yet stays pending for another consumer."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.block_ms / 1000 + self.backend.timeout * 4)
            except TimeoutError:
                self._task.cancel()
                await asyncio.wait({self._task})
            self._task = None
        if self._blocking is not None:
            await self._blocking.aclose()
            self._blocking = None

    async def _run(self) -> None:
        delay = self.min_backoff
        while not self._stop.is_set():
            try:
                handled = await self.step()
                delay = self.min_backoff
                if 0 < handled < self.count and self.linger:
                    await self._sleep(self.linger)
            except _Stopping:
                return
            except Exception as err:
                self._own_pending = True
                if isinstance(err, ResponseError) and "NOGROUP" in str(err):
                    self._groups.clear()  # a stream was deleted: create the groups again
                    self._next_refresh = 0.0
                self._warn("usage consumer: %s; retrying in %.1fs", _describe(err), delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    async def step(self) -> int:
        """One round: refresh the stream list, claim abandoned entries, read new ones, move them.
        Returns how many entries it handled."""
        now = time.monotonic()
        if now >= self._next_refresh or await self._stream_count() != len(self._streams):
            await self._refresh()
            self._next_refresh = now + self.refresh_interval
        if now >= self._next_backlog:
            await self._measure_backlog()
            self._next_backlog = now + self.backlog_interval
        if not self._streams:
            await self._sleep(min(self.refresh_interval, self.block_ms / 1000))
            return 0
        handled = 0
        if self._own_pending:
            own = await self._read_own()
            if own:
                await self._move(own)
                return len(own)
            self._own_pending = False
        if now >= self._next_claim:
            claimed = await self._autoclaim()
            self._next_claim = now + self.claim_idle_ms / 2000
            if claimed:
                self.counters.claimed += len(claimed)
                await self._move(claimed)
                handled += len(claimed)
        entries = await self._read()
        if entries:
            self.counters.read += len(entries)
            await self._move(entries)
            handled += len(entries)
        return handled

    async def _measure_backlog(self) -> None:
        """XLEN of every usage stream, in one round trip: entries leave a stream only once the
        ledger committed them (XACK + XDEL), so the sum is what the ledger does not have yet,
        whichever consumer holds them. The alert that the money path is stuck: a consumer down,
        the database down, or `ledger.consumer: false` with no `extproc db consume` running."""
        if not self._streams:
            self.counters.backlog = 0
            return
        pipe = self._client.pipeline(transaction=False)
        for stream in self._streams:
            pipe.xlen(stream)
        lengths = await self.backend.call(pipe.execute())
        self.counters.backlog = sum(int(n) for n in lengths)

    async def _stream_count(self) -> int:
        """SCARD of the stream list, every round: a tenant's first records (a new stream, from any
        replica) are read within a round, not up to `refresh_interval` later (the full list is read
        only when the count moved, or every `refresh_interval` anyway)."""
        return int(await self.backend.call(self._client.scard(self.streams_key)))

    async def _refresh(self) -> None:
        members = await self.backend.call(self._client.smembers(self.streams_key))
        streams = sorted(str(m) for m in members)
        for stream in streams:
            if stream in self._groups:
                continue
            try:
                # From id 0: entries added before the group existed are read too.
                await _call(
                    self._client.xgroup_create(stream, self.group, id="0", mkstream=True), self.backend.timeout * 2
                )
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
            self._groups.add(stream)
        self._streams = [s for s in streams if s in self._groups]

    async def _read(self) -> list[_Entry]:
        assert self._blocking is not None
        reply = await _call(
            self._blocking.xreadgroup(
                self.group, self.consumer, dict.fromkeys(self._streams, ">"), count=self.count, block=self.block_ms
            ),
            self.block_ms / 1000 + self.backend.timeout * 4,
        )
        return list(_entries(reply))

    async def _read_own(self) -> list[_Entry]:
        """Up to `count` entries delivered to this consumer and not acknowledged (no blocking)."""
        reply = await _call(
            self._client.xreadgroup(self.group, self.consumer, dict.fromkeys(self._streams, "0"), count=self.count),
            self.backend.timeout * 2,
        )
        return list(_entries(reply))

    async def _autoclaim(self) -> list[_Entry]:
        out: list[_Entry] = []
        for stream in self._streams:
            start = "0-0"
            for _ in range(10):  # bounded per round; the rest next round
                reply = await self.backend.call(
                    self._client.xautoclaim(
                        stream, self.group, self.consumer, self.claim_idle_ms, start_id=start, count=self.count
                    )
                )
                start = str(reply[0])
                out.extend(_Entry(stream, str(i), f) for i, f in reply[1] if i is not None)
                if start == "0-0":
                    break
        return out

    async def _move(self, entries: Sequence[_Entry]) -> None:
        good: list[tuple[_Entry, UsageRecord]] = []
        gone: list[_Entry] = []
        for e in entries:
            if e.fields is None:  # deleted after delivery: nothing to insert
                gone.append(e)
                continue
            try:
                good.append((e, parse_record(e.fields.get("data") or "")))
            except ValueError as err:
                await self._dead_letter(e, str(err))
        if gone:
            await self._ack(gone)
        for i in range(0, len(good), self.count):
            chunk = good[i : i + self.count]
            refused = await self._insert([rec for _, rec in chunk])
            for j, why in refused:
                await self._dead_letter(chunk[j][0], f"the ledger refused it: {why}")
            skip = {j for j, _ in refused}
            await self._ack([e for j, (e, _) in enumerate(chunk) if j not in skip])

    async def _insert(self, records: list[UsageRecord]) -> list[tuple[int, ValueError]]:
        """Retries until the ledger takes them (on stop the entries stay pending); returns the
        records it refused as invalid, for the dead-letter stream."""
        delay = self.min_backoff
        while True:
            try:
                n, refused = await insert_setting_aside(self.ledger, records)
            except Exception as err:
                self.counters.insert_failures += 1
                self._warn("usage consumer: ledger insert of %d records failed: %s", len(records), _describe(err))
                if self._stop.is_set():
                    raise _Stopping from None
                await self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            self.counters.inserted += n
            self.counters.duplicates += len(records) - n - len(refused)
            return refused

    async def _ack(self, entries: Iterable[_Entry]) -> None:
        """XACK then XDEL, retried: the ledger has the rows, so the stream must let go of them."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        delay = self.min_backoff
        while True:
            pipe = self._client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
                pipe.xdel(stream, *ids)
            try:
                await self.backend.call(pipe.execute())
            except StoreUnavailable as err:
                if self._stop.is_set():
                    raise _Stopping from None  # pending; a claim re-inserts them (idempotent)
                self._warn("usage consumer: cannot acknowledge entries (%s); retrying", err)
                await self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            self.counters.acked += sum(len(ids) for ids in by_stream.values())
            return

    async def _dead_letter(self, e: _Entry, error: str) -> None:
        raw = (e.fields or {}).get("data")
        fields: dict[str, str] = {"stream": e.stream, "id": e.id, "error": error[:500]}
        fields["data"] = raw if isinstance(raw, str) else repr(e.fields)
        await self.backend.call(self._client.xadd(self.dead_key, fields))  # type: ignore[arg-type]
        log.error(
            "usage consumer: entry %s of %s cannot go to the ledger (%s); moved to %s",
            e.id,
            e.stream,
            error,
            self.dead_key,
        )
        self.counters.dead_lettered += 1
        await self._ack([e])

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _warn(self, msg: str, *args: Any) -> None:
        if self._warnings.allow():
            log.warning(msg, *args)


def _entries(reply: Any) -> Iterable[_Entry]:
    """XREADGROUP's reply in RESP2 (list of [stream, entries]) or RESP3 (map) form."""
    if not reply:
        return
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in items:
        for entry_id, fields in entries:
            yield _Entry(str(stream), str(entry_id), fields)


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def export_consumer(metrics: GatewayMetrics, consumer: LedgerConsumer) -> None:
    """The ledger consumer's figures: in a server that runs one, or in `extproc db consume` (here,
    not in the server module, so that command does not load the whole server to export them)."""
    cc = consumer.counters
    metrics.counter_source(
        "gateway_ledger_records",
        "Usage records the ledger consumer handled, by result.",
        lambda: {("inserted",): cc.inserted, ("duplicate",): cc.duplicates, ("dead_lettered",): cc.dead_lettered},
        ("result",),
    )
    metrics.counter_source(
        "gateway_ledger_insert_failures", "Ledger inserts that failed and were retried.", lambda: cc.insert_failures
    )

    def backlog() -> dict[tuple[str, ...], float]:
        return {} if cc.backlog < 0 else {(): float(cc.backlog)}

    metrics.gauge(
        "gateway_ledger_backlog_records",
        "Usage records in Redis not in the ledger yet (all tenants), measured every few seconds.",
        backlog,
    )
