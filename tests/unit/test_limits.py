"""The limiters: GCRA and budget arithmetic at the boundaries, reservations and settlement, leases.

Every scenario runs on both limiters, the in-memory one (embedded backend, outage fallback) and the
Redis one (its Lua scripts against a real redis-server), so the two implementations cannot drift.
Scenarios that need time to pass use a controllable clock locally and short real waits on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import pytest

from extproc.accounting.periods import period_days, period_end, period_id, period_start, seconds_to_end
from extproc.accounting.sink import DROP_RESERVATION_LUA, aggregate_key, periods_of
from extproc.limits.engine import WINDOW_US, Check, Demand, Limiter, gcra, plan, remaining
from extproc.limits.local import FallbackLimiter, LocalLimiter
from extproc.limits.redis import RedisLimiter
from extproc.limits.spec import Limits, LimitsError, Rule, parse_limits, rules_of
from extproc.store.errors import StoreUnavailable
from extproc.store.redis import RedisBackend

# -- pure arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "burst", "passes"),
    [(1, 1, 1), (1, 2, 1), (7, 7, 7), (7, 8, 7), (60, 60, 60), (1000, 1001, 1000), (3, 10, 3)],
)
def test_gcra_allows_exactly_the_limit_at_once(limit: int, burst: int, passes: int) -> None:
    tat, now, ok_count = 0.0, 1e15, 0
    interval = WINDOW_US / limit
    for _ in range(burst):
        ok, new, _ = gcra(tat, now, 1, interval)
        if ok:
            ok_count += 1
            tat = new
    assert ok_count == passes
    assert remaining(tat, now, interval) == 0


def test_gcra_has_no_double_burst_at_a_boundary() -> None:
    """A fixed window lets N through just before its end and N more just after; GCRA lets through
    only what came back in between."""
    n, interval = 600, WINDOW_US / 600
    tat, now = 0.0, 1e15
    for _ in range(n):
        ok, tat, _ = gcra(tat, now, 1, interval)
        assert ok
    later = now + 200_000  # 0.2 s later: 0.2 s x 10/s = 2 requests came back
    passed = 0
    for _ in range(n):
        ok, new, _ = gcra(tat, later, 1, interval)
        if not ok:
            break
        tat, passed = new, passed + 1
    assert passed == 2


@pytest.mark.parametrize(
    ("cost", "elapsed_s", "ok", "wait_s"),
    [
        (1, 0.0, False, 0.1),  # full: the next unit comes back in one interval
        (5, 0.0, False, 0.5),
        (1, 0.1, True, 0.0),
        (10, 0.5, False, 0.5),
    ],
)
def test_gcra_retry_after(cost: int, elapsed_s: float, ok: bool, wait_s: float) -> None:
    interval = WINDOW_US / 600  # 0.1 s per unit
    now = 1e15
    tat = now + WINDOW_US  # exactly full
    passed, _, wait = gcra(tat, now + elapsed_s * 1e6, cost, interval)
    assert passed is ok
    assert wait / 1e6 == pytest.approx(wait_s, abs=1e-6)


@pytest.mark.parametrize(
    ("period", "day", "start", "end", "pid", "ndays"),
    [
        ("day", date(2026, 12, 6), date(2026, 12, 6), date(2026, 12, 7), "2026-12-06", 1),
        ("week", date(2026, 12, 6), date(2026, 11, 30), date(2026, 12, 7), "2026-W49", 7),  # a Sunday
        ("week", date(2026, 11, 30), date(2026, 11, 30), date(2026, 12, 7), "2026-W49", 1),  # a Monday
        ("week", date(2027, 1, 1), date(2026, 12, 28), date(2027, 1, 4), "2026-W53", 5),  # ISO year
        ("month", date(2026, 12, 31), date(2026, 12, 1), date(2027, 1, 1), "2026-12", 31),
        ("month", date(2028, 2, 29), date(2028, 2, 1), date(2028, 3, 1), "2028-02", 29),
        ("month", date(2026, 1, 1), date(2026, 1, 1), date(2026, 2, 1), "2026-01", 1),
    ],
)
def test_budget_periods(period: Any, day: date, start: date, end: date, pid: str, ndays: int) -> None:
    assert period_start(period, day) == start
    assert period_end(period, day) == end
    assert period_id(period, day) == pid
    days = period_days(period, day)
    assert len(days) == ndays and days[0] == start.isoformat() and days[-1] == day.isoformat()


def test_seconds_to_end_of_period() -> None:
    now = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert seconds_to_end("day", now) == 30
    assert seconds_to_end("month", now) == 30


# -- spec -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"requests_per_minute": -1}, "requests_per_minute"),
        ({"requests_per_minute": "ten"}, "requests_per_minute"),
        ({"requests_per_minute": 1.5}, "whole number"),
        ({"tokens_per_minute": True}, "whole number"),
        ({"budget_usd": 0.1}, "quoted decimal"),
        ({"budget_usd": "-3"}, "budget_usd"),
        ({"budget_usd": "0"}, "more than 0"),
        ({"period": "year"}, "period"),
        ({"alert_at": [0]}, "alert_at"),
        ({"models": {"gpt-{5}": {"requests_per_minute": 1}}}, "bad model glob"),
        ({"models": {"gpt-5*": {"budget_usd": "1"}}}, "models.gpt-5*.budget_usd"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_limits_name_the_field(data: dict[str, Any], error: str) -> None:
    with pytest.raises(LimitsError) as info:
        parse_limits(data, "tenants.acme.limits")
    assert error in str(info.value)
    assert str(info.value).startswith("tenants.acme.limits")


def test_rules_and_model_globs() -> None:
    spec = parse_limits(
        {"requests_per_minute": 10, "budget_usd": "2.5", "models": {"gpt-5*": {"tokens_per_minute": 100}}}
    )
    rules = rules_of(spec, "acme", "tenant", "", 3)
    assert [r.models for r in rules] == ["", "gpt-5*"]
    assert rules[0].budget_pusd == 2_500_000_000_000
    assert rules[0].state_scope == "tenant#3" and rules[0].scope == "tenant"
    limits = Limits(rules)
    assert len(limits.for_model("gpt-5.5")) == 2
    assert len(limits.for_model("claude-sonnet")) == 1
    key_rules = rules_of(parse_limits({"concurrent_requests": 2}), "acme", "key", "key_1", 0)
    assert key_rules[0].scope == "key:key_1" and key_rules[0].label == "key key_1"


# -- both limiters ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = time.time() * 1e6

    def __call__(self) -> float:
        return self.t


class Harness:
    """One limiter plus a way to set a budget's recorded spend and to let time pass."""

    def __init__(self, limiter: Limiter, kind: str, backend: RedisBackend | None = None) -> None:
        self.limiter = limiter
        self.kind = kind
        self.backend = backend
        self.spend: dict[tuple[str, str, str, str], int] = {}
        self.clock: Clock | None = None
        self.tenant = f"t{uuid.uuid4().hex[:8]}"

    async def set_spent(self, rule: Rule, field: str, value: int) -> None:
        today = datetime.now(UTC).date().isoformat()
        if self.backend is not None:
            # As a usage record adds to the day (RECORD_SCRIPT): to the period totals that exist too.
            prefix, client = self.backend.prefix, self.backend.client
            key = aggregate_key(prefix, rule.tenant, today, rule.kind, rule.owner)
            delta = value - int(await client.hget(key, field) or 0)
            await client.hincrby(key, field, delta)
            for period in periods_of(today):
                total = aggregate_key(prefix, rule.tenant, period, rule.kind, rule.owner)
                if await client.exists(total):
                    await client.hincrby(total, field, delta)
        else:
            self.spend[(rule.kind, rule.owner, field, today)] = value

    async def record_landed(self, demand: Demand, rule: Rule, field: str, value: int) -> None:
        """What the usage record's script does: the spend arrives and, on Redis, the request's
        reservations go in the same step."""
        await self.set_spent(rule, field, value)
        if self.backend is not None:
            drop = DROP_RESERVATION_LUA + "drop_reservation(KEYS[1], KEYS[2], ARGV[1]) return 1"
            keys = self.limiter.release_keys(demand)
            for i in range(0, len(keys), 2):
                await self.backend.script(drop, list(keys[i : i + 2]), [demand.request_id])

    async def spent(self, rule: Rule, field: str, days: list[str]) -> int:
        return sum(self.spend.get((rule.kind, rule.owner, field, d), 0) for d in days)

    async def wait(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.t += seconds * 1e6
        else:
            await asyncio.sleep(seconds)

    def rule(self, owner: str = "", **kw: Any) -> Rule:
        kind = "key" if owner else "tenant"
        return Rule(self.tenant, kind, owner, "", 0, **kw)  # type: ignore[arg-type]

    def demand(self, rules: tuple[Rule, ...], tokens: int = 0, pusd: int = 0) -> Demand:
        return Demand(uuid.uuid4().hex, self.tenant, plan(rules, tokens, pusd), tokens, pusd)


@pytest.fixture(params=["local", "redis"])
async def h(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Harness]:
    if request.param == "local":
        clock = Clock()
        harness = Harness(LocalLimiter(None, lease_seconds=0.3, clock=clock), "local")
        harness.limiter = LocalLimiter(harness.spent, lease_seconds=0.3, clock=clock)
        harness.clock = clock
        yield harness
        return
    backend = RedisBackend(redis_url, prefix=f"lim{uuid.uuid4().hex[:6]}:")
    harness = Harness(RedisLimiter(backend, lease_seconds=0.3), "redis", backend)
    yield harness
    await backend.close()


async def test_requests_per_minute_exactly_n_and_headers_count_down(h: Harness) -> None:
    rules = (h.rule(rpm=5),)
    seen = []
    for _ in range(5):
        v = await h.limiter.acquire(h.demand(rules))
        assert v.allowed
        state = v.tightest("requests")
        assert state is not None
        seen.append(state.remaining)
    assert seen == [4, 3, 2, 1, 0]
    v = await h.limiter.acquire(h.demand(rules))
    assert not v.allowed and v.refused_by is not None and v.refused_by.what == "requests"
    assert v.retry_after is not None and 0 < v.retry_after <= 12.0 + 1e-3
    state = v.tightest("requests")
    assert state is not None and state.remaining == 0


async def test_a_refusal_charges_nothing(h: Harness) -> None:
    """Every check or none: a request refused by its concurrency limit takes no request slot."""
    rules = (h.rule(rpm=3, concurrency=1),)
    first = h.demand(rules)
    assert (await h.limiter.acquire(first)).allowed
    refused = await h.limiter.acquire(h.demand(rules))
    assert not refused.allowed and refused.refused_by is not None and refused.refused_by.what == "concurrency"
    requests = refused.tightest("requests")
    assert requests is not None and requests.remaining == 2  # reported, not charged
    await h.limiter.settle(first, 0, 0)
    assert (await h.limiter.acquire(h.demand(rules))).allowed
    assert (await h.limiter.acquire(h.demand(rules))).allowed is False  # concurrency again


async def test_tokens_reserved_then_settled_to_actual(h: Harness) -> None:
    rules = (h.rule(tpm=1000),)
    big = h.demand(rules, tokens=1000)
    v = await h.limiter.acquire(big)
    assert v.allowed
    tokens = v.tightest("tokens")
    assert tokens is not None and tokens.remaining == 0
    assert not (await h.limiter.acquire(h.demand(rules, tokens=100))).allowed
    await h.limiter.settle(big, 100, 0)  # used 100 of the 1000 reserved: 900 come back
    nxt = await h.limiter.acquire(h.demand(rules, tokens=900))
    assert nxt.allowed
    state = nxt.tightest("tokens")
    assert state is not None and state.remaining == 0


async def test_settling_above_the_estimate_charges_the_difference(h: Harness) -> None:
    rules = (h.rule(tpm=1000),)
    d = h.demand(rules, tokens=100)
    assert (await h.limiter.acquire(d)).allowed
    await h.limiter.settle(d, 700, 0)
    assert not (await h.limiter.acquire(h.demand(rules, tokens=301))).allowed
    assert (await h.limiter.acquire(h.demand(rules, tokens=300))).allowed


async def test_a_request_larger_than_the_whole_limit_never_passes(h: Harness) -> None:
    v = await h.limiter.acquire(h.demand((h.rule(tpm=1000),), tokens=1001))
    assert not v.allowed and v.never and v.retry_after is None


async def test_concurrency_lease_expires_when_nobody_settles(h: Harness) -> None:
    rules = (h.rule(concurrency=1),)
    assert (await h.limiter.acquire(h.demand(rules))).allowed
    assert not (await h.limiter.acquire(h.demand(rules))).allowed
    await h.wait(0.4)  # lease 0.3 s: the holder died without settling
    assert (await h.limiter.acquire(h.demand(rules))).allowed


async def test_refresh_keeps_a_long_request_holding(h: Harness) -> None:
    rules = (h.rule(concurrency=1),)
    long = h.demand(rules)
    assert (await h.limiter.acquire(long)).allowed
    for _ in range(3):
        await h.wait(0.2)
        await h.limiter.refresh([long])
    assert not (await h.limiter.acquire(h.demand(rules))).allowed
    await h.limiter.settle(long, 0, 0)
    assert (await h.limiter.acquire(h.demand(rules))).allowed


async def test_budget_counts_spend_and_reservations(h: Harness) -> None:
    rule = h.rule(budget_pusd=100, alert_at=(0.8, 1.0))
    await h.set_spent(rule, "cost_pusd", 60)
    first = h.demand((rule,), pusd=30)
    v = await h.limiter.acquire(first)
    assert v.allowed and v.budgets[0][1] == 60
    second = h.demand((rule,), pusd=30)
    assert (await h.limiter.acquire(second)).allowed  # 60 + 30 reserved < 100
    third = await h.limiter.acquire(h.demand((rule,), pusd=1))
    assert not third.allowed and third.used == 120 and third.refused_by is not None
    assert third.refused_by.what == "budget_usd"
    # The first settles at 5: recorded spend becomes 65 (the accounting stage records it first).
    await h.set_spent(rule, "cost_pusd", 65)
    await h.limiter.settle(first, 0, 5)
    assert (await h.limiter.acquire(h.demand((rule,), pusd=1))).allowed  # 65 + 30 + 0 < 100


async def test_ended_frees_the_slot_and_counts_the_real_cost_until_settled(h: Harness) -> None:
    """At the end of the response (before the client has it) the concurrency slot is free and the
    budget counts the request at what it used, not at its estimate and not at nothing: the usage
    record may not be in the aggregates yet. settle then removes the reservation."""
    slot = h.rule(concurrency=1)
    budget = h.rule(budget_pusd=100)
    await h.set_spent(budget, "cost_pusd", 10)
    first = h.demand((slot, budget), pusd=95)
    assert (await h.limiter.acquire(first)).allowed
    refused = await h.limiter.acquire(h.demand((slot, budget), pusd=1))
    assert not refused.allowed and refused.refused_by is not None and refused.refused_by.what == "concurrency"
    over = await h.limiter.acquire(h.demand((budget,), pusd=1))
    assert not over.allowed and over.used == 105  # 10 spent + 95 reserved
    await h.limiter.ended(first, 0, 5)
    second = h.demand((slot, budget), pusd=1)
    v = await h.limiter.acquire(second)
    assert v.allowed, "the finished request still held its slot or its estimate"
    assert v.budgets[0][1] == 15  # 10 spent + 5: its real cost, still reserved
    await h.limiter.settle(second, 0, 0)
    # The record lands in the aggregates (on Redis dropping the reservation in the same step), then
    # settle removes whatever is left: counted once.
    await h.record_landed(first, budget, "cost_pusd", 15)
    await h.limiter.settle(first, 0, 5)
    third = h.demand((budget,), pusd=1)
    v = await h.limiter.acquire(third)
    assert v.allowed and v.budgets[0][1] == 15
    await h.limiter.ended(first, 0, 5)  # after settle: nothing comes back
    fourth = await h.limiter.acquire(h.demand((budget,), pusd=1))
    assert fourth.allowed and fourth.budgets[0][1] == 16  # 15 + the third's 1 in flight


async def test_budget_alerts_once_per_threshold(h: Harness) -> None:
    rule = h.rule(budget_pusd=100, alert_at=(0.5, 0.8, 1.0))
    sent = []
    for spent in (40, 55, 60, 85, 120, 130):
        d = h.demand((rule,), pusd=1)
        v = await h.limiter.acquire(d)
        await h.set_spent(rule, "cost_pusd", spent)
        if v.allowed:
            sent += [(a.threshold, a.used) for a in await h.limiter.settle(d, 0, 1)]
    assert sent == [(0.5, 55), (0.8, 85), (1.0, 120)]


async def test_key_and_tenant_rules_both_apply(h: Harness) -> None:
    tenant_rule = h.rule(rpm=3)
    key_a, key_b = h.rule("key_a", rpm=2), h.rule("key_b", rpm=2)
    assert (await h.limiter.acquire(h.demand((tenant_rule, key_a)))).allowed
    assert (await h.limiter.acquire(h.demand((tenant_rule, key_a)))).allowed
    v = await h.limiter.acquire(h.demand((tenant_rule, key_a)))
    assert not v.allowed and v.refused_by is not None and v.refused_by.rule.owner == "key_a"
    assert (await h.limiter.acquire(h.demand((tenant_rule, key_b)))).allowed
    v = await h.limiter.acquire(h.demand((tenant_rule, key_b)))
    assert not v.allowed and v.refused_by is not None and v.refused_by.rule.kind == "tenant"


async def test_a_reset_epoch_starts_counters_over(h: Harness) -> None:
    rule = h.rule(rpm=1)
    assert (await h.limiter.acquire(h.demand((rule,)))).allowed
    assert not (await h.limiter.acquire(h.demand((rule,)))).allowed
    reset = Rule(rule.tenant, rule.kind, rule.owner, "", 1, rpm=1)
    assert (await h.limiter.acquire(h.demand((reset,)))).allowed


async def test_concurrent_acquires_never_overshoot(h: Harness) -> None:
    rules = (h.rule(rpm=50, concurrency=1000),)
    results = await asyncio.gather(*(h.limiter.acquire(h.demand(rules)) for _ in range(200)))
    assert sum(v.allowed for v in results) == 50


# -- the outage fallback ------------------------------------------------------------------------------


async def test_fallback_divides_limits_and_budget_remainders() -> None:
    clock = Clock()
    fb = FallbackLimiter(divisor=4, lease_seconds=30)
    fb.clock = clock
    rule = Rule("acme", "tenant", "", "", 0, rpm=100, budget_pusd=1000)
    passed = 0
    for _ in range(40):
        d = Demand(uuid.uuid4().hex, "acme", plan((rule,), 0, 0))
        passed += (await fb.acquire(d)).allowed
    assert passed == 25  # the budget was never seen in Redis: not checked, rpm 100 / 4
    budget_only = Rule("acme", "tenant", "", "", 0, budget_pusd=1000)
    check = plan((budget_only,), 0, 10)[0]
    fb.remember("acme", [(check, 600)])  # 400 left when Redis went away: 100 per replica
    spent = 0
    while True:
        d = Demand(uuid.uuid4().hex, "acme", plan((budget_only,), 0, 10), 0, 10)
        if not (await fb.acquire(d)).allowed:
            break
        await fb.settle(d, 0, 30)
        spent += 30
    assert spent == 120  # 0, 30, 60, 90 used < 100 pass; overshoot by at most one request
    fb.forget()
    assert fb.known == {} and fb.settled == {}


def test_check_interval() -> None:
    c = Check("requests", Rule("t", "tenant", "", "", 0, rpm=600), 600, 1)
    assert c.interval == 100_000 and c.kind == "rate"


# -- the service: failover and settling -----------------------------------------------------------------


class FlakyLimiter(Limiter):
    """Answers like a LocalLimiter until told the store is down."""

    def __init__(self) -> None:
        self.inner = LocalLimiter(None)
        self.down = False
        self.settles = 0

    async def acquire(self, demand: Demand) -> Any:
        if self.down:
            from extproc.store.errors import StoreUnavailable

            raise StoreUnavailable("down")
        v = await self.inner.acquire(demand)
        demand.holder = self
        return v

    async def settle(self, demand: Demand, tokens: int, pusd: int) -> list[Any]:
        if self.down:
            from extproc.store.errors import StoreUnavailable

            raise StoreUnavailable("down")
        self.settles += 1
        return await self.inner.settle(demand, tokens, pusd)

    async def refresh(self, demands: list[Demand]) -> None:
        return None


async def _ping_of(flaky: FlakyLimiter) -> None:
    if flaky.down:
        from extproc.store.errors import StoreUnavailable

        raise StoreUnavailable("down")


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_service_failover_and_recovery(mode: Any) -> None:
    from extproc.limits.service import LimitsService, LimitsUnavailable

    flaky = FlakyLimiter()
    service = LimitsService(
        flaky,
        fallback=FallbackLimiter(divisor=2),
        failure_mode=mode,
        ping=lambda: _ping_of(flaky),
        probe_interval=0.05,
        lease_seconds=3,
    )
    await service.start()
    rule = Rule("acme", "tenant", "", "", 0, rpm=10)
    d = Demand("r1", "acme", plan((rule,), 0, 0))
    assert (await service.acquire(d)).allowed and d.holder is flaky
    flaky.down = True
    await service.settle(d, 0, 0)  # cannot settle now: retried in the background
    if mode == "closed":
        with pytest.raises(LimitsUnavailable):
            await service.acquire(Demand("r2", "acme", plan((rule,), 0, 0)))
    else:
        verdicts = [await service.acquire(Demand(f"o{i}", "acme", plan((rule,), 0, 0))) for i in range(8)]
        assert sum(v.allowed for v in verdicts) == 5  # 10 / 2 replicas
        assert verdicts[0].rates[0].limit == 5
    assert service.down and service.counters.outages == 1
    flaky.down = False
    for _ in range(100):
        if not service.down and flaky.settles:
            break
        await asyncio.sleep(0.05)
    assert not service.down, "the probe never found the store again"
    assert flaky.settles == 1, "the settle was not retried"
    d3 = Demand("r3", "acme", plan((rule,), 0, 0))
    assert (await service.acquire(d3)).allowed and d3.holder is flaky
    await service.close()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0004, "1ms"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (59.9994, "59.999s"), (360, "6m0s")],
)
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    from extproc.stages.limits import go_duration

    assert go_duration(seconds) == text


