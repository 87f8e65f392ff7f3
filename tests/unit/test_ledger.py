"""One ledger contract, two real databases: SQLite in tmp_path and PostgreSQL (tests/pgfixture.py).

Expected reports are computed here from the records with Decimal, independently of the SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from extproc.accounting.record import TOKEN_FIELDS, UsageRecord
from extproc.config import ConfigError, parse_config
from extproc.devstack import free_port
from extproc.ledger import (
    GROUP_BY,
    GroupBy,
    InvalidRecord,
    Ledger,
    LedgerSchemaError,
    LedgerUnavailable,
    PostgresLedger,
    ReportRow,
    SqliteLedger,
    open_ledger,
    validate_record,
)
from extproc.ledger._codec import COLUMNS

BACKENDS = ["sqlite", "postgres"]
BASE = datetime(2025, 3, 10, 12, 0, 0, 123456, tzinfo=UTC)


def rec(
    rid: str, hours_ago: float, tenant: str, key: str, model: str, provider: str, cost: str | None, **kw: Any
) -> UsageRecord:
    n = int(rid[1:]) if rid[1:].isdigit() else 1
    base = UsageRecord(
        request_id=rid,
        ts=BASE - timedelta(hours=hours_ago),
        tenant=tenant,
        key_id=key,
        model=model,
        upstream_model=model + "-2025",
        provider=provider,
        endpoint="/v1/chat/completions",
        status=200,
        latency_ms=100.0 + n,
        input_tokens=100 * n,
        cached_input_tokens=10 * n,
        cache_creation_input_tokens=n,
        output_tokens=20 * n,
        reasoning_tokens=2 * n,
        total_tokens=120 * n,
        cost_usd=cost,
    )
    return replace(base, **kw)


# Costs that a float sum gets wrong (0.1 + 0.2, 1e-12 next to 1e7), and unpriced records.
DATA = [
    rec("r01", 0, "acme", "key_a", "gpt-mini", "openai", "0.00015"),
    rec("r02", 1, "acme", "key_a", "gpt-mini", "openai", "0.000000000001"),
    rec("r03", 2, "acme", "key_b", "gpt-big", "openai", "12345678.123456789012"),
    rec("r04", 5, "beta", "key_c", "claude", "anthropic", None),
    rec("r05", 26, "beta", "key_c", "claude", "anthropic", "0.1"),
    rec("r06", 30, "beta", "", "gpt-mini", "openai", "0.2", estimated=True, stream=True, ttft_ms=42.5),
    rec("r07", 50, "acme", "key_b", "local", "vllm", None, status=502, error_code="upstream_error"),
    rec("r08", 51, "acme", "key_b", "local", "vllm", None),
    # Same ts as r01, inserted later: newest-first puts it first.
    rec("r09", 0, "acme", "key_a", "gpt-mini", "openai", "0.3"),
]
BY_ID = {r.request_id: r for r in DATA}
NEWEST_FIRST = ["r09", "r01", "r02", "r03", "r04", "r05", "r06", "r07", "r08"]


def group_of(record: UsageRecord, by: GroupBy) -> str:
    if by == "day":
        return record.ts.astimezone(UTC).date().isoformat()
    return {"model": record.model, "key": record.key_id, "tenant": record.tenant, "provider": record.provider}[by]


def expected_rows(records: Iterable[UsageRecord], by: GroupBy | None) -> dict[str, dict[str, Any]]:
    """Per group: requests, unpriced, estimated, each token field and the cost, summed with Decimal
    over the records themselves."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        g = "total" if by is None else group_of(r, by)
        row = out.setdefault(
            g,
            {"requests": 0, "unpriced_requests": 0, "estimated_requests": 0, "cost": Decimal(0)}
            | dict.fromkeys(TOKEN_FIELDS, 0),
        )
        row["requests"] += 1
        row["unpriced_requests"] += r.cost_usd is None
        row["estimated_requests"] += r.estimated
        for t in TOKEN_FIELDS:
            row[t] += getattr(r, t)
        if r.cost_usd is not None:
            row["cost"] += Decimal(r.cost_usd)
    return out


