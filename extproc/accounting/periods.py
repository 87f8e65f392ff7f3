"""Budget periods: calendar day, ISO week (from Monday) or month, in UTC.

A budget compares the accounting aggregates with its amount. They are kept per UTC day and, for the
weeks and months a budget reads, as period totals beside them (extproc.accounting.sink): the spend of a
period is the sum of its days so far, or its total once a budget check has started one.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from typing import Literal

Period = Literal["day", "week", "month"]


def period_start(period: Period, day: date) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(period: Period, day: date) -> date:
    """The first day of the next period."""
    start = period_start(period, day)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


@functools.lru_cache(maxsize=64)
def _days(period: Period, day: date) -> tuple[str, ...]:
    start = period_start(period, day)
    return tuple((start + timedelta(days=i)).isoformat() for i in range((day - start).days + 1))


def period_days(period: Period, day: date) -> list[str]:
    """ "YYYY-MM-DD" of every day of the period from its start up to and including `day` (cached:
    every budget check asks)."""
    return list(_days(period, day))


def period_id(period: Period, day: date) -> str:
    """A name for the period `day` is in: "2026-12-06", "2026-W49", "2026-12"."""
    if period == "day":
        return day.isoformat()
    if period == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{day.year}-{day.month:02d}"


def seconds_to_end(period: Period, now: datetime) -> float:
    """Seconds from `now` until the period it is in ends (when the budget starts over)."""
    end = period_end(period, now.astimezone(UTC).date())
    return (datetime(end.year, end.month, end.day, tzinfo=UTC) - now).total_seconds()


def utc_today(now: datetime | None = None) -> date:
    return (now or datetime.now(UTC)).astimezone(UTC).date()
