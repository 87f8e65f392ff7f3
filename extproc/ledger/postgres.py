"""The ledger on PostgreSQL (psycopg 3, async), for replicas sharing one durable store.

One connection behind a lock: the ledger's writer is one consumer inserting batches, and the CLI
runs one query at a time, so a pool (psycopg_pool is not a dependency) would buy nothing. A broken
connection is dropped and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ..accounting.record import TOKEN_FIELDS, UsageRecord
from ._codec import COLUMNS, prepare, row_tuple, to_record
from .base import (
    GROUP_FIELDS,
    Filters,
    GroupBy,
    Ledger,
    LedgerSchemaError,
    LedgerUnavailable,
    Migration,
    ReportRow,
    report_row,
)

TABLE = "usage_records"
# Any constant: serializes concurrent `extproc db migrate` runs on the same database.
_MIGRATE_LOCK = 0x6C656467  # "ledg"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "usage_records",
        (
            f"""CREATE TABLE {TABLE} (
    seq BIGSERIAL NOT NULL UNIQUE,
    request_id TEXT PRIMARY KEY,
    ts TIMESTAMPTZ NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    key_id TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    upstream_model TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    endpoint TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL DEFAULT 0,
    stream BOOLEAN NOT NULL DEFAULT FALSE,
    latency_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    ttft_ms DOUBLE PRECISION,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd NUMERIC(20, 12),
    estimated BOOLEAN NOT NULL DEFAULT FALSE,
    error_code TEXT
)""",
            f"CREATE INDEX {TABLE}_ts ON {TABLE} (ts)",
            f"CREATE INDEX {TABLE}_tenant_ts ON {TABLE} (tenant, ts)",
            f"CREATE INDEX {TABLE}_key_ts ON {TABLE} (key_id, ts)",
            f"CREATE INDEX {TABLE}_model_ts ON {TABLE} (model, ts)",
        ),
    ),
    # Counts per entity type the PII stage redacted, as a JSON object ({"EMAIL": 2}); NULL: none.
    Migration(2, "usage_records.pii", (f"ALTER TABLE {TABLE} ADD COLUMN pii TEXT",)),
    # Attempts Envoy made across a model's targets before one answered (0: one provider).
    Migration(3, "usage_records.attempts", (f"ALTER TABLE {TABLE} ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",)),
    # Answers from the response cache, and what they saved (exact decimal, like cost_usd).
    Migration(
        4,
        "usage_records.cache_hit",
        (
            f"ALTER TABLE {TABLE} ADD COLUMN cache_hit BOOLEAN NOT NULL DEFAULT FALSE",
            f"ALTER TABLE {TABLE} ADD COLUMN saved_usd NUMERIC(20, 12)",
            f"ALTER TABLE {TABLE} ADD COLUMN cache_counted BOOLEAN NOT NULL DEFAULT FALSE",
        ),
    ),
)

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""

_SELECT = ", ".join(COLUMNS)
_INSERT = (
    f"INSERT INTO {TABLE} ({_SELECT}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)
_AGGREGATES = ", ".join(
    [
        "count(*)",
        "count(*) FILTER (WHERE cost_usd IS NULL)",
        "count(*) FILTER (WHERE estimated)",
        *(f"sum({name})" for name in TOKEN_FIELDS),
        "sum(cost_usd)",
    ]
)
_DAY = "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def describe(url: str) -> str:
    """host:port/dbname for messages: the URL itself may hold a password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable URL)"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"postgresql {host}:{port}/{info.get('dbname') or info.get('user') or ''}"


