"""The ledger contract both databases implement.

Every request's usage record ends here, once: inserts are idempotent on request_id, so a consumer
that crashes between writing and acking simply writes the batch again. Money is summed exactly
(Decimal, never float), and a record without a price is counted as unpriced, never as free.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, get_args

from ..accounting.record import TOKEN_FIELDS, UsageRecord
from ._codec import EXACT, decimal_text

GroupBy = Literal["model", "key", "tenant", "provider", "day"]
GROUP_BY: tuple[GroupBy, ...] = get_args(GroupBy)
# The record field each grouping reads; "day" is the UTC date of ts, which each backend derives.
GROUP_FIELDS: dict[GroupBy, str] = {"model": "model", "key": "key_id", "tenant": "tenant", "provider": "provider"}


class LedgerUnavailable(Exception):
    """The database cannot be reached or failed mid-call. Nothing of the failed call was committed,
    so the caller retries the same call later (a consumer keeps its batch unacknowledged). The next
    call reconnects."""


class LedgerSchemaError(Exception):
    """The database schema is not the version this code expects; the message says what to run."""


@dataclass(frozen=True, slots=True)
class Filters:
    """Which records a list, report or total covers; None means no restriction."""

    since: datetime | None = None
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    # Records strictly before this time (budgets read the spend from before the process started).
    until: datetime | None = None

    def matches(self, record: UsageRecord) -> bool:
        return (
            (self.since is None or record.ts >= self.since)
            and (self.until is None or record.ts < self.until)
            and (self.tenant is None or record.tenant == self.tenant)
            and (self.key_id is None or record.key_id == self.key_id)
            and (self.model is None or record.model == self.model)
        )

    def conditions(self) -> list[tuple[str, str, object]]:
        """(column, operator, value) triples each backend turns into `column <op> ?`."""
        out: list[tuple[str, str, object]] = []
        if self.since is not None:
            out.append(("ts", ">=", self.since))
        if self.until is not None:
            out.append(("ts", "<", self.until))
        for col, v in (("tenant", self.tenant), ("key_id", self.key_id), ("model", self.model)):
            if v is not None:
                out.append((col, "=", v))
        return out


@dataclass(slots=True)
class ReportRow:
    """One group of a report (or the total). cost_usd sums priced records only; unpriced_requests
    says how many records had no price, so a zero cost is never mistaken for "free"."""

    group: str
    requests: int = 0
    unpriced_requests: int = 0
    estimated_requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["cost_usd"] = decimal_text(self.cost_usd)
        return d

    def add(self, other: ReportRow) -> None:
        for name in ("requests", "unpriced_requests", "estimated_requests", *TOKEN_FIELDS):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd = EXACT.add(self.cost_usd, other.cost_usd)


# The aggregate columns every backend selects, in this order, after the group.
AGGREGATES: tuple[str, ...] = ("requests", "unpriced_requests", "estimated_requests", *TOKEN_FIELDS, "cost_usd")


def report_row(group: str, values: Sequence[object]) -> ReportRow:
    """A ReportRow from a group and the AGGREGATES in order (counts may come back as Decimal or None
    from SUM over no rows)."""
    row = ReportRow(group=group)
    for name, value in zip(AGGREGATES, values, strict=True):
        if name == "cost_usd":
            # Normalized, so NUMERIC(20,12) and decimal text give the same Decimal (and str()).
            row.cost_usd = Decimal(0) if value is None else Decimal(decimal_text(Decimal(str(value))))
        else:
            setattr(row, name, 0 if value is None else int(str(value)))
    return row


def total_of(rows: Sequence[ReportRow], group: str = "total") -> ReportRow:
    total = ReportRow(group=group)
    for r in rows:
        total.add(r)
    return total


def order_rows(by: GroupBy, rows: builtins.list[ReportRow]) -> builtins.list[ReportRow]:
    """Days in calendar order; other groups by cost (the question is usually "who spends most"),
    then requests, then name, so the order is stable across backends."""
    if by == "day":
        return sorted(rows, key=lambda r: r.group)
    return sorted(rows, key=lambda r: (-r.cost_usd, -r.requests, r.group))


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


class Ledger(abc.ABC):
    """Async access to the usage ledger. Every method raises LedgerUnavailable when the database
    cannot be used, and reconnects on the next call."""

    # Shown in messages: the SQLite path or host:port/dbname (never a password).
    target: str
    migrations: tuple[Migration, ...]
    # Calls that failed because the database could not be used (a metric).
    errors: int = 0

    @property
    def latest_version(self) -> int:
        return self.migrations[-1].version

    @abc.abstractmethod
    async def migrate(self) -> builtins.list[int]:
        """Apply the migrations the database lacks, in order, each in a transaction; return the
        versions applied (empty when up to date). Safe to run repeatedly and concurrently."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The newest migration applied (0: none)."""

    async def check_schema(self) -> None:
        """Refuse to run against a schema older or newer than this code, with the fix in the message."""
        version = await self.schema_version()
        if version < self.latest_version:
            raise LedgerSchemaError(
                f"ledger {self.target}: schema is at version {version}, this gateway needs "
                f"{self.latest_version}: run `extproc db migrate`"
            )
        if version > self.latest_version:
            raise LedgerSchemaError(
                f"ledger {self.target}: schema version {version} is newer than this gateway "
                f"({self.latest_version}): upgrade the gateway"
            )

    @abc.abstractmethod
    async def insert(self, records: Sequence[UsageRecord]) -> int:
        """Store records whose request_id is new, all in one transaction; return how many were new.
        Raises InvalidRecord (nothing written) when a record cannot be stored as given."""

    @abc.abstractmethod
    async def list(
        self,
        since: datetime | None = None,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[UsageRecord]:
        """Matching records, newest first."""

    @abc.abstractmethod
    async def aggregate(self, by: GroupBy | None, filters: Filters) -> builtins.list[ReportRow]:
        """One ReportRow per group (by=None: one row for everything, even when nothing matches)."""

    async def report(
        self,
        by: GroupBy,
        since: datetime | None = None,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
    ) -> builtins.list[ReportRow]:
        if by not in GROUP_BY:
            raise ValueError(f"cannot group by {by!r}: use one of {', '.join(GROUP_BY)}")
        rows = await self.aggregate(by, Filters(since, tenant, key_id, model))
        return order_rows(by, rows)

    async def totals(
        self,
        since: datetime | None = None,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        until: datetime | None = None,
    ) -> ReportRow:
        (row,) = await self.aggregate(None, Filters(since, tenant, key_id, model, until))
        return row

    @abc.abstractmethod
    async def count(self) -> int: ...

    @abc.abstractmethod
    async def last_seq(self) -> int:
        """The insertion sequence of the newest record (0: empty)."""

    @abc.abstractmethod
    async def after_seq(self, seq: int, limit: int = 500) -> builtins.list[tuple[int, UsageRecord]]:
        """Records inserted after `seq`, oldest first, with their sequence numbers."""

    async def follow(
        self, after: int | None = None, *, poll_interval: float = 1.0, batch: int = 500
    ) -> AsyncGenerator[tuple[int, UsageRecord], None]:
        """Records as they are inserted after `after` (default: from now on), forever.

        Polling, because neither SQLite nor a plain PostgreSQL table pushes rows. On PostgreSQL a
        sequence value is taken at insert but becomes visible at commit, so two writers committing
        out of order could let a poll skip a row; with one consumer writing, as designed, it cannot.
        LedgerUnavailable propagates; call again with the last sequence seen to resume."""
        cursor = await self.last_seq() if after is None else after
        while True:
            rows = await self.after_seq(cursor, batch)
            for seq, record in rows:
                cursor = seq
                yield seq, record
            if len(rows) < batch:
                await asyncio.sleep(poll_interval)

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
