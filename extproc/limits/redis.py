"""Limits shared by every replica, in Redis: one script call per request to acquire, one to settle
(a request with only rate limits has none of its own: its token estimate settles with its tenant's
next acquire, see RedisLimiter.ended).

Every key of a request's limits carries its tenant's hash tag (`{t:<tenant>}`, the same as the usage
records' and aggregates'), so one script can read a tenant's budget aggregates and update its limits
atomically, also on Redis Cluster. Layout (prefix `p`, tag `{t:T}`):

  p{t:T}:lim:<state scope>:requests      GCRA TAT (µs, decimal text), PX until it is back to full
  p{t:T}:lim:<state scope>:tokens        the same for tokens
  p{t:T}:lim:<state scope>:concurrency   sorted set: request id -> lease expiry (µs)
  p{t:T}:res:<scope>:<what>              hash: request id -> reserved amount; `__total` their sum
  p{t:T}:resx:<scope>:<what>             sorted set: request id -> lease expiry (µs)
  p{t:T}:alert:<scope>:<what>:<period>:<threshold>   "1" once an alert was sent (SET NX)

The state scope contains the reset epoch (`extproc limits reset` starts new counters under a new
name; the old ones expire), budgets' reservations and alerts do not (a reset keeps the spend history).
Budgets read the accounting aggregates (extproc.accounting.sink): a daily budget its day's
`p{t:T}:agg:<day>:tenant|key:<id>`, a weekly or monthly one the period total
`p{t:T}:agg:<2026-W49|2026-12>:tenant|key:<id>`, one field either way. The first check of a period that
finds no total starts it (START: the days so far, summed with HINCRBY so large sums stay exact, and
`__init`); usage records add to it from then on, in the same script that adds to the days, so it
stays equal to the sum of its days.

Lua numbers are doubles: times in µs (~1.8e15) and amounts in pico-USD are exact below 2^53 (~9,000
USD in one figure); above that a comparison may be off by a few pico-USD, which no budget notices.
Amounts are passed to HINCRBY as the decimal text the gateway wrote, never through a Lua number.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime
from typing import Any

from ..accounting.periods import period_days, period_id, seconds_to_end
from ..accounting.sink import DROP_RESERVATION_LUA, PERIOD_FIELDS, aggregate_key
from ..store.errors import StoreUnavailable
from ..store.redis import RedisBackend, tenant_tag
from ..store.resp import ReplyError
from .engine import WINDOW_US, Alert, Check, CheckStatus, Demand, Limiter, RateState, Verdict, remaining

log = logging.getLogger("extproc.limits")

# Moves a rate limit's TAT by `delta` µs (a refund when negative) if it exists, deleting it once it
# is back in the past; the key lives until its TAT, plus a second (as ACQUIRE sets it).
MOVE_TAT_LUA = """
local function move_tat(key, delta, now)
  local tat = redis.call('GET', key)
  if not tat then return end
  local new = tonumber(tat) + delta
  if new <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.17g', new), 'PX', math.ceil((new - now) / 1000) + 1000)
  end
