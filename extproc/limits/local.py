"""Limits kept in this process's memory: the embedded backend's limiter, and the fallback the Redis
limiter uses during an outage (with every limit divided by the expected number of replicas).

Everything a decision reads or writes is in memory and the decision runs without an await in between,
so concurrent requests on the event loop see each other's charges; budget spend (the only input that
may need I/O) is read before the decision. The state can be written out (`snapshot`) so that
`extproc limits show`, another process, can see it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from ..accounting.periods import period_days, period_id, seconds_to_end
from .engine import EPS_US, WINDOW_US, Alert, Check, CheckStatus, Demand, Limiter, RateState, Verdict, gcra, remaining
from .spec import Rule

# (rule, aggregate field, days of the period so far) -> spend in the field's unit.
SpentFn = Callable[[Rule, str, list[str]], Awaitable[int]]
# Called with an alert's once-key; True when it was not sent before (persisted where that matters).
OnceFn = Callable[[str], Awaitable[bool]]


def _now_us() -> float:
    return time.time() * 1e6


class LocalLimiter(Limiter):
    def __init__(
        self,
        spent: SpentFn | None = None,
        *,
        divisor: int = 1,
        lease_seconds: float = 30.0,
        once: OnceFn | None = None,
        clock: Callable[[], float] = _now_us,
    ) -> None:
        # Spend of a budget's period so far (the accounting aggregates); None: no budget checks.
        self.spent = spent
        self.divisor = max(1, divisor)
        self.lease_us = lease_seconds * 1e6
        self.clock = clock
        self._once = once
        self._alerted: set[str] = set()
        # (tenant, state scope, what) -> TAT
        self.tat: dict[tuple[str, str, str], float] = {}
        # (tenant, state scope) -> request id -> lease expiry
        self.slots: dict[tuple[str, str], dict[str, float]] = {}
        # (tenant, scope, what) -> request id -> (amount, lease expiry)
        self.reserved: dict[tuple[str, str, str], dict[str, tuple[int, float]]] = {}

    def limit_of(self, check: Check) -> int:
        return max(1, check.limit // self.divisor) if self.divisor > 1 else check.limit

    async def _budget_base(self, tenant: str, check: Check, days: list[str]) -> int | None:
        """What the budget has used outside the reservations held here; None: not checked."""
        if self.spent is None:
            return None
        return await self.spent(check.rule, check.field, days)

    def _budget_limit(self, tenant: str, check: Check) -> int:
        return check.limit

    # -- acquire ------------------------------------------------------------------------------------

    async def acquire(self, demand: Demand) -> Verdict:
        base: dict[int, int] = {}
        day = datetime.now(UTC).date()
        for i, c in enumerate(demand.checks):
            if c.kind == "budget":
                b = await self._budget_base(demand.tenant, c, period_days(c.rule.period, day))
                if b is not None:
                    base[i] = b
        # From here to the charges: no await, so the decision and the charges are one step. Every
        # check is evaluated (a refusal still reports the rate limits' state), as the Redis script does.
        now = self.clock()
        verdict = Verdict(True)
        new_tats: list[tuple[tuple[str, str, str], float]] = []
        rate_tats: list[tuple[Check, float, float]] = []
        for i, c in enumerate(demand.checks):
            if c.kind == "rate":
                interval = WINDOW_US / self.limit_of(c)
                key: tuple[str, str, str] = (demand.tenant, c.rule.state_scope, c.what)
                tat = max(self.tat.get(key, 0.0), now)
                if c.cost * interval > WINDOW_US + EPS_US:
                    self._refuse(verdict, c, None, never=True)
                else:
                    ok, new, wait = gcra(tat, now, c.cost, interval)
                    if ok:
                        new_tats.append((key, new))
                    else:
                        self._refuse(verdict, c, wait / 1e6)
                rate_tats.append((c, tat, interval))
            elif c.kind == "concurrency":
                held = self._live(self.slots.get((demand.tenant, c.rule.state_scope)), now)
                if len(held) >= self.limit_of(c) and demand.request_id not in held:
                    self._refuse(verdict, c, 1.0, used=len(held))
            elif i in base:
                res = self._live_reserved(self.reserved.get(self._rkey(demand.tenant, c)), now)
                used = base[i] + sum(a for a, _ in res.values())
                if used >= self._budget_limit(demand.tenant, c):
                    self._refuse(verdict, c, None, used=used)
                else:
                    verdict.budgets.append((c, used))
        if not verdict.allowed:
            # Nothing is charged: report each rate limit as it stands.
            verdict.budgets = []
            verdict.rates = [
                RateState(c, remaining(t, now, iv), (t - now) / 1e6, self.limit_of(c)) for c, t, iv in rate_tats
            ]
            return verdict
        after = dict(new_tats)
        for c, t, iv in rate_tats:
            charged = after.get((demand.tenant, c.rule.state_scope, c.what), t)
            verdict.rates.append(RateState(c, remaining(charged, now, iv), (charged - now) / 1e6, self.limit_of(c)))
        for tkey, tat_new in new_tats:
            self.tat[tkey] = tat_new
        expiry = now + self.lease_us
        for i, c in enumerate(demand.checks):
            if c.kind == "concurrency":
                self.slots.setdefault((demand.tenant, c.rule.state_scope), {})[demand.request_id] = expiry
            elif i in base:
                self.reserved.setdefault(self._rkey(demand.tenant, c), {})[demand.request_id] = (c.cost, expiry)
        demand.holder = self
        return verdict

    @staticmethod
    def _refuse(
        verdict: Verdict, check: Check, retry_after: float | None, *, never: bool = False, used: int = 0
    ) -> None:
        """Note a refusal (the first one decides what the client is told)."""
        if verdict.allowed:
            verdict.allowed = False
            verdict.refused_by = check
            verdict.retry_after = retry_after
            verdict.never = never
            verdict.used = used

    @staticmethod
    def _rkey(tenant: str, c: Check) -> tuple[str, str, str]:
        return (tenant, c.rule.scope, c.what)

    @staticmethod
    def _live(held: dict[str, float] | None, now: float) -> dict[str, float]:
        if not held:
            return {}
        for rid in [r for r, exp in held.items() if exp <= now]:
            del held[rid]
        return held

    @staticmethod
    def _live_reserved(held: dict[str, tuple[int, float]] | None, now: float) -> dict[str, tuple[int, float]]:
        if not held:
            return {}
        for rid in [r for r, (_, exp) in held.items() if exp <= now]:
            del held[rid]
        return held

    # -- settle -------------------------------------------------------------------------------------

    async def ended(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        for c in demand.checks:
            if c.kind == "concurrency":
                held = self.slots.get((demand.tenant, c.rule.state_scope))
                if held is not None:
                    held.pop(demand.request_id, None)
            elif c.kind == "budget":
                res = self.reserved.get(self._rkey(demand.tenant, c))
                entry = res.get(demand.request_id) if res is not None else None
                if res is not None and entry is not None:
                    res[demand.request_id] = (pusd if c.what == "budget_usd" else tokens, entry[1])
        return []

    async def settle(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        now = self.clock()
        released: list[Check] = []
        for c in demand.checks:
            if c.what == "tokens" and tokens != c.cost:
                key = (demand.tenant, c.rule.state_scope, c.what)
                if key in self.tat:
                    self.tat[key] += (tokens - c.cost) * (WINDOW_US / self.limit_of(c))
                    if self.tat[key] <= now:
                        del self.tat[key]
            elif c.kind == "concurrency":
                skey = (demand.tenant, c.rule.state_scope)
                held = self.slots.get(skey)
                if held is not None:
                    held.pop(demand.request_id, None)
                    if not held:
                        del self.slots[skey]
            elif c.kind == "budget":
                rkey = self._rkey(demand.tenant, c)
                res = self.reserved.get(rkey)
                if res is not None and res.pop(demand.request_id, None) is not None:
                    released.append(c)
                    if not res:
                        del self.reserved[rkey]
        return await self._after_settle(demand, released, tokens, pusd)

    async def _after_settle(self, demand: Demand, released: list[Check], tokens: int, pusd: int) -> list[Alert]:
        """Alerts for the budgets this request's usage made cross a threshold (read after the usage
        was recorded: the accounting stage finishes before the limits stage)."""
        if self.spent is None:
            return []
        alerts: list[Alert] = []
        day = datetime.now(UTC).date()
        for c in released:
            used = await self.spent(c.rule, c.field, period_days(c.rule.period, day))
            pid = period_id(c.rule.period, day)
            for threshold in c.rule.alert_at:
                if used < threshold * c.limit:
                    break
                once = f"{demand.tenant}|{c.rule.scope}|{c.what}|{pid}|{threshold:g}"
                if once in self._alerted:
                    continue
                self._alerted.add(once)
                if self._once is None or await self._once(once):
                    alerts.append(Alert(c, threshold, used, pid))
        return alerts

    async def refresh(self, demands: list[Demand]) -> None:
        expiry = self.clock() + self.lease_us
        for d in demands:
            for c in d.checks:
                if c.kind == "concurrency":
                    held = self.slots.get((d.tenant, c.rule.state_scope))
                    if held is not None and d.request_id in held:
                        held[d.request_id] = expiry
                elif c.kind == "budget":
                    res = self.reserved.get(self._rkey(d.tenant, c))
                    if res is not None and d.request_id in res:
                        res[d.request_id] = (res[d.request_id][0], expiry)

    # -- status (extproc limits show) ---------------------------------------------------------------

    async def status(self, tenant: str, checks: tuple[Check, ...]) -> list[CheckStatus]:
        now = self.clock()
        day = datetime.now(UTC).date()
        out: list[CheckStatus] = []
        for c in checks:
            if c.kind == "rate":
                tat = self.tat.get((tenant, c.rule.state_scope, c.what), 0.0)
                left = remaining(tat, now, c.interval)
                out.append(CheckStatus(c, c.limit - left, left, max(0.0, tat - now) / 1e6))
            elif c.kind == "concurrency":
                n = len(self._live(self.slots.get((tenant, c.rule.state_scope)), now))
                out.append(CheckStatus(c, n, max(0, c.limit - n), 0.0))
            else:
                spent = await self.spent(c.rule, c.field, period_days(c.rule.period, day)) if self.spent else 0
                res = self._live_reserved(self.reserved.get(self._rkey(tenant, c)), now)
                used = spent + sum(a for a, _ in res.values())
                end = seconds_to_end(c.rule.period, datetime.now(UTC))
                out.append(CheckStatus(c, used, max(0, c.limit - used), end))
        return out

    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-able data (the embedded backend's `limits show` reads it)."""
        return {
            "tat": [[*k, v] for k, v in self.tat.items()],
            "slots": [[*k, held] for k, held in self.slots.items()],
            "reserved": [[*k, {r: list(v) for r, v in held.items()}] for k, held in self.reserved.items()],
        }

    def load(self, data: dict[str, Any]) -> None:
        self.tat = {(t, s, w): float(v) for t, s, w, v in data.get("tat", [])}
        self.slots = {(t, s): {r: float(e) for r, e in held.items()} for t, s, held in data.get("slots", [])}
        self.reserved = {
            (t, s, w): {r: (int(v[0]), float(v[1])) for r, v in held.items()}
            for t, s, w, held in data.get("reserved", [])
        }


