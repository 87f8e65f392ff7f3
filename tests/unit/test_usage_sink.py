"""Usage records are durable, never lost, never counted twice: the Redis sink (script, spool,
replay), the ledger consumer and the embedded sink, on a real redis-server and real files."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.accounting.consumer import LedgerConsumer
from extproc.accounting.record import TOKEN_FIELDS, UsageRecord, format_ts, parse_ts
from extproc.accounting.sink import (
    AGG_FIELDS,
    EmbeddedUsageSink,
    LedgerWriter,
    RedisUsageSink,
    cost_pusd,
    increments,
    pusd_to_usd,
)
from extproc.accounting.spool import SEGMENT_PREFIX, Spool
from extproc.devstack import free_port, tcp_open, wait_until
from extproc.store.embedded import EmbeddedBackend
from extproc.store.redis import RedisBackend, tenant_tag

REPO = Path(__file__).resolve().parents[2]
DAY = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
MIB = 1024 * 1024


class FakeLedgerUnavailable(Exception):
    pass


class FakeInvalidRecord(ValueError):
    pass


class FakeLedger:
    """The Ledger contract on real SQLite: request_id PRIMARY KEY, INSERT OR IGNORE, one
    transaction per insert; `down` makes it refuse like a database that went away; a cost that is
    not a decimal makes it refuse the whole batch before writing (InvalidRecord)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute("CREATE TABLE usage (request_id TEXT PRIMARY KEY, data TEXT NOT NULL)")
        self.down = False
        # Seconds each insert stalls before it runs (a database that hangs).
        self.stall = 0.0
        self.attempts = 0
        self._lock = threading.Lock()

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        return await asyncio.to_thread(self._insert, list(records))

    def _insert(self, records: list[UsageRecord]) -> int:
        self.attempts += 1
        if self.stall:
            time.sleep(self.stall)
        if self.down:
            raise FakeLedgerUnavailable("ledger down")
        for r in records:
            if r.cost_usd is not None and not r.cost_usd.replace(".", "", 1).isdigit():
                raise FakeInvalidRecord(f"record {r.request_id!r}: cost_usd {r.cost_usd!r} is not a decimal")
        with self._lock, self.conn:
            cur = self.conn.executemany(
                "INSERT OR IGNORE INTO usage (request_id, data) VALUES (?, ?)",
                [(r.request_id, orjson.dumps(r.to_dict()).decode()) for r in records],
            )
            return cur.rowcount

    def ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self.conn.execute("SELECT request_id FROM usage ORDER BY request_id")]

    def records(self) -> list[UsageRecord]:
        with self._lock:
            rows = self.conn.execute("SELECT data FROM usage ORDER BY request_id").fetchall()
        return [UsageRecord.from_dict(orjson.loads(r[0])) for r in rows]


def make_record(i: int, **kw: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{i:05d}-{uuid.uuid4().hex[:6]}",
        "ts": DAY,
        "tenant": "acme",
        "key_id": "key_a",
        "model": "gpt-4o",
        "status": 200,
        "input_tokens": 10 + i,
        "cached_input_tokens": i % 3,
        "output_tokens": 5 + i,
        "reasoning_tokens": i % 2,
        "total_tokens": 15 + 2 * i,
        "cost_usd": f"0.{i:012d}1",
    }
    values.update(kw)
    return UsageRecord(**values)