def as_expected(row: Any) -> dict[str, Any]:
    d = {k: getattr(row, k) for k in ("requests", "unpriced_requests", "estimated_requests", *TOKEN_FIELDS)}
    return d | {"cost": row.cost_usd}


def ids(records: Iterable[UsageRecord]) -> list[str]:
    return [r.request_id for r in records]


@pytest.fixture(params=BACKENDS)
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        led: Ledger = SqliteLedger(tmp_path / "ledger.db")
    else:
        led = PostgresLedger(request.getfixturevalue("pg_schema_url"))
    await led.migrate()
    yield led
    await led.close()


@pytest.fixture
async def filled(ledger: Ledger) -> Ledger:
    assert await ledger.insert(DATA) == len(DATA)
    return ledger


# --- migrations ---


async def test_migrate_is_repeatable(ledger: Ledger) -> None:
    assert await ledger.migrate() == []
    assert await ledger.migrate() == []
    assert await ledger.schema_version() == ledger.latest_version == 4
    await ledger.check_schema()


async def table_columns(ledger: Ledger) -> list[str]:
    if isinstance(ledger, SqliteLedger):
        with contextlib.closing(sqlite3.connect(ledger.path)) as db:
            return [row[1] for row in db.execute("PRAGMA table_info(usage_records)")]
    assert isinstance(ledger, PostgresLedger)
    async with await psycopg.AsyncConnection.connect(ledger._url) as conn:
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_records' "
            "AND table_schema = current_schema() ORDER BY ordinal_position"
        )
        return [str(row[0]) for row in await cur.fetchall()]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_existing_v1_ledger_upgrades_in_place(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A ledger created before the pii column keeps its rows and gains the columns added since
    (pii: migration 2, attempts: migration 3)."""
    url = request.getfixturevalue("pg_schema_url") if backend == "postgres" else None

    def make() -> Ledger:
        return SqliteLedger(tmp_path / "old.db") if url is None else PostgresLedger(url)

    old = make()
    old.migrations = old.migrations[:1]
    assert await old.migrate() == [1]
    await old.close()
    led = make()
    try:
        assert await led.migrate() == [2, 3, 4]
        rec = UsageRecord(
            "upgraded", datetime(2026, 12, 6, tzinfo=UTC), tenant="t", pii={"EMAIL": 2, "PHONE": 1}, attempts=2
        )
        assert await led.insert([rec, UsageRecord("plain", datetime(2026, 12, 6, tzinfo=UTC))]) == 2
        got = {r.request_id: (r.pii, r.attempts) for r in await led.list(limit=10)}
        assert got == {"upgraded": ({"EMAIL": 2, "PHONE": 1}, 2), "plain": (None, 0)}
    finally:
        await led.close()


async def test_columns_are_the_record_fields(ledger: Ledger) -> None:
    """The record's field names are a contract: the table holds exactly them, plus the sequence."""
    assert await table_columns(ledger) == ["seq", *COLUMNS]


async def test_postgres_types_and_indexes(pg_schema_url: str) -> None:
    async with PostgresLedger(pg_schema_url) as led:
        assert await led.migrate() == [1, 2, 3, 4]
    async with await psycopg.AsyncConnection.connect(pg_schema_url) as conn:
        cur = await conn.execute(
            "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
            "WHERE table_name = 'usage_records' AND table_schema = current_schema() "
            "AND column_name IN ('seq', 'ts', 'cost_usd') ORDER BY column_name"
        )
        assert await cur.fetchall() == [
            ("cost_usd", "numeric", 20, 12),
            ("seq", "bigint", 64, 0),
            ("ts", "timestamp with time zone", None, None),
        ]
        cur = await conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_records' AND schemaname = current_schema()"
        )
        defs = " ".join(str(r[0]) for r in await cur.fetchall())
    for cols in ("(ts)", "(tenant, ts)", "(key_id, ts)", "(model, ts)", "(request_id)", "(seq)"):
        assert cols in defs


