"""What both backends share about turning a UsageRecord into a row and back.

Costs are checked here, before any database sees them, so the two backends accept and return the
same values: PostgreSQL would silently round a cost with more than 12 decimals into NUMERIC(20,12),
and SQLite would keep it; both now refuse it the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation
from operator import itemgetter
from typing import Any

from ..accounting.record import UsageRecord

# The ledger's columns are the record's fields, in order: the record type is the contract.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
# A row's values in the order of COLUMNS (the INSERTs' placeholders); in C, ~0.7 µs a row less than a
# generator.
row_tuple = itemgetter(*COLUMNS)

COST_SCALE = 12
COST_INTEGER_DIGITS = 8
_BOOLEANS = tuple(f.name for f in fields(UsageRecord) if f.type in ("bool", bool))
_COST_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
_COST_LIMIT = Decimal(10) ** COST_INTEGER_DIGITS

# Sums of many costs must never round: far more precision than any ledger can accumulate.
EXACT = Context(prec=200)


class InvalidRecord(ValueError):
    """A record no ledger can store as given (a bad cost or id). Raised before anything is written,
    so the caller can set that record aside and insert the rest."""


def decimal_text(value: Decimal) -> str:
    """Fixed point without an exponent or trailing zeros ('0.00015', '12'): the same text whether
    the value came back from NUMERIC(20,12) or from a TEXT column."""
    if value == 0:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_cost(request_id: str, text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidRecord(f"record {request_id!r}: cost_usd {text!r} is not a decimal") from None
    if not value.is_finite() or value < 0:
        raise InvalidRecord(f"record {request_id!r}: cost_usd {text!r} must be a finite amount >= 0")
    if value >= _COST_LIMIT:
        raise InvalidRecord(f"record {request_id!r}: cost_usd {text!r} is out of range (< 10^{COST_INTEGER_DIGITS})")
    if value.quantize(_COST_QUANTUM, context=EXACT) != value:
        raise InvalidRecord(f"record {request_id!r}: cost_usd {text!r} has more than {COST_SCALE} decimals")
    return value


def utc(ts: datetime) -> datetime:
    """Records carry UTC; a naive datetime is taken as UTC (as UsageRecord.from_dict does)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Row:
    """A record checked and normalized for storage: ts in UTC, cost as a Decimal."""

    values: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.values["request_id"])


def prepare(record: UsageRecord) -> Row:
    if not isinstance(record.request_id, str) or not record.request_id:
        raise InvalidRecord(f"record with request_id {record.request_id!r}: a non-empty request_id is required")
    if not isinstance(record.ts, datetime):
        raise InvalidRecord(f"record {record.request_id!r}: ts must be a datetime")
    values = {name: getattr(record, name) for name in COLUMNS}
    values["ts"] = utc(record.ts)
    values["cost_usd"] = parse_cost(record.request_id, record.cost_usd)
    values["saved_usd"] = parse_cost(record.request_id, record.saved_usd)
    values["pii"] = pii_text(record.request_id, record.pii)
    return Row(values)


def pii_text(request_id: str, pii: Any) -> str | None:
    """The per-type counts as the JSON text both ledgers store (sorted keys: one text per value)."""
    if pii is None:
        return None
    if not isinstance(pii, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in pii.items()):
        raise InvalidRecord(f"record {request_id!r}: pii must map entity types to counts")
    return json.dumps(pii, sort_keys=True, separators=(",", ":")) if pii else None


def validate_record(record: UsageRecord) -> None:
    """Raise InvalidRecord if no ledger would store `record`: lets a consumer dead-letter one bad
    record before insert, instead of retrying a batch insert would refuse every time."""
    prepare(record)


def to_record(values: dict[str, Any]) -> UsageRecord:
    """A row read back (ts a datetime, cost a Decimal or text, booleans maybe 0/1) as its record."""
    out = dict(values)
    out["ts"] = utc(out["ts"])
    for name in ("cost_usd", "saved_usd"):
        value = out.get(name)
        out[name] = None if value is None else decimal_text(Decimal(value))
    for name in _BOOLEANS:
        out[name] = bool(out[name])
    pii = out.get("pii")
    out["pii"] = json.loads(pii) if isinstance(pii, str) else pii
    return UsageRecord(**out)