def random_records(n: int, seed: int, decimals: int = 12) -> list[UsageRecord]:
    """Costs carry up to 12 decimals, as the ledger stores them; more exercise the sink's rounding."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        fraction = f"{rnd.randint(0, 10**decimals - 1):0{decimals}d}"
        cost = rnd.choice([None, "0", f"{rnd.randint(0, 3)}.{fraction}", f"0.{'0' * (decimals - 1)}5"])
        out.append(
            make_record(
                i,
                tenant=rnd.choice(["acme", "", "beta-2"]),
                key_id=rnd.choice(["key_a", "key_b", ""]),
                model=rnd.choice(["gpt-4o", "claude-3-5-sonnet", "mistral/large:latest"]),
                ts=DAY + timedelta(hours=rnd.choice([0, 13])),
                status=rnd.choice([200, 200, 429, 502]),
                error_code=rnd.choice([None, None, "upstream_timeout"]),
                estimated=rnd.random() < 0.2,
                input_tokens=rnd.randint(0, 10**6),
                output_tokens=rnd.randint(0, 10**5),
                cost_usd=cost,
            )
        )
    return out


def expected_aggregates(records: Sequence[UsageRecord]) -> dict[tuple[str, str, str, str], dict[str, int]]:
    """Computed independently of the sink: what each hash must hold."""
    out: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for r in records:
        day = r.ts.astimezone(UTC).strftime("%Y-%m-%d")
        for scope, sid in (("tenant", ""), ("key", r.key_id or "_"), ("model", r.model or "_")):
            agg = out.setdefault((r.tenant, day, scope, sid), dict.fromkeys(AGG_FIELDS, 0))
            agg["requests"] += 1
            for name in TOKEN_FIELDS:
                agg[name] += getattr(r, name)
            if r.cost_usd is None:
                agg["unpriced_requests"] += 1
            else:
                pusd = (Decimal(r.cost_usd) * 10**12).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
                agg["cost_pusd"] += int(pusd)
            agg["estimated_requests"] += r.estimated
            agg["errors"] += r.error_code is not None or r.status >= 400
    return out


async def eventually(cond: Callable[[], Awaitable[bool]], limit: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if await cond():
                return
        except RedisConnectionError:
            # A test's own read through a connection that a restarted Redis closed: try again
            # (the code under test has its own retries; the test's polling must not be stricter).
            if time.monotonic() >= deadline:
                raise
        assert time.monotonic() < deadline, f"{what} not met within {limit}s"
        await asyncio.sleep(0.02)


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
async def backend(redis_url: str, tmp_path: Path) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:", state_dir=tmp_path)
    yield b
    await b.close()


@pytest.fixture
def ledger(tmp_path: Path) -> FakeLedger:
    return FakeLedger(tmp_path / "ledger.db")


_OPEN: list[RedisUsageSink | EmbeddedUsageSink | LedgerConsumer] = []


@pytest.fixture(autouse=True)
async def _close_what_a_failed_test_left_open() -> AsyncIterator[None]:
    yield
    while _OPEN:
        with contextlib.suppress(Exception):
            await _OPEN.pop().close()


def fast_sink(backend: RedisBackend, spool: Spool) -> RedisUsageSink:
    sink = RedisUsageSink(backend, spool, replay_interval=0.2, min_backoff=0.02, max_backoff=0.2)
    _OPEN.append(sink)
    return sink


def fast_consumer(backend: RedisBackend, ledger: LedgerWriter, **kw: Any) -> LedgerConsumer:
    values: dict[str, Any] = {"block_ms": 200, "refresh_interval": 0.1, "min_backoff": 0.02, "max_backoff": 0.2}
    values.update(kw)
    consumer = LedgerConsumer(backend, ledger, **values)
    _OPEN.append(consumer)
    return consumer


async def xrange(backend: RedisBackend, key: str) -> list[tuple[str, dict[str, str]]]:
    return cast(list[tuple[str, dict[str, str]]], await backend.client.xrange(key))


async def stream_ids(backend: RedisBackend, tenant: str = "acme") -> list[str]:
    entries = await xrange(backend, f"{backend.prefix}{tenant_tag(tenant)}:usage")
    return [orjson.loads(fields["data"])["request_id"] for _, fields in entries]


def spool_segments(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name.startswith(SEGMENT_PREFIX)] if path.exists() else []


async def spool_empty(path: Path) -> bool:
    return not await asyncio.to_thread(spool_segments, path)


# --- pure helpers --------------------------------------------------------------------------------

COST_CASES = [
    ("1", 10**12),
    ("0.000001", 10**6),
    ("0", 0),
    ("12.345678901234", 12_345_678_901_234),
    ("123456.789012345678", 123_456_789_012_345_678),
    # More than 12 decimals: half-even at the pico-USD.
    ("0.0000000000005", 0),
    ("0.0000000000015", 2),
    ("0.0000000000025", 2),
    ("0.00000000000251", 3),
    ("-0.000000000001", -1),
    (None, None),
    ("not a number", None),
    ("NaN", None),
    ("Infinity", None),
]


@pytest.mark.parametrize(("cost", "want"), COST_CASES)
def test_cost_in_pico_usd_is_exact(cost: str | None, want: int | None) -> None:
    assert cost_pusd(cost) == want


@pytest.mark.parametrize(
    ("pusd", "text"), [(0, "0"), (10**12, "1"), (420_000_000, "0.00042"), (12_345_678_901_234, "12.345678901234")]
)
def test_pusd_back_to_usd_text(pusd: int, text: str) -> None:
    assert pusd_to_usd(pusd) == text


INCREMENT_CASES: list[tuple[dict[str, Any], dict[str, int]]] = [
    ({}, {"requests": 1, "input_tokens": 3, "output_tokens": 4, "total_tokens": 7, "cost_pusd": 5 * 10**9}),
    ({"cost_usd": None}, {"unpriced_requests": 1}),
    ({"estimated": True}, {"estimated_requests": 1}),
    ({"status": 502}, {"errors": 1}),
    ({"status": 200, "error_code": "client_disconnected"}, {"errors": 1}),
    ({"cost_usd": "0"}, {}),
]


@pytest.mark.parametrize(("changes", "includes"), INCREMENT_CASES)
def test_increments(changes: dict[str, Any], includes: dict[str, int]) -> None:
    base: dict[str, Any] = {
        "status": 200,
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
        "cost_usd": "0.005",
    }
    inc = increments(UsageRecord(request_id="r", ts=DAY, **{**base, **changes}))
    assert includes.items() <= inc.items()
    assert all(v != 0 for v in inc.values()), "only non-zero increments travel"
    if changes.get("cost_usd", "x") is None or changes.get("cost_usd") == "0":
        assert "cost_pusd" not in inc


@pytest.mark.parametrize(
    ("tenant", "tag"), [("acme", "{t:acme}"), ("", "{t:_}"), ("a-b_C9", "{t:a-b_C9}"), ("x}{", "{t:~787d7b}")]
)
def test_tenant_tag(tenant: str, tag: str) -> None:
    assert tenant_tag(tenant) == tag


# --- Redis sink ------------------------------------------------------------------------------------


async def test_same_request_twice_is_counted_once(backend: RedisBackend, tmp_path: Path) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    rec = make_record(1)
    await sink.record(rec)
    await sink.record(rec)
    await sink.apply([rec])  # a replay of it, too
    assert await stream_ids(backend) == [rec.request_id]
    agg = await sink.aggregates("acme", "2025-03-04", "tenant")
    assert agg["requests"] == 1
    assert agg["input_tokens"] == rec.input_tokens
    assert sink.counters.written == 1
    assert sink.counters.duplicates == 2
    await sink.close()


@pytest.mark.parametrize("together", [1, 30], ids=["alone", "pipelined"])
async def test_a_lost_script_cache_is_reloaded(backend: RedisBackend, tmp_path: Path, together: int) -> None:
    """A restarted Redis forgets loaded scripts: the sink loads it again, nothing is spooled."""
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    await sink.record(make_record(0))
    await backend.client.script_flush()
    await asyncio.gather(*(sink.record(make_record(i)) for i in range(1, together + 1)))
    assert sink.counters.written == together + 1
    assert sink.counters.spooled == 0
    await sink.close()


async def test_stream_trimming_is_opt_in(backend: RedisBackend, tmp_path: Path) -> None:
    default = fast_sink(backend, Spool(tmp_path / "a", max_bytes=MIB))
    trimmed = RedisUsageSink(backend, Spool(tmp_path / "b", max_bytes=MIB), stream_maxlen=1000)
    assert default.stream_maxlen == 0
    await trimmed.start()
    await asyncio.gather(*(trimmed.record(make_record(i)) for i in range(5)))
    assert len(await stream_ids(backend)) == 5
    await trimmed.close()


async def test_close_always_returns(backend: RedisBackend, tmp_path: Path) -> None:
    """Python 3.11's wait_for can drop the cancel close() sends the replayer (when its inner future
    completes in the same tick); close() must not depend on it."""
    for i in range(60):
        sink = RedisUsageSink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
        await sink.start()
        await asyncio.gather(*(sink.record(make_record(i * 10 + j)) for j in range(i % 3)))
        await asyncio.wait_for(sink.close(), 5)


async def test_key_layout(backend: RedisBackend, tmp_path: Path) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    await sink.record(make_record(1, tenant="", key_id="key_z", model="m/x:1", request_id="rid-1"))
    p, c = backend.prefix, backend.client
    keys = set(await c.keys(f"{p}*"))
    assert keys == {
        f"{p}usage:streams",
        f"{p}{{t:_}}:usage",
        f"{p}{{t:_}}:usage:seen:rid-1",
        f"{p}{{t:_}}:agg:2025-03-04:tenant",
        f"{p}{{t:_}}:agg:2025-03-04:key:key_z",
        f"{p}{{t:_}}:agg:2025-03-04:model:m/x:1",
    }
    assert await c.smembers(f"{p}usage:streams") == {f"{p}{{t:_}}:usage"}
    assert 7 * 86400 - 5 < await c.ttl(f"{p}{{t:_}}:usage:seen:rid-1") <= 7 * 86400
    assert 399 * 86400 < await c.ttl(f"{p}{{t:_}}:agg:2025-03-04:tenant") <= 400 * 86400
    assert await c.ttl(f"{p}{{t:_}}:usage") == -1, "the stream never expires"
    await sink.close()


async def test_aggregates_are_the_exact_sum_of_the_records(backend: RedisBackend, tmp_path: Path) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = random_records(400, seed=7, decimals=15)
    await asyncio.gather(*(sink.record(r) for r in records))
    want = expected_aggregates(records)
    assert len(want) > 20
    for (tenant, day, scope, sid), counters in want.items():
        got = await sink.aggregates(tenant, day, scope, sid)  # type: ignore[arg-type]
        assert {k: got[k] for k in AGG_FIELDS} == counters, (tenant, day, scope, sid)
        assert Decimal(str(got["cost_usd"])) == Decimal(counters["cost_pusd"]) / 10**12
    assert await sink.aggregates("acme", "1999-01-01", "tenant") == {**dict.fromkeys(AGG_FIELDS, 0), "cost_usd": "0"}
    assert sink.counters.written == 400
    await sink.close()


async def test_a_replay_that_crashed_before_deleting_counts_once(backend: RedisBackend, tmp_path: Path) -> None:
    """Crash between applying a segment and deleting it: the next replay applies it again."""
    spool = Spool(tmp_path / "spool", max_bytes=MIB)
    sink = fast_sink(backend, spool)
    records = [make_record(i) for i in range(30)]
    for r in records:
        assert await spool.append(r)

    async def apply_then_crash(recs: list[UsageRecord]) -> None:
        await sink.apply(recs)
        raise RuntimeError("killed before the segment was deleted")

    with pytest.raises(RuntimeError):
        await spool.replay(apply_then_crash)
    await sink.start()
    await eventually(lambda: spool_empty(tmp_path / "spool"), what="spool replayed")
    assert sorted(await stream_ids(backend)) == sorted(r.request_id for r in records)
    agg = await sink.aggregates("acme", DAY.date(), "key", "key_a")
    assert agg["requests"] == 30
    assert agg["output_tokens"] == sum(r.output_tokens for r in records)
    assert sink.counters.duplicates == 30
    await sink.close()


class RedisServer:
    """A redis-server of our own (AOF, fsync always) that a test can kill and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until("redis-server", lambda: tcp_open(self.port), [self.proc], 10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(10)


async def test_redis_killed_under_load_loses_and_duplicates_nothing(
    own_redis: RedisServer, ledger: FakeLedger, tmp_path: Path
) -> None:
    backend = RedisBackend(own_redis.url, prefix="gw:", timeout=0.2, state_dir=tmp_path)
    spool_dir = tmp_path / "spool"
    sink = fast_sink(backend, Spool(spool_dir, max_bytes=16 * MIB))
    await sink.start()
    records = random_records(500, seed=11)
    outage = asyncio.Event()

    async def client(task: int) -> None:
        for j in range(10):
            await sink.record(records[task * 10 + j])
            if task == 0 and j == 3:
                outage.set()
            await asyncio.sleep(0.01 * random.random())

    async def chaos() -> None:
        await outage.wait()
        await asyncio.to_thread(own_redis.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_redis.start)

    await asyncio.gather(chaos(), *(client(t) for t in range(50)))
    assert sink.counters.spooled > 0, "the outage must have hit live records"
    assert sink.counters.written > 0
    await eventually(lambda: spool_empty(spool_dir), what="spool replayed")

    # The test reads Redis on its own client: the pool of `backend` may still hold connections the
    # killed server closed, and redis-py raises on the first use of each (the sink and consumer go
    # through `call` and retry; a bare test read would not).
    reader = RedisBackend(own_redis.url, prefix="gw:", timeout=0.2, state_dir=tmp_path)
    tenants = {r.tenant for r in records}
    in_streams = [rid for t in tenants for rid in await stream_ids(reader, t)]
    assert len(in_streams) == len(set(in_streams)) == 500
    assert set(in_streams) == {r.request_id for r in records}
    for (tenant, day, scope, sid), counters in expected_aggregates(records).items():
        got = await sink.aggregates(tenant, day, scope, sid)  # type: ignore[arg-type]
        assert {k: got[k] for k in AGG_FIELDS} == counters

    consumer = fast_consumer(backend, ledger)
    await consumer.start()
    await eventually(lambda: _true(len(ledger.ids()) == 500), what="ledger filled")

    async def streams_empty() -> bool:
        return all([await _stream_empty(reader, t) for t in tenants])

    await eventually(streams_empty, what="streams trimmed after ack")
    assert ledger.ids() == sorted(r.request_id for r in records)
    assert {r.request_id: r.to_dict() for r in ledger.records()} == {r.request_id: r.to_dict() for r in records}
    await consumer.close()
    await sink.close()
    await reader.close()
    await backend.close()


async def _true(v: bool) -> bool:
    return v


async def _stream_empty(backend: RedisBackend, tenant: str) -> bool:
    return int(await backend.client.xlen(f"{backend.prefix}{tenant_tag(tenant)}:usage")) == 0


async def _pending(backend: RedisBackend, tenant: str = "acme", group: str = "ledger") -> int:
    info = await backend.client.xpending(f"{backend.prefix}{tenant_tag(tenant)}:usage", group)
    return int(info["pending"])


async def test_ledger_down_keeps_entries_pending_then_inserts_once(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path
) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i) for i in range(50)]
    await asyncio.gather(*(sink.record(r) for r in records))
    ledger.down = True
    consumer = fast_consumer(backend, ledger)
    await consumer.start()
    await eventually(lambda: _true(consumer.counters.insert_failures >= 3), what="insert retried")
    assert await _pending(backend) == 50
    assert await backend.client.xlen(f"{backend.prefix}{{t:acme}}:usage") == 50
    assert ledger.ids() == []
    ledger.down = False
    await eventually(lambda: _true(len(ledger.ids()) == 50), what="ledger filled")
    await eventually(lambda: _stream_empty(backend, "acme"), what="stream trimmed")
    assert await _pending(backend) == 0
    assert ledger.ids() == sorted(r.request_id for r in records)
    assert consumer.counters.inserted == 50
    await consumer.close()
    await sink.close()