@pytest.mark.parametrize(
    ("current", "argv", "expected"),
    [
        ({}, ["--rpm", "5"], {"requests_per_minute": 5}),
        ({"requests_per_minute": 5}, ["--tpm", "9"], {"requests_per_minute": 5, "tokens_per_minute": 9}),
        ({"requests_per_minute": 5, "tokens_per_minute": 9}, ["--clear", "rpm"], {"tokens_per_minute": 9}),
        ({}, ["--model", "gpt-5*", "--tpm", "7"], {"models": {"gpt-5*": {"tokens_per_minute": 7}}}),
        ({"models": {"gpt-5*": {"tokens_per_minute": 7}}}, ["--model", "gpt-5*", "--clear", "tpm"], {}),
        ({"budget_usd": "3"}, ["--clear", "all"], {}),
        ({}, ["--budget-usd", "2.50", "--period", "week"], {"budget_usd": "2.50", "period": "week"}),
    ],
)
def test_cli_changes(current: dict[str, Any], argv: list[str], expected: dict[str, Any]) -> None:
    from extproc.cli import build_parser
    from extproc.limits_cli import apply_changes

    args = build_parser().parse_args(["limits", "set", "--tenant", "t", *argv])
    assert apply_changes(current, args).to_dict() == expected


# -- the embedded backend's budget spend ----------------------------------------------------------------