end
"""

# KEYS, first one TAT key per deferred token settlement (see RedisLimiter.ended), then per check in
# order: rate: TAT key; concurrency: slot set; budget: reservations, their leases, the period's
# total (or its day's aggregate for a daily budget).
# ARGV: request id, lease (µs), per deferred settlement 'f', interval, units to add (negative: a
# refund; applied first, whatever the verdict), then per check: kind ('r' / 'c' / 'b') and its
# arguments:
#   r: interval (µs per unit), cost    c: limit    b: field, budget, amount, '1' when the total must
#   have been started (a week or a month) else '0'
# Every check is evaluated (so a refusal can still report the rate limits' state). Returns
# {1, 0, 0, 0, per check: x, y} when all passed and were charged, or {0, index of the first refusing
# check (1-based), wait µs (-1: never passes by waiting), used, per check: x, y} with nothing charged,
# or {-1, index of a budget check whose period total has not been started} with nothing charged.
# x, y per check: rate: units left and µs until full (after this request's charge when it passed);
# concurrency: slots held before this request, 0; budget: used before this request, 0.
ACQUIRE = (
    DROP_RESERVATION_LUA
    + MOVE_TAT_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid = ARGV[1]
local lease = tonumber(ARGV[2])
local window = 60000000
local a, k, i = 3, 1, 0
local plan = {}
local state = {}
local rates = {}
local failed, wait, fused = 0, 0, 0
local function refuse(w, u)
  if failed == 0 then failed, wait, fused = i, w, u end
end
while a <= #ARGV and ARGV[a] == 'f' do
  move_tat(KEYS[k], tonumber(ARGV[a + 1]) * tonumber(ARGV[a + 2]), now)
  k, a = k + 1, a + 3
end
while a <= #ARGV do
  i = i + 1
  local kind = ARGV[a]
  if kind == 'r' then
    local interval, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
    if tat < now then tat = now end
    local new = tat + cost * interval
    if cost * interval > window + 1 then
      refuse(-1, 0)
      new = tat
    elseif new - now > window + 1 then
      refuse(math.ceil(new - window - now), 0)
      new = tat
    else
      plan[#plan + 1] = {'r', KEYS[k], new}
    end
    rates[#rates + 1] = {#state + 1, tat, new, interval}
    state[#state + 1] = 0
    state[#state + 1] = 0
    k, a = k + 1, a + 3
  elseif kind == 'c' then
    local limit = tonumber(ARGV[a + 1])
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    local held = redis.call('ZCARD', KEYS[k])
    if held >= limit and not redis.call('ZSCORE', KEYS[k], rid) then
      refuse(1000000, held)
    else
      plan[#plan + 1] = {'c', KEYS[k]}
    end
    state[#state + 1] = held
    state[#state + 1] = 0
    k, a = k + 1, a + 2
  else
    local field, budget, amount = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
    local res, resx = KEYS[k], KEYS[k + 1]
    local spent = redis.call('HMGET', KEYS[k + 2], field, '__init')
    if ARGV[a + 4] == '1' and not spent[2] then
      return {-1, i}
    end
    local stale = redis.call('ZRANGEBYSCORE', resx, '-inf', now)
    for _, r in ipairs(stale) do
      if not drop_reservation(res, resx, r) then redis.call('ZREM', resx, r) end
    end
    local used = tonumber(redis.call('HGET', res, '__total') or '0') + tonumber(spent[1] or '0')
    if used >= budget then
      refuse(-1, used)
    else
      plan[#plan + 1] = {'b', res, resx, amount}
    end
    state[#state + 1] = used
    state[#state + 1] = 0
    k, a = k + 3, a + 5
  end
end
-- Rate limits as they stand when nothing is charged, after the charge otherwise.
for _, r in ipairs(rates) do
  local at = r[3]
  if failed > 0 then at = r[2] end
  state[r[1]] = math.min(math.floor((window - (at - now) + 1) / r[4]), math.floor(window / r[4] + 0.5))
  state[r[1] + 1] = math.ceil(at - now)
end
if failed > 0 then
  local out = {0, failed, wait, fused}
  for _, v in ipairs(state) do out[#out + 1] = v end
  return out
end
local until_ = now + lease
for _, p in ipairs(plan) do
  if p[1] == 'r' then
    redis.call('SET', p[2], string.format('%.17g', p[3]), 'PX', math.ceil((p[3] - now) / 1000) + 1000)
  elseif p[1] == 'c' then
    redis.call('ZADD', p[2], until_, rid)
    redis.call('PEXPIRE', p[2], math.ceil(lease / 500))
  else
    if redis.call('HSETNX', p[2], rid, p[4]) == 1 and p[4] ~= '0' then
      redis.call('HINCRBY', p[2], '__total', p[4])
    end
    redis.call('ZADD', p[3], until_, rid)
    redis.call('PEXPIRE', p[2], math.ceil(lease / 500))
    redis.call('PEXPIRE', p[3], math.ceil(lease / 500))
  end
end
local out = {1, 0, 0, 0}
for _, v in ipairs(state) do out[#out + 1] = v end
return out
"""
)