async def test_consumer_measures_the_backlog_the_ledger_does_not_have_yet(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path
) -> None:
    """The alert that the money path is stuck: records of every tenant waiting in Redis, counted
    while the ledger is down, back to zero once they are committed."""
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i, tenant=("acme", "other")[i % 2]) for i in range(30)]
    await asyncio.gather(*(sink.record(r) for r in records))
    ledger.down = True
    consumer = fast_consumer(backend, ledger, backlog_interval=0.05)
    assert consumer.counters.backlog == -1  # not measured yet: no sample rather than a false 0
    await consumer.start()
    await eventually(lambda: _true(consumer.counters.insert_failures >= 2), what="insert retried")
    await eventually(lambda: _true(consumer.counters.backlog == 30), what="backlog of 30 measured")
    ledger.down = False
    await eventually(lambda: _true(len(ledger.ids()) == 30), what="ledger filled")
    await eventually(lambda: _true(consumer.counters.backlog == 0), what="backlog back to 0")
    await consumer.close()
    await sink.close()


@pytest.mark.parametrize("streams_before", [0, 1])
async def test_consumer_finds_tenant_streams_created_after_it_started(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path, streams_before: int
) -> None:
    """Within a few reads, not after the full stream-list refresh (an hour here): a tenant's first
    records once waited up to 10 s for the next refresh, with no stream yet or with others."""
    consumer = fast_consumer(backend, ledger, refresh_interval=3600.0)
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(100 + i, tenant=f"old-{i}") for i in range(streams_before)]
    for r in records:
        await sink.record(r)
    await consumer.start()
    await eventually(lambda: _true(len(ledger.ids()) == streams_before), what="first records moved")
    new = [make_record(i, tenant=t) for i, t in enumerate(["new-1", "new-2", "new-1"])]
    for r in new:
        await sink.record(r)
    records += new
    await eventually(lambda: _true(len(ledger.ids()) == len(records)), limit=3.0, what="ledger filled")
    assert ledger.ids() == sorted(r.request_id for r in records)
    await consumer.close()
    await sink.close()