async def test_embedded_spend_is_the_ledger_before_start_plus_this_process(tmp_path: Any) -> None:
    """After a restart the in-memory aggregates start at zero: the spend of the period before this
    process started comes from the ledger (once), and what this process records is counted live, so
    nothing is counted twice even after it reaches the ledger too."""
    from datetime import timedelta

    from extproc.accounting.record import UsageRecord
    from extproc.accounting.sink import EmbeddedUsageSink
    from extproc.accounting.spool import Spool
    from extproc.ledger import SqliteLedger
    from extproc.limits.service import EmbeddedSpend
    from extproc.store.embedded import EmbeddedBackend

    ledger = SqliteLedger(tmp_path / "ledger.db")
    today = datetime.now(UTC).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)  # every record in today's period
    started = midnight + timedelta(seconds=40)
    now = started + timedelta(seconds=1)

    def rec(ts: datetime, cost: str, tokens: int, key: str = "key_a") -> UsageRecord:
        return UsageRecord(
            uuid.uuid4().hex, ts, tenant="acme", key_id=key, total_tokens=tokens, input_tokens=tokens, cost_usd=cost
        )

    earlier = [rec(started - timedelta(seconds=30), "0.25", 100), rec(started - timedelta(seconds=20), "0.5", 50, "k2")]
    await ledger.insert(earlier)
    sink = EmbeddedUsageSink(EmbeddedBackend(tmp_path / "state.db"), ledger, Spool(tmp_path / "spool", 2**24))
    await sink.start()
    spend = EmbeddedSpend(sink, ledger, started)
    tenant_rule = Rule("acme", "tenant", "", "", 0, budget_pusd=10**15)
    key_rule = Rule("acme", "key", "key_a", "", 0, budget_pusd=10**15)
    days = period_days("day", now.date())
    assert await spend(tenant_rule, "cost_pusd", days) == 750_000_000_000
    assert await spend(key_rule, "total_tokens", days) == 100
    live = rec(now, "1", 7)
    await sink.record(live)
    await sink.flush()  # now in the ledger too: still counted once
    assert await spend(tenant_rule, "cost_pusd", days) == 1_750_000_000_000
    assert await spend(key_rule, "total_tokens", days) == 107
    await sink.close()
    await ledger.close()