# The end of a request. KEYS, per check: rate (tokens only): TAT key; concurrency: slot set; budget:
# reservations, leases, the period's total (as for ACQUIRE), then one alert key per threshold.
# ARGV: request id, mode, then per check: kind and its arguments:
#   r: interval, units to add (negative: a refund)     c: (none)
#   b: amount used, field, budget, '1' / '0' (as for ACQUIRE), alert TTL (ms), thresholds count,
#      thresholds...
# Mode 'end' (the response is complete, its usage record not stored yet): the reservation becomes
# "=<amount used>" (counted at its real cost until the record, which drops it, is in the aggregates).
# Mode 'settle': the reservation is dropped (the record is stored, or there is none).
# A budget's spend for its alerts is the period's total plus the amounts of the requests that ended
# and whose records are not in it yet: every ended request is counted once, so the last one to end
# sees the sum. Returns the alerts sent: {check index, threshold index, used, ...}. A period total not
# started (the period began since this request's check) sends no alert now: the next request does.
SETTLE = (
    DROP_RESERVATION_LUA
    + MOVE_TAT_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid = ARGV[1]
local ending = ARGV[2] == 'end'
local a, k, i = 3, 1, 0
local out = {}
while a <= #ARGV do
  i = i + 1
  local kind = ARGV[a]
  if kind == 'r' then
    move_tat(KEYS[k], tonumber(ARGV[a + 1]) * tonumber(ARGV[a + 2]), now)
    k, a = k + 1, a + 3
  elseif kind == 'c' then
    redis.call('ZREM', KEYS[k], rid)
    k, a = k + 1, a + 1
  else
    local real, field, budget, started = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), ARGV[a + 4]
    local ttl, n = ARGV[a + 5], tonumber(ARGV[a + 6])
    local res, resx = KEYS[k], KEYS[k + 1]
    -- The sum of the ended requests' real amounts, when this call changed it (HINCRBY answers it).
    local ended_sum = nil
    if ending then
      local amt = redis.call('HGET', res, rid)
      -- Gone already (its lease ran out): it stays gone.
      if amt and string.byte(amt, 1) ~= 61 then
        redis.call('HSET', res, rid, '=' .. real)
        if amt ~= '0' then redis.call('HINCRBY', res, '__total', '-' .. amt) end
        if real ~= '0' then
          redis.call('HINCRBY', res, '__total', real)
          ended_sum = redis.call('HINCRBY', res, '__real', real)
        end
      end
    else
      drop_reservation(res, resx, rid)
    end
    local spent = redis.call('HMGET', KEYS[k + 2], field, '__init')
    if started == '0' or spent[2] then
      local used = tonumber(spent[1] or '0') + tonumber(ended_sum or redis.call('HGET', res, '__real') or '0')
      for j = 1, n do
        if used >= tonumber(ARGV[a + 6 + j]) * budget then
          if redis.call('SET', KEYS[k + 2 + j], '1', 'NX', 'PX', ttl) then
            out[#out + 1] = i
            out[#out + 1] = j
            out[#out + 1] = used
          end
        end
      end
    end
    k, a = k + 3 + n, a + 7 + n
  end
end
return out
"""
)

# Starts a period total. KEYS: the total, then the aggregate of each day of the period so far.
# ARGV: TTL (ms), then the fields (PERIOD_FIELDS). Nothing when it exists (another replica started
# it first: records have been adding to it since).
START = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
for f = 2, #ARGV do
  redis.call('HINCRBY', KEYS[1], ARGV[f], 0)
  for d = 2, #KEYS do
    local v = redis.call('HGET', KEYS[d], ARGV[f])
    if v then redis.call('HINCRBY', KEYS[1], ARGV[f], v) end
  end
end
redis.call('HSET', KEYS[1], '__init', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# An alert marker outlives its period by this much (clock skew between replicas at the boundary).
_ALERT_SLACK_DAYS = 2
# How long a deferred token settlement waits for its tenant's next ACQUIRE (RedisLimiter.ended).
DEFER_S = 0.02


class RedisLimiter(Limiter):
    def __init__(self, backend: RedisBackend, lease_seconds: float = 30.0) -> None:
        self.backend = backend
        self.client = backend.client
        self.prefix = backend.prefix
        self.lease_us = int(lease_seconds * 1e6)
        # Arguments go to Redis as text; hiredis converts numbers slower than str() once.
        self._lease = str(self.lease_us)
        self._parts: dict[tuple[Any, ...], tuple[list[str], list[Any]]] = {}
        # Token settlements of requests that ended and held only rate limits, not in Redis yet, per
        # tenant: (TAT key, interval text) -> units to add. See `ended`.
        self._deferred: dict[str, dict[tuple[str, str], int]] = {}
        self._flush_timers: dict[str, asyncio.TimerHandle] = {}
        self._flushing: set[asyncio.Task[None]] = set()
        # Deferred settlements Redis could not take (an outage): the TAT keeps the estimate until it
        # runs out (at most a minute), the conservative side.
        self.deferred_dropped = 0

    def _base(self, tenant: str) -> str:
        return f"{self.prefix}{tenant_tag(tenant)}:"

    def _state_key(self, tenant: str, c: Check) -> str:
        return f"{self._base(tenant)}lim:{c.rule.state_scope}:{c.what}"

    def _res_keys(self, tenant: str, c: Check) -> tuple[str, str]:
        base = self._base(tenant)
        return f"{base}res:{c.rule.scope}:{c.what}", f"{base}resx:{c.rule.scope}:{c.what}"

    def _day_keys(self, tenant: str, c: Check, days: list[str]) -> list[str]:
        kind = c.rule.kind
        return [aggregate_key(self.prefix, tenant, day, kind, c.rule.owner) for day in days]

    def _total_key(self, tenant: str, c: Check, day: date) -> str:
        """The period total a budget reads: for a daily budget its day's aggregate itself."""
        return aggregate_key(self.prefix, tenant, period_id(c.rule.period, day), c.rule.kind, c.rule.owner)

    async def _start_total(self, tenant: str, c: Check, day: date) -> None:
        period = c.rule.period
        ttl_ms = int((seconds_to_end(period, datetime.now(UTC)) + _ALERT_SLACK_DAYS * 86400) * 1000)
        keys = [self._total_key(tenant, c, day), *self._day_keys(tenant, c, period_days(period, day))]
        await self._run(START, keys, [ttl_ms, *PERIOD_FIELDS])

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.backend.script(script, keys, args)
        except ReplyError as err:
            # A reply, not an outage: a bug in the script or a key of the wrong type. Fail safe.
            raise StoreUnavailable(f"redis refused the limits script: {str(err)[:200]}") from None

    def _acquire_parts(self, tenant: str, c: Check, day: date) -> tuple[list[str], list[Any]]:
        """The keys and the fixed arguments of one check (cached: the same for every request of the
        scope on a day; building key names was a third of the limiter's CPU)."""
        ck = ("a", tenant, c.rule, c.what, day)
        parts = self._parts.get(ck)
        if parts is None:
            if c.kind == "rate":
                parts = ([self._state_key(tenant, c)], ["r", repr(c.interval)])
            elif c.kind == "concurrency":
                parts = ([self._state_key(tenant, c)], ["c", str(c.limit)])
            else:
                keys = [*self._res_keys(tenant, c), self._total_key(tenant, c, day)]
                parts = (keys, ["b", c.field, str(c.limit)])
            self._remember(ck, parts)
        return parts

    def _remember(self, key: tuple[Any, ...], parts: tuple[list[str], list[Any]]) -> None:
        if len(self._parts) >= 10_000:
            self._parts.clear()
        self._parts[key] = parts

    async def acquire(self, demand: Demand) -> Verdict:
        keys: list[str] = []
        args: list[Any] = [demand.request_id, self._lease]
        day = datetime.now(UTC).date()
        for c in demand.checks:
            ck, ca = self._acquire_parts(demand.tenant, c, day)
            keys += ck
            if c.kind == "rate":
                args += [*ca, c.cost]
            elif c.kind == "concurrency":
                args += ca
            else:
                args += [*ca, c.cost, _started(c)]
        deferred = self._deferred.pop(demand.tenant, None)
        if deferred:
            # Applied first by the same script (same tenant: same hash slot).
            fkeys, fargs = _rate_entries(deferred, "f")
            try:
                res = await self._run(ACQUIRE, [*fkeys, *keys], [*args[:2], *fargs, *args[2:]])
            except StoreUnavailable:
                self._defer_units(demand.tenant, deferred)
                raise
        else:
            res = await self._run(ACQUIRE, keys, args)
        starts = 0
        while int(res[0]) == -1:
            # The first check of a week or a month (here or on any replica): start its total.
            starts += 1
            if starts > len(demand.checks):
                # Started once per check and gone again each time (evicted?): the budget cannot be
                # counted. Fail safe, like an outage.
                raise StoreUnavailable("redis: a budget's period total keeps disappearing")
            await self._start_total(demand.tenant, demand.checks[int(res[1]) - 1], day)
            res = await self._run(ACQUIRE, keys, args)
        allowed = int(res[0]) == 1
        verdict = Verdict(allowed)
        for i, c in enumerate(demand.checks):
            x, y = int(res[4 + 2 * i]), int(res[5 + 2 * i])
            if c.kind == "rate":
                verdict.rates.append(RateState(c, x, y / 1e6))
            elif c.kind == "budget" and allowed:
                verdict.budgets.append((c, x))
        if allowed:
            demand.holder = self
            return verdict
        c = verdict.refused_by = demand.checks[int(res[1]) - 1]
        wait = int(res[2])
        verdict.used = int(res[3])
        if c.kind == "rate":
            verdict.never = wait < 0
            verdict.retry_after = None if wait < 0 else wait / 1e6
        elif c.kind == "concurrency":
            verdict.retry_after = 1.0
        return verdict

    def release_keys(self, demand: Demand) -> tuple[str, ...]:
        out: list[str] = []
        for c in demand.checks:
            if c.kind == "budget":
                out += self._res_keys(demand.tenant, c)
        return tuple(out)

    async def ended(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        """Everything `settle` does but dropping the budget reservations: the usage record drops
        them when its spend is in the aggregates. A settle with the same figures has nothing left.

        A request that held only rate limits has nothing left to settle but its token estimate, and
        that costs no script call of its own: the difference is kept here and applied by the same
        tenant's next ACQUIRE, before that request's checks (so this process's next request sees it
        exactly), or DEFER_S later by one call for all of the tenant's when no request came. Under
        load that saves a script call per request (the limit check stays one round trip). Another
        replica may see the estimate for those ms: a refund arrives late, never early, and a
        charge above the estimate (rare: the output is bounded by max_tokens) at most DEFER_S late."""
        alerts = await self._settle(demand, tokens, pusd, "end")
        demand.ended = (tokens, pusd)
        return alerts

    def _defer_units(self, tenant: str, units: dict[tuple[str, str], int]) -> None:
        pending = self._deferred.setdefault(tenant, {})
        for part, n in units.items():
            pending[part] = pending.get(part, 0) + n
        if tenant not in self._flush_timers:
            loop = asyncio.get_running_loop()
            self._flush_timers[tenant] = loop.call_later(DEFER_S, self._flush_later, tenant)

    def _flush_later(self, tenant: str) -> None:
        self._flush_timers.pop(tenant, None)
        if tenant in self._deferred:
            task = asyncio.ensure_future(self._flush_deferred(tenant))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _flush_deferred(self, tenant: str) -> None:
        pending = self._deferred.pop(tenant, None)
        if not pending:
            return
        keys, args = _rate_entries(pending, "r")
        try:
            await self._run(SETTLE, keys, ["", "end", *args])
        except StoreUnavailable as err:
            self.deferred_dropped += len(keys)
            log.debug("limits: %d deferred token settlements dropped (%s)", len(keys), err)

    async def close(self) -> None:
        """What is still deferred goes to Redis now (shutdown)."""
        for timer in self._flush_timers.values():
            timer.cancel()
        self._flush_timers.clear()
        if self._flushing:
            await asyncio.wait(self._flushing)
        for tenant in list(self._deferred):
            await self._flush_deferred(tenant)

    async def settle(self, demand: Demand, tokens: int, pusd: int) -> list[Alert]:
        if demand.ended == (tokens, pusd):
            return []
        return await self._settle(demand, tokens, pusd, "settle")

    async def _settle(self, demand: Demand, tokens: int, pusd: int, mode: str) -> list[Alert]:
        keys: list[str] = []
        args: list[Any] = [demand.request_id, mode]
        day = datetime.now(UTC).date()
        # Tokens charged so far: the estimate, or what the end of the response counted.
        charged = demand.ended[0] if demand.ended is not None else None
        # The checks passed to the script, in its numbering (a request slot needs no settling).
        passed: list[Check] = []
        # The end of a request that held only rate limits calls nothing: its token differences wait
        # for the tenant's next ACQUIRE (see `ended`).
        deferred: dict[tuple[str, str], int] | None = (
            {} if mode == "end" and all(c.kind == "rate" for c in demand.checks) else None
        )
        for c in demand.checks:
            if c.what == "tokens":
                before = c.cost if charged is None else charged
                if tokens == before:
                    continue
                ck, ca = self._acquire_parts(demand.tenant, c, day)
                if deferred is not None:
                    part = (ck[0], ca[1])
                    deferred[part] = deferred.get(part, 0) + tokens - before
                    continue
                keys += ck
                args += [*ca, tokens - before]
            elif c.kind == "concurrency":
                keys.append(self._acquire_parts(demand.tenant, c, day)[0][0])
                args.append("c")
            elif c.kind == "budget":
                ck, ca = self._settle_parts(demand.tenant, c, day)
                keys += ck
                args += ["b", pusd if c.what == "budget_usd" else tokens, *ca]
            else:
                continue
            passed.append(c)
        if deferred:
            self._defer_units(demand.tenant, deferred)
        if not passed:
            return []
        res = await self._run(SETTLE, keys, args)
        alerts: list[Alert] = []
        for j in range(0, len(res), 3):
            c = passed[int(res[j]) - 1]
            threshold = c.rule.alert_at[int(res[j + 1]) - 1]
            alerts.append(Alert(c, threshold, int(res[j + 2]), period_id(c.rule.period, day)))
        return alerts

    def _settle_parts(self, tenant: str, c: Check, day: date) -> tuple[list[str], list[Any]]:
        ck = ("s", tenant, c.rule, c.what, day)
        parts = self._parts.get(ck)
        if parts is None:
            pid = period_id(c.rule.period, day)
            thresholds = c.rule.alert_at
            base = self._base(tenant)
            keys = [
                *self._res_keys(tenant, c),
                self._total_key(tenant, c, day),
                *(f"{base}alert:{c.rule.scope}:{c.what}:{pid}:{t:g}" for t in thresholds),
            ]
            # Until the period ends (computed once a day per scope: at most a day longer than needed).
            ttl_ms = int((seconds_to_end(c.rule.period, datetime.now(UTC)) + (_ALERT_SLACK_DAYS + 1) * 86400) * 1000)
            args = [c.field, str(c.limit), _started(c), str(ttl_ms), str(len(thresholds))]
            args += [repr(t) for t in thresholds]
            parts = (keys, args)
            self._remember(ck, parts)
        return parts

    async def refresh(self, demands: list[Demand]) -> None:
        """ZADD XX: only the members still there (a lease that ran out stays gone)."""
        if not demands:
            return
        pipe = self.client.pipeline(transaction=False)
        t = await self.backend.call(self.client.time())
        until = int(t[0]) * 1_000_000 + int(t[1]) + self.lease_us
        ttl_ms = self.lease_us // 500  # the sets themselves live two leases past their last touch
        for d in demands:
            for c in d.checks:
                if c.kind == "concurrency":
                    names = [self._state_key(d.tenant, c)]
                elif c.kind == "budget":
                    res, resx = self._res_keys(d.tenant, c)
                    names = [resx]
                    pipe.pexpire(res, ttl_ms)
                else:
                    continue
                pipe.zadd(names[0], {d.request_id: until}, xx=True)
                pipe.pexpire(names[0], ttl_ms)
        await self.backend.call(pipe.execute())

    async def status(self, tenant: str, checks: tuple[Check, ...]) -> list[CheckStatus]:
        """Read-only figures for `extproc limits show` (the same arithmetic as the scripts)."""
        t = await self.backend.call(self.client.time())
        now = int(t[0]) * 1_000_000 + int(t[1])
        day = datetime.now(UTC).date()
        out: list[CheckStatus] = []
        for c in checks:
            if c.kind == "rate":
                raw = await self.backend.call(self.client.get(self._state_key(tenant, c)))
                tat = float(raw) if raw else 0.0
                left = remaining(tat, now, WINDOW_US / c.limit)
                out.append(CheckStatus(c, c.limit - left, left, max(0.0, tat - now) / 1e6))
            elif c.kind == "concurrency":
                n = int(await self.backend.call(self.client.zcount(self._state_key(tenant, c), f"({now}", "+inf")))
                out.append(CheckStatus(c, n, max(0, c.limit - n), 0.0))
            else:
                res, _ = self._res_keys(tenant, c)
                used = int(await self.backend.call(self.client.hget(res, "__total")) or 0)
                for key in self._day_keys(tenant, c, period_days(c.rule.period, day)):
                    used += int(await self.backend.call(self.client.hget(key, c.field)) or 0)
                end = seconds_to_end(c.rule.period, datetime.now(UTC))
                out.append(CheckStatus(c, used, max(0, c.limit - used), end))
        return out


def _rate_entries(pending: dict[tuple[str, str], int], kind: str) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of token differences for a script: per TAT key `kind`, interval, units."""
    keys: list[str] = []
    args: list[Any] = []
    for (key, interval), units in pending.items():
        keys.append(key)
        args += [kind, interval, units]
    return keys, args


def _started(c: Check) -> str:
    """'1' when the budget reads a period total that must have been started (a week or a month)."""
    return "0" if c.rule.period == "day" else "1"