@pytest.mark.parametrize("linger", [0.0, 0.5])
async def test_records_arriving_one_by_one_move_in_batches(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path, linger: float
) -> None:
    """After a round that moved less than a full batch the consumer lingers before reading again,
    so records that arrive one at a time (a request at a time) share a round: its read, its
    acknowledgement, its ledger transaction. Without the linger each record is a round of its own."""
    consumer = fast_consumer(backend, ledger, linger=linger)
    await consumer.start()
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i) for i in range(20)]
    for r in records:
        await sink.record(r)
        await asyncio.sleep(0.05)
    await eventually(lambda: _true(len(ledger.ids()) == 20), what="ledger filled")
    assert ledger.ids() == sorted(r.request_id for r in records)
    if linger:
        assert ledger.attempts <= 4, f"{ledger.attempts} ledger transactions for 20 records"
    else:
        assert ledger.attempts >= 10, "without a linger the records move (nearly) one by one"
    await consumer.close()
    await sink.close()


async def test_a_dead_consumers_entries_are_claimed_and_inserted_once(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path
) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i) for i in range(20)]
    await asyncio.gather(*(sink.record(r) for r in records))
    # Consumer A reads everything, inserts half, then dies before acknowledging anything.
    ledger.down = True
    a = fast_consumer(backend, ledger, consumer="a")
    await a.start()
    await eventually(lambda: _true(a.counters.read == 20), what="A read")
    await a.close()
    ledger.down = False
    assert await ledger.insert(records[:10]) == 10
    assert await _pending(backend) == 20

    b = fast_consumer(backend, ledger, consumer="b", claim_idle_ms=300)
    await b.start()
    await eventually(lambda: _true(len(ledger.ids()) == 20), what="B inserted the rest")
    await eventually(lambda: _stream_empty(backend, "acme"), what="stream trimmed")
    assert b.counters.claimed == 20
    assert b.counters.duplicates == 10
    assert await _pending(backend) == 0
    await b.close()
    await sink.close()


