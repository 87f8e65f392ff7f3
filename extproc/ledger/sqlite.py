"""The ledger in one SQLite file: zero setup, for a single gateway host.

Every call runs in a worker thread (asyncio.to_thread) so the event loop never waits on disk or on
another process's lock. WAL lets the CLI read while the consumer writes. SQLite has no exact
decimal type, so costs are stored as decimal text and summed by a Python Decimal aggregate.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from ..accounting.record import TOKEN_FIELDS, UsageRecord
from ._codec import COLUMNS, EXACT, decimal_text, prepare, row_tuple, to_record
from .base import GROUP_FIELDS, Filters, GroupBy, Ledger, LedgerSchemaError, LedgerUnavailable, Migration, ReportRow
from .base import report_row as _report_row

T = TypeVar("T")
TABLE = "usage_records"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "usage_records",
        (
            # ts: ISO 8601 UTC with microseconds and a Z, fixed width, so text order is time order.
            # cost_usd: exact decimal text (summed with Decimal, never as a float).
            f"""CREATE TABLE {TABLE} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    ts TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    key_id TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    upstream_model TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    endpoint TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL DEFAULT 0,
    stream INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL NOT NULL DEFAULT 0,
    ttft_ms REAL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd TEXT,
    estimated INTEGER NOT NULL DEFAULT 0,
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
            f"ALTER TABLE {TABLE} ADD COLUMN saved_usd TEXT",
            f"ALTER TABLE {TABLE} ADD COLUMN cache_counted BOOLEAN NOT NULL DEFAULT FALSE",
        ),
    ),
)

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""