async def test_alert_webhook_is_retried_until_it_answers() -> None:
    from aiohttp import web

    from extproc.devstack import free_port
    from extproc.limits.alerts import AlertSender
    from extproc.limits.engine import Alert

    got: list[dict[str, Any]] = []
    attempts = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            return web.Response(status=503)
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sender = AlertSender(f"http://127.0.0.1:{port}/hook", backoff=0.01)
    await sender.start()
    rule = Rule("acme", "key", "key_1", "", 0, budget_pusd=2 * 10**12, alert_at=(0.8,))
    check = plan((rule,), 0, 0)[0]
    sender.emit(Alert(check, 0.8, 1_600_000_000_000, "2026-12"))
    await asyncio.wait_for(sender.drain(), 5)
    assert attempts == 3 and sender.counters.webhook_delivered == 1
    assert got == [
        {
            "type": "budget_alert",
            "ts": got[0]["ts"],
            "tenant": "acme",
            "scope": "key",
            "key_id": "key_1",
            "budget": "usd",
            "period": "month",
            "period_id": "2026-12",
            "threshold": 0.8,
            "limit": "2",
            "used": "1.6",
        }
    ]
    await sender.close()
    await runner.cleanup()


async def test_the_usage_record_takes_the_reservation_with_it(redis_url: str, tmp_path: Any) -> None:
    """On Redis a request's spend arrives in the aggregates budgets read and its reservation goes
    in one script: there is no moment at which it is counted twice (a refusal too early) or not
    at all (an overspend). The end of the response settles the rest and sends the alert its spend
    crossed; settle afterwards has nothing left to do."""
    from extproc.accounting.record import UsageRecord
    from extproc.accounting.sink import RedisUsageSink
    from extproc.accounting.spool import Spool

    backend = RedisBackend(redis_url, prefix=f"lim{uuid.uuid4().hex[:6]}:")
    sink = RedisUsageSink(backend, Spool(tmp_path / "spool", max_bytes=1 << 20), batch_window=0)
    await sink.start()
    try:
        h = Harness(RedisLimiter(backend, lease_seconds=30), "redis", backend)
        limiter = h.limiter
        assert isinstance(limiter, RedisLimiter)
        rule = h.rule(budget_pusd=10**12, alert_at=(0.5,))  # 1 USD
        first = h.demand((rule,), pusd=6 * 10**11)  # an estimate of 0.60 USD
        assert (await limiter.acquire(first)).allowed
        # It used 0.55 USD: the end of the response counts that (with the requests that ended before
        # it and whose records are not stored yet) and sends the 50% alert.
        crossed = await limiter.ended(first, 100, 55 * 10**10)
        assert [(a.threshold, a.used) for a in crossed] == [(0.5, 55 * 10**10)]
        probe = h.demand((rule,), pusd=1)
        v = await limiter.acquire(probe)
        assert v.allowed and v.budgets[0][1] == 55 * 10**10  # counted at its real cost
        await limiter.settle(probe, 0, 0)  # (the probe's own reservation)
        rec = UsageRecord(
            request_id=first.request_id,
            ts=datetime.now(UTC),
            tenant=h.tenant,
            model="m",
            input_tokens=50,
            output_tokens=50,
            total_tokens=100,
            cost_usd="0.55",
            status=200,
        )
        await sink.record(rec, limiter.release_keys(first))
        after = await limiter.acquire(h.demand((rule,), pusd=1))
        assert after.allowed and after.budgets[0][1] == 55 * 10**10  # once: the spend, no reservation
        # Settled at the end already: nothing left to do, no second alert.
        assert await limiter.settle(first, 100, 55 * 10**10) == []
        assert after.budgets[0][1] == 55 * 10**10
    finally:
        await sink.close()
        await backend.close()