@pytest.mark.parametrize("when", ["restart", "running"])
async def test_entries_whose_read_reply_was_lost_reach_the_ledger_without_waiting_for_a_claim(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path, when: str
) -> None:
    """Redis killed after delivering an XREADGROUP (the delivery is in its append-only file) but
    before the reply left: the entries sit pending on this consumer. It must read them itself,
    not after claim_idle_ms (30 s by default: CI once lost two records to the e2e test's wait)."""
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i) for i in range(6)]
    consumer = fast_consumer(backend, ledger, consumer="a", claim_idle_ms=3_600_000)
    if when == "restart":
        await asyncio.gather(*(sink.record(r) for r in records))
        stream = f"{backend.prefix}{tenant_tag('acme')}:usage"
        await backend.client.xgroup_create(stream, "ledger", id="0", mkstream=True)
        # The delivery happens; its reply goes nowhere (the process that asked died with it).
        await backend.client.xreadgroup("ledger", "a", {stream: ">"})
        assert await _pending(backend) == 6
        await consumer.start()
    else:
        await consumer.start()
        assert consumer._blocking is not None
        real = consumer._blocking.xreadgroup
        lost = 0

        async def delivered_then_lost(*args: Any, **kw: Any) -> Any:
            nonlocal lost
            reply = await real(*args, **kw)
            if reply and not lost:
                lost += 1
                raise RedisConnectionError("connection reset after the delivery")
            return reply

        consumer._blocking.xreadgroup = delivered_then_lost  # type: ignore[method-assign]
        await asyncio.gather(*(sink.record(r) for r in records))
        await eventually(lambda: _true(lost == 1), what="a reply lost")
    await eventually(lambda: _true(len(ledger.ids()) == 6), limit=5, what="every record in the ledger")
    assert ledger.ids() == sorted(r.request_id for r in records)
    await eventually(lambda: _stream_empty(backend, "acme"), what="stream drained")
    assert await _pending(backend) == 0
    assert consumer.counters.claimed == 0
    await consumer.close()
    await sink.close()


async def test_unparsable_entries_go_to_the_dead_letter_stream(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path
) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    good = make_record(1)
    await sink.record(good)
    stream = f"{backend.prefix}{{t:acme}}:usage"
    bad = [{"data": "not json"}, {"other": "field"}, {"data": '{"request_id": "x"}'}]
    for fields in bad:
        await backend.client.xadd(stream, fields)  # type: ignore[arg-type]
    consumer = fast_consumer(backend, ledger)
    await consumer.start()
    await eventually(lambda: _stream_empty(backend, "acme"), what="stream drained")
    assert ledger.ids() == [good.request_id]
    dead = await xrange(backend, f"{backend.prefix}usage:dead")
    assert [f["stream"] for _, f in dead] == [stream] * 3
    assert dead[0][1]["data"] == "not json"
    assert all(f["error"] and f["id"] for _, f in dead)
    assert consumer.counters.dead_lettered == 3
    await consumer.close()
    await sink.close()