def _where(filters: Filters) -> tuple[str, list[object]]:
    parts: list[str] = []
    params: list[object] = []
    for column, op, value in filters.conditions():
        parts.append(f"{column} {op} %s")
        params.append(value)
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class PostgresLedger(Ledger):
    migrations = MIGRATIONS

    def __init__(self, url: str, *, connect_timeout: int = 5, application_name: str = "extproc-ledger") -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self.target = describe(url)
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = self._conn
        # A connection left inside a transaction (a cancelled call) or broken is not reused.
        if conn is not None and (conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE):
            await self._drop()
            conn = None
        if conn is None:
            conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name=self._application_name,
                # A database that vanished without a reset (a partition) must fail the call within
                # about a minute, not hang the consumer for the OS's 15-minute TCP timeout.
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                tcp_user_timeout=60_000,
            )
            self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                await conn.close()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        """The connection for one call; database trouble becomes LedgerUnavailable."""
        async with self._lock:
            try:
                yield await self._connection()
            except (psycopg.OperationalError, psycopg.InterfaceError) as err:
                self.errors += 1
                await self._drop()
                raise LedgerUnavailable(f"ledger {self.target}: {_first_line(err)}") from err
            except pg_errors.UndefinedTable as err:
                raise LedgerSchemaError(
                    f"ledger {self.target}: the ledger tables do not exist: run `extproc db migrate`"
                ) from err

    async def migrate(self) -> builtins.list[int]:
        applied: builtins.list[int] = []
        async with self._session() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            await conn.execute(_MIGRATIONS_TABLE)
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {int(str(v)) for (v,) in await cur.fetchall()}
            if done and max(done) > self.latest_version:
                raise LedgerSchemaError(
                    f"ledger {self.target}: schema version {max(done)} is newer than this gateway "
                    f"({self.latest_version}): upgrade the gateway"
                )
            for m in self.migrations:
                if m.version in done:
                    continue
                for statement in m.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)", (m.version, m.description)
                )
                applied.append(m.version)
        return applied

    async def schema_version(self) -> int:
        async with self._session() as conn:
            cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            row = await cur.fetchone()
            return int(str(row[0])) if row else 0

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        rows = [prepare(r) for r in records]
        if not rows:
            return 0
        async with self._session() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(_INSERT, [row_tuple(row.values) for row in rows])
            return max(cur.rowcount, 0)

    async def list(
        self,
        since: datetime | None = None,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[UsageRecord]:
        where, params = _where(Filters(since, tenant, key_id, model))
        query = f"SELECT {_SELECT} FROM {TABLE}{where} ORDER BY ts DESC, seq DESC LIMIT %s"
        async with self._session() as conn:
            cur = await conn.execute(query, [*params, max(limit, 0)])
            rows = await cur.fetchall()
        return [to_record(dict(zip(COLUMNS, row, strict=True))) for row in rows]

    async def aggregate(self, by: GroupBy | None, filters: Filters) -> builtins.list[ReportRow]:
        where, params = _where(filters)
        if by is None:
            query = f"SELECT {_AGGREGATES} FROM {TABLE}{where}"
        else:
            group = _DAY if by == "day" else GROUP_FIELDS[by]
            query = f"SELECT {group} AS grp, {_AGGREGATES} FROM {TABLE}{where} GROUP BY grp"
        async with self._session() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        if by is None:
            return [report_row("total", rows[0])]
        return [report_row(str(row[0]), row[1:]) for row in rows]

    async def count(self) -> int:
        async with self._session() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {TABLE}")
            row = await cur.fetchone()
        return int(str(row[0])) if row else 0

    async def last_seq(self) -> int:
        async with self._session() as conn:
            cur = await conn.execute(f"SELECT coalesce(max(seq), 0) FROM {TABLE}")
            row = await cur.fetchone()
        return int(str(row[0])) if row else 0

    async def after_seq(self, seq: int, limit: int = 500) -> builtins.list[tuple[int, UsageRecord]]:
        query = f"SELECT seq, {_SELECT} FROM {TABLE} WHERE seq > %s ORDER BY seq LIMIT %s"
        async with self._session() as conn:
            cur = await conn.execute(query, (seq, limit))
            rows = await cur.fetchall()
        return [(int(str(row[0])), to_record(dict(zip(COLUMNS, row[1:], strict=True)))) for row in rows]

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