async def test_period_totals_start_from_the_days_and_follow_the_records(redis_url: str, tmp_path: Any) -> None:
    """A weekly or monthly budget reads one period total instead of every day so far. The first
    check of the period starts it from the days (exactly, also above 2^53 pico-USD, and once when
    many checks race), usage records add to it from then on (never create it), and a total that
    vanished (evicted) is started again from the days, so it always equals their sum."""
    from extproc.accounting.record import UsageRecord
    from extproc.accounting.sink import RedisUsageSink
    from extproc.accounting.spool import Spool

    backend = RedisBackend(redis_url, prefix=f"lim{uuid.uuid4().hex[:6]}:")
    client = backend.client
    sink = RedisUsageSink(backend, Spool(tmp_path / "spool", max_bytes=1 << 20), batch_window=0)
    await sink.start()
    try:
        h = Harness(RedisLimiter(backend, lease_seconds=30), "redis", backend)
        limiter = h.limiter
        today = datetime.now(UTC).date()
        month = h.rule(budget_pusd=10**21, period="month")
        week = h.rule(owner="key_p", budget_tokens=10**15, period="week")
        month_key = aggregate_key(backend.prefix, h.tenant, period_id("month", today), "tenant")
        week_key = aggregate_key(backend.prefix, h.tenant, period_id("week", today), "key", "key_p")

        def record(cost_usd: str, tokens: int) -> UsageRecord:
            return UsageRecord(
                request_id=uuid.uuid4().hex,
                ts=datetime.now(UTC),
                tenant=h.tenant,
                key_id="key_p",
                model="m",
                input_tokens=tokens,
                total_tokens=tokens,
                cost_usd=cost_usd,
                status=200,
            )

        # Before any check, records count per day only: no total is created by a record.
        await sink.record(record("0.000001", 7))
        assert not await client.exists(month_key) and not await client.exists(week_key)
        # Earlier days of the period, large enough that a Lua double would round them.
        big = 2**60 + 3
        for day in period_days("month", today)[:-1]:
            await client.hincrby(aggregate_key(backend.prefix, h.tenant, day, "tenant"), "cost_pusd", big)
        for day in period_days("week", today)[:-1]:
            await client.hincrby(aggregate_key(backend.prefix, h.tenant, day, "key", "key_p"), "total_tokens", 1000)

        async def day_sum(key_kind: str, owner: str, field: str, period: Any) -> int:
            days = period_days(period, today)
            keys = [aggregate_key(backend.prefix, h.tenant, d, key_kind, owner) for d in days]
            return sum([int(await client.hget(k, field) or 0) for k in keys])

        async def check_totals() -> None:
            assert int(await client.hget(month_key, "cost_pusd") or -1) == await day_sum(
                "tenant", "", "cost_pusd", "month"
            )
            assert int(await client.hget(week_key, "total_tokens") or -1) == await day_sum(
                "key", "key_p", "total_tokens", "week"
            )

        # Many checks race to start the totals (as replicas would): each is started once.
        demands = [h.demand((month, week), tokens=1, pusd=1) for _ in range(10)]
        verdicts = await asyncio.gather(*(limiter.acquire(d) for d in demands))
        assert all(v.allowed for v in verdicts)
        await check_totals()
        assert await client.hget(month_key, "__init") == "1"
        ttl = await client.pttl(month_key)
        to_end = seconds_to_end("month", datetime.now(UTC))
        assert to_end * 1000 < ttl <= (to_end + 2 * 86400 + 1) * 1000  # outlives its period by two days
        for d in demands:
            await limiter.settle(d, 0, 0)
        # Records add to the totals now (spend and tokens).
        for _ in range(3):
            await sink.record(record("0.25", 40))
        await check_totals()
        v = await limiter.acquire(probe := h.demand((month, week), tokens=1, pusd=1))
        want = await day_sum("tenant", "", "cost_pusd", "month")
        assert v.allowed and v.budgets[0][1] == pytest.approx(want, rel=1e-12)
        assert v.budgets[1][1] == await day_sum("key", "key_p", "total_tokens", "week")
        await limiter.settle(probe, 0, 0)
        # Evicted: started again from the days on the next check.
        await client.delete(month_key, week_key)
        await sink.record(record("0.5", 5))  # lands while no total exists
        assert (await limiter.acquire(h.demand((month, week), tokens=1, pusd=1))).allowed
        await check_totals()
    finally:
        await sink.close()
        await backend.close()