async def test_a_record_the_ledger_refuses_is_dead_lettered_not_blocking(
    backend: RedisBackend, ledger: FakeLedger, tmp_path: Path
) -> None:
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = [make_record(i, cost_usd="not money" if i == 6 else "0.01") for i in range(10)]
    await asyncio.gather(*(sink.record(r) for r in records))
    consumer = fast_consumer(backend, ledger)
    await consumer.start()
    await eventually(lambda: _stream_empty(backend, "acme"), what="stream drained")
    assert ledger.ids() == sorted(r.request_id for i, r in enumerate(records) if i != 6)
    dead = await xrange(backend, f"{backend.prefix}usage:dead")
    assert [orjson.loads(f["data"])["request_id"] for _, f in dead] == [records[6].request_id]
    assert "ledger refused" in dead[0][1]["error"]
    assert await _pending(backend) == 0
    await consumer.close()
    await sink.close()


async def test_consumer_into_the_real_sqlite_ledger(backend: RedisBackend, tmp_path: Path) -> None:
    from extproc.ledger import SqliteLedger

    real: Any = SqliteLedger(tmp_path / "ledger.db")
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = random_records(120, seed=5)
    await asyncio.gather(*(sink.record(r) for r in records))
    consumer = fast_consumer(backend, real)
    await consumer.start()

    async def all_in() -> bool:
        return int(await real.count()) == 120

    await eventually(all_in, what="ledger filled")
    assert await real.insert(records) == 0, "a second delivery adds nothing"
    await consumer.close()
    await sink.close()
    await real.close()


@pytest.mark.parametrize("with_streams", [False, True])
async def test_consumer_stops_promptly(backend: RedisBackend, ledger: FakeLedger, with_streams: bool) -> None:
    if with_streams:
        await backend.client.sadd(f"{backend.prefix}usage:streams", f"{backend.prefix}{{t:acme}}:usage")
    consumer = LedgerConsumer(backend, ledger, block_ms=1000, refresh_interval=0.05)
    await consumer.start()
    await asyncio.sleep(0.3)  # inside a blocking XREADGROUP (or the idle wait)
    task = consumer._task
    started = time.monotonic()
    await consumer.close()
    assert time.monotonic() - started < 2.0
    assert task is not None and task.done() and not task.cancelled()


@pytest.mark.parametrize("failure", ["spool full", "spool path is a file"], ids=lambda f: f.replace(" ", "-"))
async def test_record_never_raises(tmp_path: Path, failure: str) -> None:
    backend = RedisBackend(dead_url(), timeout=0.05, state_dir=tmp_path)
    if failure == "spool full":
        spool = Spool(tmp_path / "spool", max_bytes=600)
    else:
        (tmp_path / "file").write_text("")
        spool = Spool(tmp_path / "file", max_bytes=MIB)
    sink = fast_sink(backend, spool)
    if failure == "spool full":
        await sink.start()  # with a file in the way start() fails loudly; record() must not
    for i in range(5):
        await sink.record(make_record(i))
    m = sink.metrics()
    assert m["recorded"] == 5
    assert m["written"] == 0
    if failure == "spool full":
        assert m["spooled"] + m["spool_full_drops"] == 5
        assert m["spool_full_drops"] >= 3
    else:
        assert m["spooled"] == 0
        assert m["spool_write_errors"] == 5
    await sink.close()
    await backend.close()