async def test_postgres_concurrent_migrations_apply_once(pg_schema_url: str) -> None:
    ledgers = [PostgresLedger(pg_schema_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(led.migrate() for led in ledgers))
    finally:
        for led in ledgers:
            await led.close()
    assert sorted(results) == [[], [], [1, 2, 3, 4]]


async def test_postgres_unmigrated_schema_is_refused_with_the_fix(pg_schema_url: str) -> None:
    async with PostgresLedger(pg_schema_url) as led:
        assert await led.schema_version() == 0
        for call in (led.check_schema(), led.list(), led.insert(DATA[:1])):
            with pytest.raises(LedgerSchemaError, match="extproc db migrate"):
                await call


@pytest.mark.parametrize("backend", BACKENDS)
async def test_newer_schema_is_refused(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A database migrated by a newer gateway: an older one must not write into it."""
    if backend == "sqlite":
        path = tmp_path / "ledger.db"
        async with SqliteLedger(path) as led:
            await led.migrate()
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("INSERT INTO schema_migrations VALUES (99, 'future', '')")
        async with SqliteLedger(path) as led:
            with pytest.raises(LedgerSchemaError, match="newer"):
                await led.count()
        return
    url = request.getfixturevalue("pg_schema_url")
    async with PostgresLedger(url) as led:
        await led.migrate()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'future')")
        with pytest.raises(LedgerSchemaError, match="newer"):
            await led.check_schema()
        with pytest.raises(LedgerSchemaError, match="newer"):
            await led.migrate()


# --- insert ---

IDEMPOTENCY = [
    # (batches of request ids, new per batch, rows at the end)
    ([["a", "b", "c"], ["a", "b", "c"]], [3, 0], 3),
    ([["a", "b"], ["b", "c"]], [2, 1], 3),
    ([["a", "a", "b"]], [2], 2),
    ([[], ["a"], []], [0, 1, 0], 1),
]


@pytest.mark.parametrize(("batches", "new", "total"), IDEMPOTENCY)
async def test_insert_is_idempotent(ledger: Ledger, batches: list[list[str]], new: list[int], total: int) -> None:
    for batch, expected in zip(batches, new, strict=True):
        assert await ledger.insert([replace(DATA[0], request_id=i) for i in batch]) == expected
    assert await ledger.count() == total
    assert sorted(ids(await ledger.list())) == sorted({i for b in batches for i in b})


async def test_first_write_wins(ledger: Ledger) -> None:
    """A redelivered record never rewrites what was billed."""
    first = replace(DATA[0], request_id="x", cost_usd="1")
    assert await ledger.insert([first]) == 1
    assert await ledger.insert([replace(first, cost_usd="2", model="other")]) == 0
    assert await ledger.list() == [first]


async def test_records_come_back_exactly(ledger: Ledger) -> None:
    full = replace(
        DATA[5],
        request_id="full",
        ts=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        status=429,
        latency_ms=12.25,
        error_code="rate_limited",
    )
    plain = UsageRecord(request_id="plain", ts=datetime(2025, 1, 1, tzinfo=UTC))
    await ledger.insert([full, plain])
    assert await ledger.list() == [full, plain]


COST_TEXT = [
    # (as sent, as stored and returned)
    ("0.000150", "0.00015"),
    ("1.500000000000000", "1.5"),
    ("12", "12"),
    ("0E-12", "0"),
    ("99999999.999999999999", "99999999.999999999999"),
]


@pytest.mark.parametrize(("sent", "stored"), COST_TEXT)
async def test_costs_are_normalized_identically(ledger: Ledger, sent: str, stored: str) -> None:
    await ledger.insert([replace(DATA[0], cost_usd=sent)])
    assert [r.cost_usd for r in await ledger.list()] == [stored]
    assert (await ledger.totals()).cost_usd == Decimal(stored)


async def test_naive_timestamp_is_utc(ledger: Ledger) -> None:
    await ledger.insert([replace(DATA[0], ts=datetime(2025, 5, 1, 8, 30))])
    assert [r.ts for r in await ledger.list()] == [datetime(2025, 5, 1, 8, 30, tzinfo=UTC)]


BAD_RECORDS = [
    replace(DATA[0], cost_usd="abc"),
    replace(DATA[0], cost_usd="-0.01"),
    replace(DATA[0], cost_usd="NaN"),
    replace(DATA[0], cost_usd="0.0000000000001"),  # 13 decimals would be rounded by NUMERIC(20,12)
    replace(DATA[0], cost_usd="100000000"),
    replace(DATA[0], request_id=""),
]


@pytest.mark.parametrize("bad", BAD_RECORDS, ids=lambda r: f"{r.request_id!r}:{r.cost_usd}")
async def test_invalid_record_writes_nothing(ledger: Ledger, bad: UsageRecord) -> None:
    with pytest.raises(InvalidRecord):
        validate_record(bad)
    with pytest.raises(InvalidRecord):
        await ledger.insert([DATA[1], bad])
    assert await ledger.count() == 0


# --- list ---

LIST_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({}, NEWEST_FIRST),
    ({"tenant": "acme"}, ["r09", "r01", "r02", "r03", "r07", "r08"]),
    ({"key_id": "key_c"}, ["r04", "r05"]),
    ({"key_id": ""}, ["r06"]),
    ({"model": "gpt-mini"}, ["r09", "r01", "r02", "r06"]),
    ({"since": BASE - timedelta(hours=2)}, ["r09", "r01", "r02", "r03"]),
    ({"since": BASE - timedelta(hours=26), "tenant": "beta"}, ["r04", "r05"]),
    ({"tenant": "acme", "key_id": "key_b", "model": "local"}, ["r07", "r08"]),
    ({"limit": 3}, NEWEST_FIRST[:3]),
    ({"tenant": "acme", "limit": 1}, ["r09"]),
    ({"tenant": "nobody"}, []),
    ({"since": BASE + timedelta(seconds=1)}, []),
]


@pytest.mark.parametrize(("filters", "expected"), LIST_CASES)
async def test_list_filters_and_order(filled: Ledger, filters: dict[str, Any], expected: list[str]) -> None:
    records = await filled.list(**filters)
    assert ids(records) == expected
    assert records == [BY_ID[i] for i in expected]


# --- report and totals ---


@pytest.mark.parametrize("since", [None, BASE - timedelta(hours=26)], ids=["all", "26h"])
@pytest.mark.parametrize("by", GROUP_BY)
async def test_report_equals_sum_of_records(filled: Ledger, by: GroupBy, since: datetime | None) -> None:
    chosen = [r for r in DATA if since is None or r.ts >= since]
    expected = expected_rows(chosen, by)
    rows = await filled.report(by, since)
    assert {r.group: as_expected(r) for r in rows} == expected
    # Days in calendar order; other groups costliest first, then by requests and name.
    if by == "day":
        assert [r.group for r in rows] == sorted(expected)
    else:
        order = sorted(expected, key=lambda g: (-expected[g]["cost"], -expected[g]["requests"], g))
        assert [r.group for r in rows] == order


async def test_report_filters(filled: Ledger) -> None:
    rows = await filled.report("model", tenant="acme", key_id="key_b")
    assert {r.group: as_expected(r) for r in rows} == expected_rows(
        [r for r in DATA if r.tenant == "acme" and r.key_id == "key_b"], "model"
    )


async def test_cost_sums_are_exact(filled: Ledger) -> None:
    """Float would give 0.30000000000000004 and lose the 1e-12 next to 12 million."""
    by_tenant = {r.group: r.cost_usd for r in await filled.report("tenant")}
    assert by_tenant == {"beta": Decimal("0.3"), "acme": Decimal("12345678.423606789013")}
    assert str(by_tenant["acme"]) == "12345678.423606789013"


async def test_unpriced_records_are_counted_never_as_zero(filled: Ledger) -> None:
    rows = {r.group: r for r in await filled.report("model")}
    assert (rows["local"].requests, rows["local"].unpriced_requests, rows["local"].cost_usd) == (2, 2, Decimal(0))
    assert (rows["claude"].requests, rows["claude"].unpriced_requests, rows["claude"].cost_usd) == (
        2,
        1,
        Decimal("0.1"),
    )
    assert (await filled.totals()).unpriced_requests == 3


TOTALS_CASES: list[tuple[dict[str, Any], Callable[[UsageRecord], bool]]] = [
    ({}, lambda r: True),
    ({"since": BASE - timedelta(hours=5)}, lambda r: r.ts >= BASE - timedelta(hours=5)),
    ({"tenant": "beta"}, lambda r: r.tenant == "beta"),
    ({"key_id": "key_b"}, lambda r: r.key_id == "key_b"),
    ({"model": "local"}, lambda r: r.model == "local"),
    ({"tenant": "nobody"}, lambda r: False),
]


@pytest.mark.parametrize(("filters", "pick"), TOTALS_CASES)
async def test_totals(filled: Ledger, filters: dict[str, Any], pick: Callable[[UsageRecord], bool]) -> None:
    chosen = [r for r in DATA if pick(r)]
    total = await filled.totals(**filters)
    expected = expected_rows(chosen, None).get("total") or as_expected(ReportRow("total"))
    assert as_expected(total) == expected
    assert total.group == "total"


async def test_empty_ledger(ledger: Ledger) -> None:
    assert await ledger.count() == 0
    assert await ledger.last_seq() == 0
    assert await ledger.list() == []
    assert await ledger.report("model") == []
    total = await ledger.totals()
    assert (total.requests, total.cost_usd, total.unpriced_requests) == (0, Decimal(0), 0)


# --- follow ---


async def test_follow_yields_new_records_in_insertion_order(ledger: Ledger) -> None:
    await ledger.insert(DATA[:2])
    start = await ledger.last_seq()
    stream = ledger.follow(poll_interval=0.02)  # from now on: the two above are not replayed

    async def take(n: int) -> list[tuple[int, UsageRecord]]:
        got = []
        async for item in stream:
            got.append(item)
            if len(got) == n:
                break
        return got

    reader = asyncio.create_task(take(4))
    await asyncio.sleep(0.1)
    await ledger.insert(DATA[5:7])
    await asyncio.sleep(0.05)
    await ledger.insert(DATA[2:4])
    got = await asyncio.wait_for(reader, 5)
    await stream.aclose()
    assert [r.request_id for _, r in got] == ["r06", "r07", "r03", "r04"]
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs) and seqs[0] > start and len(set(seqs)) == 4
    assert await ledger.last_seq() == seqs[-1]
    # Resuming from a sequence number replays exactly what came after it.
    assert [r.request_id for _, r in await ledger.after_seq(seqs[1])] == ["r03", "r04"]


# --- the database down ---


class Proxy:
    """A TCP forwarder to PostgreSQL that can be taken down and brought back on the same port:
    the database "goes away" for the ledger without touching the shared server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.transport.abort()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None


@contextlib.asynccontextmanager
async def outage(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Ledger, Any]]:
    """A ledger and a pair of (break, heal) coroutine functions for one kind of outage."""
    if kind == "sqlite locked by another process":
        path = tmp_path / "ledger.db"
        led: Ledger = SqliteLedger(path, busy_timeout=0.2)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

        async def lock() -> None:
            other.execute("BEGIN EXCLUSIVE")

        async def unlock() -> None:
            other.execute("ROLLBACK")

        try:
            yield led, (lock, unlock)
        finally:
            other.close()
            await led.close()
        return
    url: str = request.getfixturevalue("pg_schema_url")
    if kind == "postgres backend terminated":
        name = "ledger-" + secrets.token_hex(4)
        led = PostgresLedger(url, application_name=name)

        async def terminate() -> None:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,)
                )
                for _ in range(100):  # until the backend is really gone
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
                    )
                    row = await cur.fetchone()
                    if row is not None and row[0] == 0:
                        break
                    await asyncio.sleep(0.02)

        async def nothing() -> None:
            return None

        try:
            yield led, (terminate, nothing)
        finally:
            await led.close()
        return
    assert kind == "postgres server down"
    info = conninfo_to_dict(url)
    proxy = Proxy(int(str(info.get("port") or 5432)))
    await proxy.start()
    led = PostgresLedger(url.replace(f":{proxy.target_port}/", f":{proxy.port}/"))
    try:
        yield led, (proxy.stop, proxy.start)
    finally:
        await led.close()
        await proxy.stop()