@pytest.fixture
async def rh(redis_url: str) -> AsyncIterator[Harness]:
    backend = RedisBackend(redis_url, prefix=f"lim{uuid.uuid4().hex[:6]}:")
    yield Harness(RedisLimiter(backend, lease_seconds=0.3), "redis", backend)
    await backend.close()


async def test_alerts_at_the_end_count_ended_requests_not_estimates(rh: Harness) -> None:
    """Budget alerts are decided when a response ends, before its record is stored: the spend is the
    period's total plus what the requests that ended already really used. So two requests that end
    before either record lands still cross a threshold together (the second one sends it), and the
    estimate of a request still running never sends one."""
    h = rh
    budget = h.rule(budget_pusd=1000, alert_at=(0.5,))
    big = h.demand((budget,), pusd=450)  # still running: a large estimate
    a, b = h.demand((budget,), pusd=40), h.demand((budget,), pusd=40)
    for d in (big, a, b):
        assert (await h.limiter.acquire(d)).allowed
    assert await h.limiter.ended(a, 0, 260) == []  # 260 used: under 500, whatever `big` reserved
    crossed = await h.limiter.ended(b, 0, 260)
    assert [(x.threshold, x.used) for x in crossed] == [(0.5, 520)]
    # The records land (the spend arrives, the reservations go); settling sends nothing twice.
    await h.record_landed(a, budget, "cost_pusd", 260)
    await h.record_landed(b, budget, "cost_pusd", 520)
    assert await h.limiter.settle(a, 0, 260) == [] and await h.limiter.settle(b, 0, 260) == []
    assert h.backend is not None
    res = h.limiter.release_keys(a)[0]
    assert await h.backend.client.hget(res, "__real") == "0"
    assert await h.backend.client.hget(res, "__total") == "450"  # only `big`'s estimate is left
    await h.limiter.settle(big, 0, 0)


