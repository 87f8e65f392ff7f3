"""The limiter contract, and the arithmetic both limiters share.

A request's rules become `Check`s: one per limit that applies (requests and tokens per minute,
concurrency, a budget in USD or tokens). A limiter answers `acquire` atomically for all of them: either
every check passes and every one is charged (a request slot, the estimated tokens, a concurrency slot,
a budget reservation), or none is charged and the verdict names the check that refused. `settle`
replaces the estimate with what the request used, once it is known, and releases what the request
held. Reservations and concurrency slots are leases: a request whose process died without settling
stops holding them when its lease runs out (`refresh` extends the leases of requests still in flight).

Rate limits are GCRA (the generic cell rate algorithm): per scope one "theoretical arrival time" (TAT).
A charge of `cost` units moves it `cost x interval` later (interval = one minute / limit); the charge
passes when the TAT stays within one minute of now. So a full minute's limit can be used at once, it
comes back continuously (no fixed windows, no 2x burst at a boundary), and a refund moves the TAT back.

Times are microseconds of wall-clock time (Redis's TIME on the shared backend, so replicas agree).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Literal

from .spec import Rule

# Rate limits are per minute.
WINDOW_US = 60_000_000
# Float slack (µs) when comparing TATs: N charges of 1/N of the window must land on it, and at
# ~1.8e15 µs a double's step is 0.25 µs. 1 µs is at most ~1.7e-8 of a minute's limit.
EPS_US = 1.0

What = Literal["requests", "tokens", "concurrency", "budget_usd", "budget_tokens"]
# The accounting aggregate field a budget reads.
BUDGET_FIELDS: dict[str, str] = {"budget_usd": "cost_pusd", "budget_tokens": "total_tokens"}


Kind = Literal["rate", "concurrency", "budget"]
_KINDS: dict[str, Kind] = {
    "requests": "rate",
    "tokens": "rate",
    "concurrency": "concurrency",
    "budget_usd": "budget",
    "budget_tokens": "budget",
}


@dataclass(frozen=True, slots=True)
class Check:
    what: What
    rule: Rule
    limit: int
    # Units charged: 1 request, the estimated tokens, 1 slot, the reserved amount (pico-USD or tokens).
    cost: int
    # From `what`; an attribute, not a property: the limiters ask ~30 times per request.
    kind: Kind = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _KINDS[self.what])

    @property
    def interval(self) -> float:
        """Microseconds one unit of a rate limit takes to come back."""
        return WINDOW_US / self.limit

    @property
    def field(self) -> str:
        return BUDGET_FIELDS[self.what]


def plan(rules: tuple[Rule, ...], tokens: int, pusd: int) -> tuple[Check, ...]:
    """The checks for a request with these rules, estimated tokens and estimated cost."""
    out: list[Check] = []
    for r in rules:
        if r.rpm is not None:
            out.append(Check("requests", r, r.rpm, 1))
        if r.tpm is not None:
            out.append(Check("tokens", r, r.tpm, tokens))
        if r.concurrency is not None:
            out.append(Check("concurrency", r, r.concurrency, 1))
        if r.budget_pusd is not None:
            out.append(Check("budget_usd", r, r.budget_pusd, pusd))
        if r.budget_tokens is not None:
            out.append(Check("budget_tokens", r, r.budget_tokens, tokens))
    return tuple(out)


@dataclass(slots=True)
class Demand:
    """One request's claim on its limits, from acquire to settle."""

    request_id: str
    tenant: str
    checks: tuple[Check, ...]
    # Estimates charged at acquire (tokens: input + max output; pusd: their price).
    tokens: int = 0
    pusd: int = 0
    # The limiter that holds it (the failover may have used its local fallback).
    holder: Limiter | None = None
    # (tokens, pico-USD) the holder settled at the end of the response (Limiter.ended), if it did.
    ended: tuple[int, int] | None = None


@dataclass(slots=True)
class RateState:
    """A rate limit's figures for the x-ratelimit-* headers."""

    check: Check
    remaining: int
    # Seconds until the limit is back to full.
    reset: float
    # The limit in force (the outage fallback's share is smaller than the configured one).
    limit: int = 0

    def __post_init__(self) -> None:
        self.limit = self.limit or self.check.limit


@dataclass(slots=True)
class Verdict:
    allowed: bool
    # The check that refused, and when a retry could pass (None: not by waiting within the minute).
    refused_by: Check | None = None
    retry_after: float | None = None
    # The request alone asks for more than the whole limit (it can never pass as it is).
    never: bool = False
    # A refused budget check: what is used (spent + reserved by requests in flight).
    used: int = 0
    rates: list[RateState] = field(default_factory=list)
    # Budget checks that passed: used before this request (the fallback remembers these).
    budgets: list[tuple[Check, int]] = field(default_factory=list)

    def tightest(self, what: What) -> RateState | None:
        """The rate limit of this kind with the least left: what the headers report."""
        found = [s for s in self.rates if s.check.what == what]
        return min(found, key=lambda s: (s.remaining, -s.reset)) if found else None


@dataclass(frozen=True, slots=True)
class Alert:
    """A budget crossed a threshold (sent once per threshold per period)."""

    check: Check
    threshold: float
    used: int
    period_id: str


@dataclass(slots=True)
class CheckStatus:
    """What `extproc limits show` prints for one check."""

    check: Check
    used: int
    remaining: int
    # Seconds until the limit is back to full (rates), or until the budget period ends.
    reset: float


def gcra(tat: float, now: float, cost: int, interval: float) -> tuple[bool, float, float]:
    """(passes, the new TAT if it passes, retry-after in µs if not). Shared by the local limiter; the
    Redis script does the same arithmetic in Lua."""
    start = max(tat, now)
    new = start + cost * interval
    if new - now <= WINDOW_US + EPS_US:
        return True, new, 0.0
    return False, start, new - WINDOW_US - now


def remaining(tat: float, now: float, interval: float) -> int:
    """Units left in the window at `now` for a TAT."""
    units = math.floor((WINDOW_US - max(0.0, tat - now) + EPS_US) / interval)
    # The slack must not show as more than the limit (it would for limits above ~1M a minute).
    return max(0, min(units, round(WINDOW_US / interval)))


class Limiter(abc.ABC):
    # Settlements kept back to go with a later call that then could not reach the store (a metric).
    deferred_dropped: int = 0

    @abc.abstractmethod
    async def acquire(self, demand: Demand) -> Verdict:
        """Charge every check or none. Raises StoreUnavailable when the store cannot answer."""

    @abc.abstractmethod
    async def settle(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        """Replace the estimates with what the request used, release what it held; return the
        budget thresholds its usage crossed (for the first time in the period, across replicas)."""

    def release_keys(self, demand: Demand) -> tuple[str, ...]:
        """What the usage sink drops from the store with the request's record (its budget
        reservations), so that its cost is counted exactly once throughout; () when the limiter
        keeps them elsewhere (in process)."""
        return ()

    async def ended(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        """The response is complete (the client is about to get its last bytes): free the
        concurrency slots and turn the budget reservations into what the request used; return the
        thresholds crossed, as settle does. `settle` follows once the usage record is stored. Until
        then the request counts at its real cost, never at nothing (the record may not be in the
        aggregates yet). A limiter that settled everything here sets `demand.ended`."""
        return []

    @abc.abstractmethod
    async def refresh(self, demands: list[Demand]) -> None:
        """Extend the leases of requests still in flight."""

    async def close(self) -> None:
        return None