SPOOLER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from extproc.accounting.record import UsageRecord
    from extproc.accounting.sink import RedisUsageSink
    from extproc.accounting.spool import Spool
    from extproc.store.redis import RedisBackend

    async def main() -> None:
        url, directory = sys.argv[1], sys.argv[2]
        backend = RedisBackend(url, timeout=0.05)
        sink = RedisUsageSink(backend, Spool(directory, max_bytes=1 << 30, segment_bytes=8192))
        await sink.start()

        async def one(i: int) -> None:
            await sink.record(UsageRecord(request_id=f"k{i}", ts=datetime(2025, 3, 4, tzinfo=UTC), tenant="acme",
                                          input_tokens=1, cost_usd="0.000000000001"))
            print(f"ok k{i}", flush=True)

        i = 0
        while True:
            await asyncio.gather(*(one(i + j) for j in range(20)))
            i += 20

    asyncio.run(main())
    """
)


def spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _acks_then_sigkill(proc: subprocess.Popen[bytes], at_least: int) -> set[str]:
    assert proc.stdout is not None
    acked: set[str] = set()
    while len(acked) < at_least:
        raw = proc.stdout.readline()
        assert raw, proc.stderr.read().decode() if proc.stderr else "exited"
        acked.add(raw.decode().split()[1])
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    acked |= {ln.split()[1] for ln in out.decode().splitlines() if ln.startswith("ok ") and len(ln.split()) == 2}
    return acked


async def test_records_spooled_by_a_sigkilled_process_arrive_exactly_once(
    backend: RedisBackend, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    proc = spawn(SPOOLER, dead_url(), str(spool_dir))
    acked = await asyncio.to_thread(_acks_then_sigkill, proc, 300)
    assert proc.returncode == -signal.SIGKILL
    # Two sinks start on the directory at once (two workers): flock gives each segment to one.
    sinks = [fast_sink(backend, Spool(spool_dir, max_bytes=1 << 30)) for _ in range(2)]
    await asyncio.gather(*(s.start() for s in sinks))
    await eventually(lambda: spool_empty(spool_dir), what="spool replayed")
    ids = await stream_ids(backend)
    assert len(ids) == len(set(ids)), "no record twice"
    assert acked <= set(ids), f"lost: {sorted(acked - set(ids))[:5]}"
    assert sum(s.counters.replayed for s in sinks) == len(ids), "no segment replayed by both"
    assert sum(s.counters.duplicates for s in sinks) == 0
    agg = await sinks[0].aggregates("acme", "2025-03-04", "tenant")
    assert agg["requests"] == len(ids)
    assert agg["cost_pusd"] == len(ids)
    for s in sinks:
        await s.close()


# --- embedded sink ---------------------------------------------------------------------------------


def embedded(tmp_path: Path, ledger: FakeLedger, spool_dir: Path | None = None) -> EmbeddedUsageSink:
    spool = Spool(spool_dir or tmp_path / "spool", max_bytes=16 * MIB)
    sink = EmbeddedUsageSink(
        EmbeddedBackend(tmp_path / "state.db"), ledger, spool, flush_interval=0.05, min_backoff=0.02, max_backoff=0.1
    )
    _OPEN.append(sink)
    return sink


async def test_embedded_sink_moves_every_record_into_the_ledger_once(ledger: FakeLedger, tmp_path: Path) -> None:
    sink = embedded(tmp_path, ledger)
    await sink.start()
    records = random_records(300, seed=3)
    await asyncio.gather(*(sink.record(r) for r in records))
    await sink.record(records[0])  # offered twice: counted once, inserted once
    await eventually(lambda: _true(len(ledger.ids()) == 300), what="ledger filled")
    await eventually(lambda: spool_empty(tmp_path / "spool"), what="spool emptied")
    assert ledger.ids() == sorted(r.request_id for r in records)
    for (tenant, day, scope, sid), counters in expected_aggregates(records).items():
        got = await sink.aggregates(tenant, day, scope, sid)  # type: ignore[arg-type]
        assert {k: got[k] for k in AGG_FIELDS} == counters
    await sink.close()


async def test_embedded_records_are_in_the_ledger_when_record_returns(ledger: FakeLedger, tmp_path: Path) -> None:
    """The usual path: one group commit into the ledger, nothing written to the spool."""
    sink = embedded(tmp_path, ledger)
    await sink.start()
    records = random_records(200, seed=5)
    before = ledger.attempts
    await asyncio.gather(*(sink.record(r) for r in records))
    assert ledger.ids() == sorted(r.request_id for r in records)
    assert ledger.attempts - before < 20, "grouped, not a transaction per record"
    assert sink.counters.written == 200 and sink.counters.spooled == 0 and sink.counters.failed == 0
    assert not spool_segments(tmp_path / "spool")
    # A caller that gives up does not take the commit of the others with it.
    more = [make_record(1000 + i) for i in range(10)]
    tasks = [asyncio.ensure_future(sink.record(r)) for r in more]
    await asyncio.sleep(0)
    tasks[0].cancel()
    await asyncio.gather(*tasks[1:])
    await eventually(lambda: _true(len(ledger.ids()) == 210), what="all ten inserted")
    await sink.close()


async def test_embedded_sink_spools_what_a_hanging_ledger_does_not_take_in_time(
    ledger: FakeLedger, tmp_path: Path
) -> None:
    ledger.stall = 0.5
    spool = Spool(tmp_path / "spool", max_bytes=16 * MIB)
    sink = EmbeddedUsageSink(
        EmbeddedBackend(tmp_path / "state.db"), ledger, spool, flush_interval=0.05, insert_timeout=0.1
    )
    _OPEN.append(sink)
    await sink.start()
    records = [make_record(i) for i in range(30)]
    started = time.monotonic()
    await asyncio.gather(*(sink.record(r) for r in records))
    assert time.monotonic() - started < 0.45, "waited for the timeout, not for the ledger"
    assert sink.counters.spooled == 30
    ledger.stall = 0.0
    # The timed-out insert commits late and the replay brings the same records: each row once.
    await eventually(lambda: spool_empty(tmp_path / "spool"), what="spool replayed")
    assert ledger.ids() == sorted(r.request_id for r in records)
    # Back to the direct path once the back-off is over.
    await asyncio.sleep(0.15)
    await sink.record(last := make_record(99))
    assert last.request_id in ledger.ids()
    await sink.close()


async def test_embedded_close_waits_for_the_commit_in_flight(ledger: FakeLedger, tmp_path: Path) -> None:
    ledger.stall = 0.2
    sink = embedded(tmp_path, ledger)
    await sink.start()
    task = asyncio.ensure_future(sink.record(rec := make_record(7)))
    await asyncio.sleep(0.05)
    await sink.close()
    assert rec.request_id in ledger.ids()
    await task


async def test_embedded_sink_keeps_records_while_the_ledger_is_down(ledger: FakeLedger, tmp_path: Path) -> None:
    ledger.down = True
    sink = embedded(tmp_path, ledger)
    await sink.start()
    records = [make_record(i) for i in range(40)]
    await asyncio.gather(*(sink.record(r) for r in records))
    await eventually(lambda: _true(ledger.attempts >= 3), what="insert retried")
    await sink.close()  # shuts down with the ledger still down
    assert ledger.ids() == []
    assert not await spool_empty(tmp_path / "spool")

    ledger.down = False
    again = embedded(tmp_path, ledger)
    await again.start()  # the next start moves what waited
    assert ledger.ids() == sorted(r.request_id for r in records)
    assert await spool_empty(tmp_path / "spool")
    await again.close()


async def test_embedded_sink_sets_aside_what_the_ledger_refuses(ledger: FakeLedger, tmp_path: Path) -> None:
    sink = embedded(tmp_path, ledger)
    await sink.start()
    records = [make_record(i, cost_usd="not money" if i == 2 else "0.5") for i in range(8)]
    await asyncio.gather(*(sink.record(r) for r in records))
    await eventually(lambda: _true(len(ledger.ids()) == 7), what="the valid records inserted")
    await eventually(lambda: spool_empty(tmp_path / "spool"), what="segments deleted")
    [dead] = [p for p in (tmp_path / "spool").iterdir() if p.name.startswith("dead-refused-")]
    [line] = dead.read_bytes().splitlines()
    assert orjson.loads(line)["record"]["request_id"] == records[2].request_id
    assert sink.counters.refused == 1
    await sink.close()


async def test_embedded_aggregates_can_start_from_the_ledger(ledger: FakeLedger, tmp_path: Path) -> None:
    sink = embedded(tmp_path, ledger)
    await sink.start()
    await sink.load_aggregates(
        [
            ("acme", "2025-03-04", "tenant", "", {"requests": 7, "cost_pusd": 5}),
            ("acme", "2025-03-04", "key", "key_a", {"requests": 2}),
        ]
    )
    await sink.record(make_record(1, cost_usd="0.000000000001"))
    assert (await sink.aggregates("acme", DAY.date(), "tenant"))["requests"] == 8
    assert (await sink.aggregates("acme", DAY.date(), "tenant"))["cost_pusd"] == 6
    assert (await sink.aggregates("acme", "2025-03-04", "key", "key_a"))["requests"] == 3
    await sink.close()


@pytest.mark.parametrize("single", [True, False], ids=["alone-in-tick", "pipelined"])
async def test_streams_are_registered_again_after_redis_lost_its_data(
    backend: RedisBackend, tmp_path: Path, single: bool
) -> None:
    """A Redis restarted empty (no persistence, failover, FLUSHALL) loses `usage:streams`: the
    consumer would never read the tenant's stream again. The first record after the loss
    registers it again."""
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    records = random_records(6, seed=11)
    await sink.record(records[0])
    assert await backend.client.smembers(sink.streams_key)
    # What an empty restart leaves (this test's keys only: the server is shared).
    async for key in backend.client.scan_iter(match=f"{backend.prefix}*"):
        await backend.client.delete(key)
    await backend.client.script_flush()
    if single:
        await sink.record(records[1])
    else:
        await asyncio.gather(*(sink.record(r) for r in records[1:]))
    streams = await backend.client.smembers(sink.streams_key)
    assert sink.stream_name(records[1].tenant) in streams


async def test_ledger_keeps_receiving_after_redis_lost_its_data(
    backend: RedisBackend, tmp_path: Path, ledger: FakeLedger
) -> None:
    """The bug this guards: after an empty Redis restart the consumer found no stream to read and
    records piled up unread until the server restarted."""
    sink = fast_sink(backend, Spool(tmp_path / "spool", max_bytes=MIB))
    await sink.start()
    consumer = fast_consumer(backend, ledger)
    await consumer.start()
    before, after = random_records(5, seed=21), random_records(5, seed=22)
    await asyncio.gather(*(sink.record(r) for r in before))
    await wait_until_ledger_has(ledger, {r.request_id for r in before})
    async for key in backend.client.scan_iter(match=f"{backend.prefix}*"):
        await backend.client.delete(key)
    await backend.client.script_flush()
    await asyncio.gather(*(sink.record(r) for r in after))
    await wait_until_ledger_has(ledger, {r.request_id for r in before + after})


async def wait_until_ledger_has(ledger: FakeLedger, ids: set[str], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        have = set(ledger.ids())
        if ids <= have:
            return
        assert time.monotonic() < deadline, f"ledger misses {len(ids - have)} of {len(ids)} records"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (datetime(2026, 12, 7, 3, 4, 5, 678901, tzinfo=UTC), "2026-12-07T03:04:05.678Z"),
        (datetime(2026, 12, 7, 3, 4, 5, 999999, tzinfo=UTC), "2026-12-07T03:04:05.999Z"),  # cut, not rounded
        (datetime(2026, 12, 7, 3, 4, 5, tzinfo=UTC), "2026-12-07T03:04:05.000Z"),
        (datetime(2026, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "2025-12-31T23:30:00.000Z"),
        (datetime(999, 1, 2, 3, 4, 5, 1000, tzinfo=UTC), "0999-01-02T03:04:05.001Z"),
    ],
)
def test_record_timestamps_are_utc_with_milliseconds_and_z(ts: datetime, text: str) -> None:
    assert format_ts(ts) == text
    assert parse_ts(text) == ts.replace(microsecond=ts.microsecond // 1000 * 1000)


async def test_embedded_records_of_a_cancelled_commit_are_not_reported_stored(
    ledger: FakeLedger, tmp_path: Path
) -> None:
    """A commit cut short by cancellation (a loop shut down without close) tells its callers so."""
    ledger.stall = 0.3
    sink = embedded(tmp_path, ledger)
    await sink.start()
    tasks = [asyncio.ensure_future(sink.record(make_record(i))) for i in range(3)]
    await asyncio.sleep(0.05)
    assert sink._committer is not None
    sink._committer.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert sink.counters.written == 0