async def test_settle_after_the_end_with_other_figures_charges_the_difference(rh: Harness) -> None:
    """When the figures finish settles on differ from the ones the end of the response counted
    (the record changed them), settle charges the difference from those, not from the estimate."""
    h = rh
    rule = h.rule(tpm=1000, budget_pusd=10**6)
    d = h.demand((rule,), tokens=100, pusd=100)
    assert (await h.limiter.acquire(d)).allowed
    await h.limiter.ended(d, 60, 60)
    await h.limiter.settle(d, 80, 80)  # the record said 80
    v = await h.limiter.acquire(probe := h.demand((rule,), tokens=0, pusd=0))
    state = v.tightest("tokens")
    assert state is not None and 918 <= state.remaining <= 920  # 80 charged (plus a little refill)
    assert v.budgets[0][1] == 0  # no record in this test: its reservation is gone at settle
    await h.limiter.settle(probe, 0, 0)


async def test_an_ended_reservation_whose_record_never_came_expires(rh: Harness) -> None:
    """A request that ended but whose record was never stored (spooled, or the process died)
    counts at its real cost until its lease runs out, then not at all; the sums stay right."""
    h = rh
    budget = h.rule(budget_pusd=1000)
    d = h.demand((budget,), pusd=500)
    assert (await h.limiter.acquire(d)).allowed
    await h.limiter.ended(d, 0, 70)
    v = await h.limiter.acquire(probe := h.demand((budget,), pusd=1))
    assert v.budgets[0][1] == 70
    await h.limiter.settle(probe, 0, 0)
    await asyncio.sleep(0.4)  # the 0.3 s lease runs out (nothing refreshes it)
    v = await h.limiter.acquire(probe := h.demand((budget,), pusd=1))
    assert v.budgets[0][1] == 0
    await h.limiter.settle(probe, 0, 0)
    assert h.backend is not None
    res = h.limiter.release_keys(d)[0]
    assert await h.backend.client.hget(res, "__real") == "0" and await h.backend.client.hget(res, "__total") == "0"