OUTAGES = ["sqlite locked by another process", "postgres backend terminated", "postgres server down"]


@pytest.mark.parametrize("kind", OUTAGES)
async def test_outage_raises_unavailable_then_recovers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with outage(kind, request, tmp_path) as (led, (break_it, heal)):
        await led.migrate()
        assert await led.insert(DATA[:3]) == 3
        await break_it()
        with pytest.raises(LedgerUnavailable):
            await led.insert(DATA[3:6])
        await heal()
        # The consumer retries the same batch: nothing of the failed call was kept, nothing doubles.
        assert await led.insert(DATA[3:6]) == 3
        assert await led.count() == 6
        assert ids(await led.list()) == [i for i in NEWEST_FIRST if i in {r.request_id for r in DATA[:6]}]


@pytest.mark.parametrize("kind", ["postgres backend terminated", "postgres server down"])
async def test_every_method_reports_unavailable(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    async with outage(kind, request, tmp_path) as (led, (break_it, heal)):
        await led.migrate()
        await break_it()
        calls: list[Callable[[], Any]] = [
            led.count,
            led.list,
            lambda: led.report("day"),
            led.totals,
            led.last_seq,
            lambda: led.after_seq(0),
            led.schema_version,
            led.migrate,
        ]
        if kind == "postgres server down":  # every call fails while it stays down
            for call in calls:
                with pytest.raises(LedgerUnavailable):
                    await call()
        else:  # the first call finds the dead connection; the next reconnects
            with pytest.raises(LedgerUnavailable):
                await led.count()
        await heal()
        for call in calls:
            await call()


async def test_unreachable_postgres(tmp_path: Path) -> None:
    led = PostgresLedger(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/ledger", connect_timeout=2)
    for call in (led.migrate(), led.insert(DATA[:1]), led.list(), led.count(), led.report("model")):
        with pytest.raises(LedgerUnavailable) as err:
            await call
        assert "hunter2" not in str(err.value)
    assert "hunter2" not in led.target
    await led.close()


async def test_sqlite_path_that_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    async with SqliteLedger(tmp_path / "file" / "ledger.db") as led:
        with pytest.raises(LedgerUnavailable):
            await led.count()


async def test_sqlite_waits_off_the_event_loop(tmp_path: Path) -> None:
    """A write that waits on another process's lock must not freeze the loop."""
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path, busy_timeout=2) as led:
        await led.migrate()
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN EXCLUSIVE")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        insert = asyncio.create_task(led.insert(DATA[:1]))
        await asyncio.sleep(0.3)
        other.execute("ROLLBACK")
        other.close()
        assert await insert == 1
        tick_task.cancel()
        assert ticks >= 10


# --- open_ledger ---


def config(tmp_path: Path, ledger: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {"providers": {"openai": {"schema": "openai"}}, "store": {"path": "state/state.db"}}
    if ledger is not None:
        data["ledger"] = ledger
    return parse_config(data, base_dir=tmp_path)


def test_open_ledger_defaults_to_sqlite_next_to_the_state(tmp_path: Path) -> None:
    led = open_ledger(config(tmp_path))
    assert isinstance(led, SqliteLedger) and led.path == tmp_path / "state" / "ledger.db"
    led = open_ledger(config(tmp_path, {"path": "elsewhere/usage.db"}))
    assert isinstance(led, SqliteLedger) and led.path == tmp_path / "elsewhere" / "usage.db"


def test_open_ledger_postgres_from_the_named_variable(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"database_url_env": "LEDGER_URL"})
    led = open_ledger(cfg, {"LEDGER_URL": "postgresql://gw:s3cret@db.internal:6543/usage"})
    assert isinstance(led, PostgresLedger)
    assert led.target == "postgresql db.internal:6543/usage"
    with pytest.raises(ConfigError, match="LEDGER_URL is not set"):
        open_ledger(cfg, {})