class FallbackLimiter(LocalLimiter):
    """The Redis limiter's stand-in during an outage (`limits.failure_mode: open`): rate and
    concurrency limits divided by the expected replicas; a budget gets the share of what was left
    when Redis last answered for it (its remainder divided the same way), counting what this process
    settled since. A budget this process never saw in Redis is not checked. Sends no alerts: replicas
    cannot agree on "once" without Redis."""

    def __init__(self, divisor: int, lease_seconds: float = 30.0, clock: Callable[[], float] = _now_us) -> None:
        super().__init__(None, divisor=divisor, lease_seconds=lease_seconds, clock=clock)
        # (tenant, scope, what) -> used, as Redis last reported it
        self.known: dict[tuple[str, str, str], int] = {}
        # (tenant, scope, what) -> usage settled here since
        self.settled: dict[tuple[str, str, str], int] = {}

    def remember(self, tenant: str, budgets: list[tuple[Check, int]]) -> None:
        for c, used in budgets:
            self.known[self._rkey(tenant, c)] = used

    async def _budget_base(self, tenant: str, check: Check, days: list[str]) -> int | None:
        key = self._rkey(tenant, check)
        return self.settled.get(key, 0) if key in self.known else None

    def _budget_limit(self, tenant: str, check: Check) -> int:
        left = max(0, check.limit - self.known[self._rkey(tenant, check)])
        return left // self.divisor

    async def _after_settle(self, demand: Demand, released: list[Check], tokens: int, pusd: int) -> list[Alert]:
        for c in released:
            key = self._rkey(demand.tenant, c)
            self.settled[key] = self.settled.get(key, 0) + (pusd if c.what == "budget_usd" else tokens)
        return []

    def forget(self) -> None:
        """Redis is back: it has the truth again."""
        self.known.clear()
        self.settled.clear()