async def test_finish_settles_when_the_end_call_was_cancelled() -> None:
    """The end-of-response call runs as a task; one cancelled (the server shutting down) must not
    stop finish from settling the request (its slot and estimate would wait for the lease)."""
    from extproc.accounting.pricing import PriceTable
    from extproc.pipeline import RequestContext
    from extproc.stages.limits import LimitsStage, _Held

    settled: list[tuple[str, int, int]] = []

    class Service:
        async def settle(self, demand: Demand, tokens: int, pusd: int) -> None:
            settled.append((demand.request_id, tokens, pusd))

    stage = LimitsStage(Service(), PriceTable({}))  # type: ignore[arg-type]
    ctx = RequestContext()
    demand = Demand("r1", "t", (), 7, 9)
    ending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ending.cancel()
    ctx.state[stage.name] = _Held(demand, {}, ending)
    await stage.finish(ctx)
    assert settled == [("r1", 7, 9)]  # no usage record: the estimate stays charged


def _deferred(limiter: Limiter) -> dict[str, Any]:
    assert isinstance(limiter, RedisLimiter)
    return limiter._deferred


async def test_rate_only_requests_settle_with_the_next_acquire(rh: Harness) -> None:
    """A request with only rate limits settles its token estimate without a call of its own: the
    tenant's next ACQUIRE applies the difference first, so that request already sees it (refunds
    and charges above the estimate alike), and exactly once."""
    h = rh
    rule = h.rule(tpm=1000, rpm=100)
    d = h.demand((rule,), tokens=1000)
    assert (await h.limiter.acquire(d)).allowed
    await h.limiter.ended(d, 100, 0)  # 900 come back, not yet in Redis
    assert list(_deferred(h.limiter)[h.tenant].values()) == [-900]
    assert await h.limiter.settle(d, 100, 0) == []  # finish: nothing left to settle
    nxt = h.demand((rule,), tokens=900)
    v = await h.limiter.acquire(nxt)
    assert v.allowed
    tokens = v.tightest("tokens")
    assert tokens is not None and tokens.remaining == 0
    assert _deferred(h.limiter) == {}
    # Above the estimate: the next request pays for it, once.
    over = h.demand((h.rule("k2", tpm=10_000),), tokens=100)
    assert (await h.limiter.acquire(over)).allowed
    await h.limiter.ended(over, 700, 0)
    v = await h.limiter.acquire(h.demand((h.rule("k2", tpm=10_000),), tokens=0))
    state = v.tightest("tokens")
    assert state is not None and 9299 <= state.remaining <= 9301
    v = await h.limiter.acquire(h.demand((h.rule("k2", tpm=10_000),), tokens=0))
    state = v.tightest("tokens")
    assert state is not None and 9299 <= state.remaining <= 9302  # not charged twice


async def test_deferred_settlements_go_out_alone_when_no_request_comes(rh: Harness) -> None:
    """No further request from the tenant: one call a few ms later settles them all; close()
    sends what is left at once."""
    h = rh
    limiter = h.limiter
    assert isinstance(limiter, RedisLimiter)
    rule = h.rule(tpm=1000)
    for _ in range(2):
        d = h.demand((rule,), tokens=500)
        assert (await limiter.acquire(d)).allowed
        await limiter.ended(d, 50, 0)
    # The second request's ACQUIRE carried the first's refund; the second's waits.
    assert list(_deferred(limiter)[h.tenant].values()) == [-450]
    await asyncio.sleep(0.1)  # DEFER_S (0.02) and the call
    assert _deferred(limiter) == {}
    [status] = await limiter.status(h.tenant, plan((rule,), 0, 0))
    assert 99 <= status.used <= 100  # 2 x 50 used
    d = h.demand((rule,), tokens=800)
    assert (await limiter.acquire(d)).allowed
    await limiter.ended(d, 0, 0)
    await limiter.close()
    assert _deferred(limiter) == {}
    [status] = await limiter.status(h.tenant, plan((rule,), 0, 0))
    assert 99 <= status.used <= 100


async def test_requests_with_budgets_or_concurrency_still_settle_at_the_end(rh: Harness) -> None:
    h = rh
    rule = h.rule(tpm=1000, concurrency=1)
    d = h.demand((rule,), tokens=1000)
    assert (await h.limiter.acquire(d)).allowed
    await h.limiter.ended(d, 100, 0)
    assert _deferred(h.limiter) == {}
    v = await h.limiter.acquire(h.demand((rule,), tokens=900))
    assert v.allowed  # the slot is free and the 900 are back


async def test_deferred_settlements_survive_a_failed_acquire_and_are_counted_when_lost() -> None:
    """Redis unreachable: an ACQUIRE that carried deferred settlements gives them back (the next
    call takes them); the timer's own call, failing too, drops them and counts it (the TAT keeps the
    estimate until it runs out: the conservative side)."""
    backend = RedisBackend("redis://127.0.0.1:1/0", timeout=0.2)
    limiter = RedisLimiter(backend)
    try:
        rule = Rule("acme", "tenant", "", "", 0, tpm=1000)
        limiter._defer_units("acme", {("k", "60000.0"): -5})
        d = Demand("r1", "acme", plan((rule,), 10, 0), 10)
        with pytest.raises(StoreUnavailable):
            await limiter.acquire(d)
        assert limiter._deferred == {"acme": {("k", "60000.0"): -5}}
        await asyncio.sleep(0.1)  # DEFER_S: the timer's call fails as well
        assert limiter._deferred == {} and limiter.deferred_dropped == 1
    finally:
        await limiter.close()
        await backend.close()