_SELECT = ", ".join(COLUMNS)
_INSERT = (
    f"INSERT INTO {TABLE} ({_SELECT}) VALUES ({', '.join(['?'] * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)
_AGGREGATES = ", ".join(
    [
        "count(*)",
        "sum(cost_usd IS NULL)",
        "sum(estimated)",
        *(f"sum({name})" for name in TOKEN_FIELDS),
        "decimal_sum(cost_usd)",
    ]
)
_DAY = "substr(ts, 1, 10)"


def ts_text(ts: datetime) -> str:
    """Microseconds and a Z, four-digit years: sorts as text. isoformat, not strftime: ~1 µs less
    per row the consumer moves (and glibc's %Y writes year 999 as "999")."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class _DecimalSum:
    """SUM for decimal text, exact: SQLite's own SUM would go through floats."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = EXACT.add(self.total, Decimal(value))

    def finalize(self) -> str:
        return decimal_text(self.total)


def _where(filters: Filters) -> tuple[str, list[object]]:
    parts: list[str] = []
    params: list[object] = []
    for column, op, value in filters.conditions():
        parts.append(f"{column} {op} ?")
        if column == "ts":
            assert isinstance(value, datetime)
            params.append(ts_text(value))
        else:
            params.append(value)
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


def _from_row(row: Sequence[Any]) -> UsageRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    values["ts"] = datetime.fromisoformat(values["ts"])
    return to_record(values)


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: no deadlock upgrading a read lock later.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteLedger(Ledger):
    migrations = MIGRATIONS

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.target = f"sqlite {self.path}"
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._applied_at_open: builtins.list[int] = []

    # --- in the worker thread, under the lock ---

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # Every commit on disk before it returns (the WAL synced): the embedded sink's
                # records go straight here, and `record` returning means stored.
                conn.execute("PRAGMA synchronous=FULL")
                # typeshed types aggregates as int -> int; text in, text out is what SQLite allows.
                conn.create_aggregate("decimal_sum", 1, _DecimalSum)  # type: ignore[arg-type]
                # A local file has no operator step between install and use: migrate on open.
                self._applied_at_open = self._apply_migrations(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._db())
            except (sqlite3.OperationalError, OSError) as err:
                # Locked for longer than busy_timeout, unreadable, disk full: retry later.
                self.errors += 1
                self._drop()
                raise LedgerUnavailable(f"ledger {self.target}: {err}") from err

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _versions(self, db: sqlite3.Connection) -> set[int]:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        exists = db.execute(query).fetchone()
        return {int(v) for (v,) in db.execute("SELECT version FROM schema_migrations")} if exists else set()

    def _apply_migrations(self, db: sqlite3.Connection) -> builtins.list[int]:
        if self._versions(db) >= {m.version for m in self.migrations}:
            self._refuse_newer(self._versions(db))
            return []  # the common case takes no write lock
        applied: builtins.list[int] = []
        with _transaction(db):
            db.execute(_MIGRATIONS_TABLE)
            done = self._versions(db)
            self._refuse_newer(done)
            for m in self.migrations:
                if m.version in done:
                    continue
                for statement in m.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    (m.version, m.description, ts_text(datetime.now(UTC))),
                )
                applied.append(m.version)
        return applied

    def _refuse_newer(self, done: set[int]) -> None:
        if done and max(done) > self.latest_version:
            raise LedgerSchemaError(
                f"ledger {self.target}: schema version {max(done)} is newer than this gateway "
                f"({self.latest_version}): upgrade the gateway"
            )

    # --- the Ledger API ---

    async def migrate(self) -> builtins.list[int]:
        def op(db: sqlite3.Connection) -> builtins.list[int]:
            applied, self._applied_at_open = self._applied_at_open, []
            return applied + self._apply_migrations(db)

        return await self._run(op)

    async def schema_version(self) -> int:
        return await self._run(lambda db: max(self._versions(db), default=0))

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        rows = [prepare(r) for r in records]
        if not rows:
            return 0
        params = []
        for row in rows:
            values = row.values  # prepare() made it for this call alone: converted in place
            values["ts"] = ts_text(values["ts"])
            values["cost_usd"] = None if values["cost_usd"] is None else decimal_text(values["cost_usd"])
            values["saved_usd"] = None if values["saved_usd"] is None else decimal_text(values["saved_usd"])
            values["stream"] = int(values["stream"])
            values["estimated"] = int(values["estimated"])
            values["cache_hit"] = int(values["cache_hit"])
            values["cache_counted"] = int(values["cache_counted"])
            params.append(row_tuple(values))

        def op(db: sqlite3.Connection) -> int:
            before = db.total_changes
            with _transaction(db):
                db.executemany(_INSERT, params)
            return db.total_changes - before

        return await self._run(op)

    async def list(
        self,
        since: datetime | None = None,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[UsageRecord]:
        where, params = _where(Filters(since, tenant, key_id, model))
        query = f"SELECT {_SELECT} FROM {TABLE}{where} ORDER BY ts DESC, seq DESC LIMIT ?"
        rows = await self._run(lambda db: db.execute(query, [*params, max(limit, 0)]).fetchall())
        return [_from_row(row) for row in rows]

    async def aggregate(self, by: GroupBy | None, filters: Filters) -> builtins.list[ReportRow]:
        where, params = _where(filters)
        if by is None:
            query = f"SELECT {_AGGREGATES} FROM {TABLE}{where}"
        else:
            group = _DAY if by == "day" else GROUP_FIELDS[by]
            query = f"SELECT {group} AS grp, {_AGGREGATES} FROM {TABLE}{where} GROUP BY grp"
        rows = await self._run(lambda db: db.execute(query, params).fetchall())
        if by is None:
            return [_report_row("total", rows[0])]
        return [_report_row(str(row[0]), row[1:]) for row in rows]

    async def count(self) -> int:
        return int(await self._run(lambda db: db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]))

    async def last_seq(self) -> int:
        query = f"SELECT coalesce(max(seq), 0) FROM {TABLE}"
        return int(await self._run(lambda db: db.execute(query).fetchone()[0]))

    async def after_seq(self, seq: int, limit: int = 500) -> builtins.list[tuple[int, UsageRecord]]:
        query = f"SELECT seq, {_SELECT} FROM {TABLE} WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = await self._run(lambda db: db.execute(query, (seq, limit)).fetchall())
        return [(int(row[0]), _from_row(row[1:])) for row in rows]

    async def close(self) -> None:
        def op() -> None:
            with self._lock:
                self._drop()

        await asyncio.to_thread(op)
