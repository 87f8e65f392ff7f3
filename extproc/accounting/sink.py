"""Where every usage record goes when its request finishes: durably, once, and cheaply.

Money path rules: a served request is billed exactly once. So `record` never raises and never
loses a record it could keep: whatever cannot reach the store right now goes to the local spool
(fsync'd) and is replayed later. Replays can repeat (a crash between applying a segment and
deleting it), so every write is idempotent by request_id.

Redis layout (prefix `p`, `gw:` by default; tag `{t:<tenant>}`, `_` for the empty tenant, so one
record's keys share a Cluster slot and the script can touch them all):
  p{t:T}:usage:seen:<request_id>       "1", EX 7 days      idempotency: replays within 7 days count once
  p{t:T}:usage                         stream, field data=<record JSON>; the LedgerConsumer XACKs and
                                       XDELs entries once the ledger has them (no trimming by default)
  p{t:T}:agg:<YYYY-MM-DD>:tenant       hash of counters (AGG_FIELDS), UTC day of the record's ts,
  p{t:T}:agg:<YYYY-MM-DD>:key:<key_id> EXPIRE 400 days after the last increment
  p{t:T}:agg:<YYYY-MM-DD>:model:<model>
  p{t:T}:agg:<period>:tenant           the same counters' PERIOD_FIELDS summed over a week ("2026-W49") or
  p{t:T}:agg:<period>:key:<key_id>     a month ("2026-12"), so a budget reads one field, not a field of
                                       every day so far. Only once a budget check started one (from the
                                       days, extproc.limits.redis; marked by field `__init`): a record adds
                                       to a total that exists, never creates one; it expires after its period.
  p usage:streams                      set of every tenant stream name (the consumer reads it)
  p usage:dead                         stream of entries the consumer could not parse

What happens when something fails:
  Redis unreachable or slow (StoreUnavailable)  the record is appended to the spool; further records
      go straight to the spool (no timeout each) until a ping answers; then the spool is replayed
      through the same script (seen keys make a repeat a no-op) and segments are deleted after.
  Redis answers with an error for a record      spooled and retried like an outage; replay stops
      (OOM, WRONGTYPE)                          at that segment and retries with backoff, logged.
  spool full / disk error                       the record is dropped, counted (spool_full_drops,
                                                spool_write_errors), an error line once a minute.
  process SIGKILLed                             what `record` returned for is in Redis or fsync'd
                                                in a segment; the next process (or a sibling
                                                worker's periodic pass) replays that segment.
A seen key lives 7 days: a segment replayed later than that would be counted again.

Counters are integers: `cost_pusd` is cost_usd in pico-USD (10^-12 USD), computed with Decimal;
a cost with more than 12 decimals is rounded half-even to the pico-USD (sub-pico amounts cannot be
billed anyway and half-even does not drift in aggregate). A hash field is a signed 64-bit integer:
about 9.2 million USD per tenant per day.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any, Literal, Protocol

from ..store.embedded import EmbeddedBackend
from ..store.errors import StoreUnavailable
from ..store.redis import RedisBackend, tenant_tag
from ..store.resp import ReplyError
from ..throttle import LogThrottle
from .periods import period_id
from .record import TOKEN_FIELDS, UsageRecord
from .spool import Spool, chunks, record_json

log = logging.getLogger("extproc.accounting.sink")

AGG_FIELDS: tuple[str, ...] = (
    "requests",
    *TOKEN_FIELDS,
    "cost_pusd",
    "unpriced_requests",
    "estimated_requests",
    "errors",
)
Scope = Literal["tenant", "key", "model"]
# The counters budgets read (extproc.limits), also kept per week and month (see the module docstring).
PERIOD_FIELDS: tuple[str, ...] = ("cost_pusd", "total_tokens")
AggregateRow = tuple[str, str, str, str, Mapping[str, int]]

PUSD_PER_USD = 10**12
SEEN_TTL_SECONDS = 7 * 24 * 3600
AGG_TTL_SECONDS = 400 * 24 * 3600
_MONEY = Context(prec=60)
_PUSD = Decimal(PUSD_PER_USD)


class LedgerWriter(Protocol):
    """What the sinks and the consumer need from extproc.ledger.Ledger: an insert that is
    idempotent by request_id (ON CONFLICT DO NOTHING) in one transaction, returning how many rows
    were new, and raising (LedgerUnavailable) when the database cannot take them."""

    async def insert(self, records: Sequence[UsageRecord]) -> int: ...


async def insert_setting_aside(
    ledger: LedgerWriter, records: Sequence[UsageRecord]
) -> tuple[int, list[tuple[int, ValueError]]]:
    """Insert, and when the ledger refuses the batch as invalid (InvalidRecord, a ValueError
    raised before anything is written) bisect it to find the records no ledger can store, so one
    bad record cannot block every record behind it forever. Returns (new rows, [(index, error)]).
    Other errors (LedgerUnavailable) propagate: the caller retries the whole batch, which is
    idempotent even if some halves were committed."""

    async def go(lo: int, hi: int) -> tuple[int, list[tuple[int, ValueError]]]:
        try:
            return await ledger.insert(records[lo:hi]), []
        except ValueError as err:
            if hi - lo == 1:
                return 0, [(lo, err)]
            mid = (lo + hi) // 2
            n1, bad1 = await go(lo, mid)
            n2, bad2 = await go(mid, hi)
            return n1 + n2, bad1 + bad2

    if not records:
        return 0, []
    return await go(0, len(records))


def cost_pusd(cost_usd: str | None) -> int | None:
    """Exact integer pico-USD; None for an unpriced record (and for a cost that is not a finite
    decimal, which is logged: it still reaches the ledger as written)."""
    if cost_usd is None:
        return None
    try:
        d = Decimal(cost_usd)
    except InvalidOperation:
        log.error("usage record with a cost that is not a decimal (%r): counted as unpriced", cost_usd[:40])
        return None
    if not d.is_finite():
        log.error("usage record with a cost that is not finite (%r): counted as unpriced", cost_usd[:40])
        return None
    return int(_MONEY.multiply(d, _PUSD).to_integral_value(rounding=ROUND_HALF_EVEN))


def pusd_to_usd(pusd: int) -> str:
    """Plain decimal text, no exponent, no trailing zeros ("0.00042", "12", "0")."""
    d = _MONEY.divide(Decimal(pusd), _PUSD)
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def increments(rec: UsageRecord) -> dict[str, int]:
    """The counters one record adds, non-zero ones only (the readers default missing fields to 0).
    `errors` counts a record with an error_code or an HTTP status of 400 and up."""
    inc: dict[str, int] = {"requests": 1}
    if rec.cache_hit and not rec.cache_counted:
        # Answered from the cache: no tokens and no cost reached a provider, so budgets and
        # token figures do not count them (the record keeps the original tokens).
        return inc
    for name in TOKEN_FIELDS:
        v = int(getattr(rec, name) or 0)
        if v:
            inc[name] = v
    pusd = cost_pusd(rec.cost_usd)
    if pusd is None:
        inc["unpriced_requests"] = 1
    elif pusd:
        inc["cost_pusd"] = pusd
    if rec.estimated:
        inc["estimated_requests"] = 1
    if rec.error_code is not None or rec.status >= 400:
        inc["errors"] = 1
    return inc


def utc_day(day: datetime | date | str) -> str:
    """ "YYYY-MM-DD" of a timestamp (in UTC), a date, or such a string as given."""
    if isinstance(day, str):
        return day
    if isinstance(day, datetime):
        return _day(day)
    return day.isoformat()


def _day(ts: datetime) -> str:
    return (ts.astimezone(UTC) if ts.tzinfo is not None else ts).date().isoformat()


def aggregate_key(prefix: str, tenant: str, day: str | date, scope: Scope | str, id: str = "") -> str:
    """The Redis hash of one (tenant, UTC day, scope, id) aggregate, or with a period id for `day`
    ("2026-W49", "2026-12") of its period total; `id` is ignored for "tenant". Budgets
    (extproc.limits) read these keys in their own scripts."""
    key = f"{prefix}{tenant_tag(tenant)}:agg:{utc_day(day)}:{scope}"
    return key if scope == "tenant" else f"{key}:{id or '_'}"


@functools.lru_cache(maxsize=64)
def periods_of(day: str) -> tuple[str, str]:
    d = date.fromisoformat(day)
    return period_id("week", d), period_id("month", d)


def scope_ids(rec: UsageRecord) -> tuple[tuple[Scope, str], ...]:
    return (("tenant", ""), ("key", rec.key_id or "_"), ("model", rec.model or "_"))


def shape_aggregates(raw: Mapping[str, Any]) -> dict[str, int | str]:
    """Every AGG_FIELDS counter (0 when absent) plus `cost_usd`, the exact decimal of cost_pusd."""
    out: dict[str, int | str] = {name: int(raw.get(name) or 0) for name in AGG_FIELDS}
    out["cost_usd"] = pusd_to_usd(int(out["cost_pusd"]))
    return out


@dataclass
class SinkCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    recorded: int = 0
    # Accepted by the store for the first time (Redis script returned 1 / new ledger rows).
    written: int = 0
    # Seen before (a replay of a record already stored): counted nowhere twice.
    duplicates: int = 0
    spooled: int = 0
    replayed: int = 0
    # Records neither stored nor spooled because of a bug (logged with a traceback).
    failed: int = 0
    # Records the ledger refused as invalid (embedded): kept in the spool directory's dead file.
    refused: int = 0


class UsageSink(ABC):
    """One per server process, started with the server and closed (flushed) at shutdown."""

    spool: Spool

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.counters = SinkCounters()

    async def start(self) -> None:
        await self.spool.start()

    @abstractmethod
    async def record(self, rec: UsageRecord, release: Sequence[str] = (), payload: bytes | None = None) -> None:
        """Called from a request's finish hook under asyncio.shield. Never raises. `release`: the
        request's budget reservations (Redis keys from the limiter) to drop in the same step as the
        record's spend is counted; a backend without them ignores it. `payload`: record_json(rec),
        when the caller has it already (the usage log line is the same JSON)."""

    @abstractmethod
    async def aggregates(self, tenant: str, day: str | date, scope: Scope, id: str = "") -> dict[str, int | str]:
        """Counters of one (tenant, UTC day, scope, id); `id` is ignored for scope "tenant"."""

    async def close(self) -> None:
        await self.spool.close()

    async def _append_to_spool(self, recs: Iterable[UsageRecord]) -> int:
        """Append records to the spool together (its writer fsyncs them in one go) and count them;
        how many it kept. A record it could not keep was counted and logged by the spool."""
        results = await asyncio.gather(*(self.spool.append(r) for r in recs), return_exceptions=True)
        kept = sum(ok is True for ok in results)
        self.counters.spooled += kept
        self.counters.failed += sum(isinstance(ok, BaseException) for ok in results)
        return kept

    def metrics(self) -> dict[str, int]:
        c = self.spool.counters
        return {
            **asdict(self.counters),
            "spool_bytes": self.spool.size_bytes,
            "spool_full_drops": c.dropped_full,
            "spool_write_errors": c.write_errors,
            "spool_corrupt_lines": c.corrupt_lines + c.unparsable_lines,
        }


# A budget reservation of extproc.limits.redis goes away (Lua, prepended to the scripts that drop
# one; here because the usage record drops it too). A reservation hash maps request id -> amount:
# the estimate while the request runs, "=<amount>" once its response ended (what it really used);
# `__total` sums every amount, `__real` the ended ones. Returns whether it was there.
DROP_RESERVATION_LUA = """
local function drop_reservation(res, resx, rid)
  local amt = redis.call('HGET', res, rid)
  if not amt then return false end
  redis.call('HDEL', res, rid)
  redis.call('ZREM', resx, rid)
  if string.byte(amt, 1) == 61 then
    amt = string.sub(amt, 2)
    if amt ~= '0' then redis.call('HINCRBY', res, '__real', '-' .. amt) end
  end
  if amt ~= '0' then redis.call('HINCRBY', res, '__total', '-' .. amt) end
  return true
end
"""

# Seconds between re-registrations of a stream in `usage:streams` by one process.
STREAM_REFRESH = 30.0

# One record, atomically. KEYS: seen, stream, the daily aggregate hashes, the period totals (week and
# month of the tenant and of the key), then `release` (pairs of a budget's reservations hash and lease
# set, see extproc.limits.redis). ARGV: seen TTL, aggregate TTL, stream MAXLEN (0 = never trim),
# record JSON, request id, the number of release keys, the number of period totals, the increments of
# PERIOD_FIELDS in their order, then field/increment pairs. SET NX answers nil (Lua false) when the
# key exists: the record was applied before. The request's budget reservations go in the same step as
# its spend arrives in the aggregates budgets read: it is never counted twice, nor not at all.
RECORD_SCRIPT = (
    DROP_RESERVATION_LUA
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
if ARGV[3] == '0' then
  redis.call('XADD', KEYS[2], '*', 'data', ARGV[4])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[4])
end
local rel = tonumber(ARGV[6])
local last = #KEYS - rel - tonumber(ARGV[7])
for k = 3, last do
  for i = 10, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
if ARGV[8] ~= '0' or ARGV[9] ~= '0' then
  for k = last + 1, #KEYS - rel do
    if redis.call('EXISTS', KEYS[k]) == 1 then
      if ARGV[8] ~= '0' then redis.call('HINCRBY', KEYS[k], 'cost_pusd', ARGV[8]) end
      if ARGV[9] ~= '0' then redis.call('HINCRBY', KEYS[k], 'total_tokens', ARGV[9]) end
    end
  end
end
local rid = ARGV[5]
for r = #KEYS - rel + 1, #KEYS, 2 do
  drop_reservation(KEYS[r], KEYS[r + 1], rid)
end
return 1
"""
)

# RECORD_SCRIPT names the period fields itself (ARGV 8 and 9, in this order).
assert PERIOD_FIELDS == ("cost_pusd", "total_tokens")

_ScriptCall = tuple[list[str], list[str | int | bytes]]
# Period totals per record: week and month, of the tenant and of the key (RedisUsageSink.keys).
_PERIOD_TOTALS = 4


class RedisUsageSink(UsageSink):
    """Records go to Redis by one script each, pipelined per event-loop tick; the spool takes
    them while Redis is unreachable and a background task replays them when it answers again."""

    def __init__(
        self,
        backend: RedisBackend,
        spool: Spool,
        *,
        stream_maxlen: int | None = None,
        max_batch: int = 256,
        batch_window: float = 0.002,
        replay_interval: float = 30.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        super().__init__(spool)
        self.backend = backend
        self.client = backend.client
        self.prefix = backend.prefix
        self.streams_key = f"{self.prefix}usage:streams"
        # Trimming can drop entries the consumer has not read yet: off unless asked for.
        self.stream_maxlen = stream_maxlen or 0
        self.max_batch = max_batch
        # Records wait this long for others to share their round trip. Nobody waits on it: finish
        # runs after the client has the whole response.
        self.batch_window = batch_window
        self.replay_interval = replay_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Streams this process has registered in `usage:streams`, and when. Forgotten when Redis
        # goes away or loses its scripts (restarted, maybe empty: the consumer would never find the
        # stream again) and re-registered at most every STREAM_REFRESH seconds in any case.
        self._known_streams: dict[str, float] = {}
        # (tenant, day, key id, model) -> the keys of a record but its `seen` key (see `keys`).
        self._keys: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
        self._batch: list[tuple[UsageRecord, _ScriptCall]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # While True, records go straight to the spool instead of paying a timeout each.
        self._down = False
        self._replay_wanted = asyncio.Event()
        self._replayer: asyncio.Task[None] | None = None
        self._closing = False

    def keys(self, rec: UsageRecord) -> list[str]:
        day = _day(rec.ts)
        ck = (rec.tenant, day, rec.key_id, rec.model)
        # All but the first are the same for every record of a (tenant, day, key, model): built
        # once (nine key names a record were ~7 µs of the sink's per-request CPU).
        named = self._keys.get(ck)
        if named is None:
            key_id = rec.key_id or "_"
            named = (
                self.stream_name(rec.tenant),
                *(aggregate_key(self.prefix, rec.tenant, day, scope, sid) for scope, sid in scope_ids(rec)),
                *(
                    aggregate_key(self.prefix, rec.tenant, period, scope, key_id)
                    for period in periods_of(day)
                    for scope in ("tenant", "key")
                ),
            )
            if len(self._keys) >= 4096:
                self._keys.clear()
            self._keys[ck] = named
        return [f"{named[0]}:seen:{rec.request_id}", *named]

    def stream_name(self, tenant: str) -> str:
        return f"{self.prefix}{tenant_tag(tenant)}:usage"

    def _call_for(self, rec: UsageRecord, release: Sequence[str] = (), payload: bytes | None = None) -> _ScriptCall:
        args: list[str | int | bytes] = [
            SEEN_TTL_SECONDS,
            AGG_TTL_SECONDS,
            self.stream_maxlen,
            record_json(rec) if payload is None else payload,
            rec.request_id,
            len(release),
            _PERIOD_TOTALS,
        ]
        inc = increments(rec)
        args += [inc.get(name, 0) for name in PERIOD_FIELDS]
        for name, v in inc.items():
            args += (name, v)
        return [*self.keys(rec), *release], args

    async def start(self) -> None:
        await super().start()
        self._closing = False
        self._replay_wanted.set()  # segments left by an earlier run or a dead worker
        self._replayer = asyncio.create_task(self._replay_loop())

    async def record(self, rec: UsageRecord, release: Sequence[str] = (), payload: bytes | None = None) -> None:
        self.counters.recorded += 1
        try:
            call = self._call_for(rec, release, payload)
        except Exception:
            log.exception("usage record %s: cannot build its Redis call; spooling it", rec.request_id)
            await self._spool([rec])
            return
        if self._down:
            await self._spool([rec])
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((rec, call))
        self._waiters.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # The flusher stores or spools the record even if this caller is cancelled.
        with contextlib.suppress(Exception):
            await asyncio.shield(fut)

    async def _flush(self) -> None:
        """One pipeline per round: whatever arrived in the window or while the previous round was
        in flight (one script per record costs ~200 µs of client CPU alone, ~70 µs pipelined)."""
        if self.batch_window and len(self._batch) < self.max_batch:
            await asyncio.sleep(self.batch_window)
        while self._batch:
            batch, self._batch = self._batch[: self.max_batch], self._batch[self.max_batch :]
            waiters, self._waiters = self._waiters[: len(batch)], self._waiters[len(batch) :]
            try:
                await self._store(batch)
            except Exception:
                log.exception("usage sink: unexpected error storing %d records; spooling them", len(batch))
                await self._spool([rec for rec, _ in batch])
            finally:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)

    async def _store(self, batch: list[tuple[UsageRecord, _ScriptCall]]) -> None:
        if self._down:
            await self._spool([rec for rec, _ in batch])
            return
        try:
            results = await self._run([call for _, call in batch])
        except StoreUnavailable as err:
            self._mark_down(err)
            await self._spool([rec for rec, _ in batch])
            return
        failed: list[UsageRecord] = []
        for (rec, _), res in zip(batch, results, strict=True):
            if isinstance(res, BaseException):
                failed.append(rec)
            elif res:
                self.counters.written += 1
            else:
                self.counters.duplicates += 1
        if failed:
            if _throttle.allow("refused"):
                log.error(
                    "usage sink: Redis refused %d records (%s); spooling them", len(failed), _first_error(results)
                )
            self._replay_wanted.set()
            await self._spool(failed)

    async def _run(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        """Per call 1 (applied), 0 (seen before) or the exception Redis answered for it; raises
        StoreUnavailable when Redis did not answer at all. On the backend's pipelined connection:
        the calls of a batch go out in one write (redis-py cost ~120 µs of CPU a record)."""
        now = time.monotonic()
        known = self._known_streams
        streams = {keys[1] for keys, _ in calls if now - known.get(keys[1], -STREAM_REFRESH) >= STREAM_REFRESH}
        fast = self.backend
        loads_before = fast.script_loads
        waits: list[Awaitable[Any]] = []
        if streams:
            waits.append(fast.fast.call("SADD", self.streams_key, *streams))
        waits += [fast.script(RECORD_SCRIPT, keys, args) for keys, args in calls]
        results = list(await asyncio.gather(*waits, return_exceptions=True))
        for r in results:
            if isinstance(r, StoreUnavailable):
                raise r
            if isinstance(r, BaseException) and not isinstance(r, ReplyError):
                raise r
        if streams:
            if isinstance(results[0], BaseException):
                raise StoreUnavailable(f"redis: SADD {self.streams_key}: {results[0]}")
            for name in streams:
                known[name] = now
            results = results[1:]
        if fast.script_loads != loads_before and loads_before:
            # A restarted or flushed Redis (the script was loaded again): it may have lost the
            # streams set too; register this batch's streams again.
            self._known_streams.clear()
            names = {keys[1] for keys, _ in calls}
            await fast.fast.call("SADD", self.streams_key, *names)
            for name in names:
                known[name] = now
        return results

    async def _spool(self, recs: Iterable[UsageRecord]) -> None:
        await self._append_to_spool(recs)
        self._replay_wanted.set()

    def _mark_down(self, err: BaseException) -> None:
        self._known_streams.clear()
        if not self._down:
            log.warning("usage sink: Redis unreachable (%s); records go to the spool %s", err, self.spool.path)
        self._down = True
        self._replay_wanted.set()

    async def apply(self, recs: list[UsageRecord]) -> None:
        """The spool's replay target: the same script as the live path, so a record replayed
        twice counts once. Raises StoreUnavailable unless Redis took every record."""
        for chunk in chunks(recs, self.max_batch):
            results = await self._run([self._call_for(r) for r in chunk])
            bad = [r for r in results if isinstance(r, BaseException)]
            if bad:
                raise StoreUnavailable(f"redis refused a replayed record: {bad[0]}")
            for res in results:
                if res:
                    self.counters.written += 1
                else:
                    self.counters.duplicates += 1
            self.counters.replayed += len(chunk)

    async def _replay_loop(self) -> None:
        """Replays when something was spooled, and every replay_interval anyway (segments of
        dead workers on this host). Pings with backoff first so a dead Redis costs one ping."""
        delay = self.min_backoff
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replay_wanted.wait(), self.replay_interval)
            if self._closing:
                return
            try:
                await self.backend.ping()
            except StoreUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            if self._down:
                log.warning("usage sink: Redis answers again; replaying the spool")
            self._down = False
            self._replay_wanted.clear()
            try:
                n = await self.spool.replay(self.apply)
            except Exception as err:
                if _throttle.allow("replay"):
                    log.warning("usage sink: spool replay stopped (%s); retrying with backoff", err)
                self._replay_wanted.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            if n:
                log.info("usage sink: replayed %d spooled usage records", n)
            delay = self.min_backoff

    async def drain(self) -> None:
        """Wait for records in flight to be stored or spooled (close, tests)."""
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)

    async def close(self) -> None:
        """Flushes records in flight; what is spooled stays for the next process to replay."""
        await self.drain()
        if self._replayer is not None:
            # The flag, not only cancel(): Python 3.11's wait_for drops a cancellation that lands
            # in the tick its inner future completes, and the loop would go on forever.
            self._closing = True
            self._replay_wanted.set()
            self._replayer.cancel()
            # wait(), not `await task`: the task's CancelledError must not hide a cancel of close().
            await asyncio.wait({self._replayer})
            self._replayer = None
        await super().close()

    async def aggregates(self, tenant: str, day: str | date, scope: Scope, id: str = "") -> dict[str, int | str]:
        """Raises StoreUnavailable when Redis does not answer (the caller picks fail-open or not)."""
        key = aggregate_key(self.prefix, tenant, day, scope, id)
        raw: dict[str, str] = await self.backend.call(self.client.hgetall(key))  # type: ignore[arg-type]
        return shape_aggregates(raw)


# A persistent failure (Redis out of memory, a ledger down for an hour) logs a line every 10 s,
# not one per record.
_throttle = LogThrottle(10.0)


def _first_error(results: Sequence[Any]) -> str:
    for r in results:
        if isinstance(r, BaseException):
            return f"{type(r).__name__}: {r}"
    return ""


class EmbeddedUsageSink(UsageSink):
    """The zero-setup backend: one process, no Redis.

    Records are group-committed straight into the ledger: the records of the same moment (a commit
    window, then whatever arrived while the previous insert ran) go in one transaction, and `record`
    returns once it committed (SQLite: WAL with synchronous=FULL, so on disk). The window trades CPU
    for exposure: a commit (fsync, thread hop, SQLite's locking) costs the same whatever it holds (in
    process, at 1,500 records/s: ~185 µs of CPU a record with 2 ms, ~125 with 10 ms), and the window
    is how long a finished request's record is held only in memory (a SIGKILL loses those). 2 ms, as
    the spool had: the accounting bench could not tell 10 ms from 2 ms apart, so the money path keeps
    the shorter exposure. No client waits for it (records are stored after the response went out).

    Only when the ledger cannot take them (down, locked, slower than `insert_timeout`) do records go
    to the spool (the write-ahead log: on disk before `record` returns), and for a while after such a
    failure new records go there directly; a background task moves whole spool segments into the
    ledger in batches and deletes a segment once the ledger committed all of it. The ledger's insert
    is idempotent, so an insert that timed out but committed later, or a crash between commit and
    delete, costs nothing. (Until 2026-12-07 every record went through the spool first: written
    twice, read back and parsed again. In process that cost ~10% more a record at the same window;
    through the accounting bench the two are within its noise.)

    Aggregates live in memory for the life of the process, counted when `record` is called (also
    for a record the spool had to drop: the usage happened, budgets should see it). After a
    restart they start at zero: whoever owns budgets loads the ledger's totals with
    `load_aggregates` (after `start`, which first replays leftover segments into the ledger, so the
    ledger is complete by then). We chose that over re-reading the ledger here: the ledger already
    has the report queries, and this sink stays independent of its schema.
    """

    def __init__(
        self,
        backend: EmbeddedBackend,
        ledger: LedgerWriter,
        spool: Spool,
        *,
        flush_interval: float = 1.0,
        batch: int = 500,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        seen_capacity: int = 100_000,
        commit_window: float = 0.002,
        insert_timeout: float = 5.0,
    ) -> None:
        super().__init__(spool)
        self.backend = backend
        self.ledger = ledger
        self.flush_interval = flush_interval
        self.batch = batch
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.commit_window = commit_window
        self.insert_timeout = insert_timeout
        # Records waiting for the next group commit, and the task that runs it.
        self._direct: list[tuple[UsageRecord, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        # After a failed insert, records go to the spool until then (monotonic time); the wait
        # doubles with each failure in a row, from min_backoff to max_backoff.
        self._spool_until = 0.0
        self._direct_backoff = 0.0
        self._agg: dict[tuple[str, str, str, str], dict[str, int]] = {}
        # Recent request ids: a record offered twice is aggregated once (the ledger dedupes too).
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_capacity = seen_capacity
        self._unflushed = 0
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await super().start()
        try:
            await self._flush_once()
        except Exception as err:
            log.warning("usage sink: the ledger cannot take the spooled records yet (%s); will retry", err)
        self._flusher = asyncio.create_task(self._flush_loop())

    async def record(self, rec: UsageRecord, release: Sequence[str] = (), payload: bytes | None = None) -> None:
        self.counters.recorded += 1
        try:
            if rec.request_id not in self._seen:
                self._seen[rec.request_id] = None
                if len(self._seen) > self._seen_capacity:
                    self._seen.popitem(last=False)
                self._add(rec.tenant, _day(rec.ts), scope_ids(rec), increments(rec))
            else:
                self.counters.duplicates += 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._direct.append((rec, fut))
            if self._committer is None or self._committer.done():
                self._committer = asyncio.create_task(self._commit())
            # Shielded: a cancelled caller must not cancel the commit other callers share.
            await asyncio.shield(fut)
        except Exception:
            self.counters.failed += 1
            log.exception("usage sink: cannot record usage record %s", rec.request_id)

    async def _commit(self) -> None:
        """Group commit: one ledger transaction for the records of the commit window, then one for
        those that arrived while it ran (a transaction and a thread hop per record would cost more
        than the rest of the record's path)."""
        if self.commit_window:
            await asyncio.sleep(self.commit_window)
        while self._direct:
            batch, self._direct = self._direct, []
            recs = [rec for rec, _ in batch]
            try:
                if time.monotonic() < self._spool_until:
                    await self._spool(recs)
                else:
                    await self._insert_direct(recs)
            except Exception:
                self.counters.failed += len(recs)
                log.exception("usage sink: cannot record %d usage records", len(recs))
            except BaseException:
                # Cancelled (the loop is shutting down without close()): nobody is told "stored".
                for _, fut in batch + self._direct:
                    fut.cancel()
                self._direct = []
                raise
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _insert_direct(self, recs: list[UsageRecord]) -> None:
        try:
            await asyncio.wait_for(self._store(recs), self.insert_timeout)
        except Exception as err:
            # Down, locked, or too slow: the spool keeps them until the ledger is back (a timed-out
            # insert that still commits makes the replay's rows duplicates, which the ledger skips).
            self._direct_backoff = min(max(self._direct_backoff * 2, self.min_backoff), self.max_backoff)
            self._spool_until = time.monotonic() + self._direct_backoff
            if _throttle.allow("ledger-direct", 60.0):
                log.warning("usage sink: the ledger cannot take records now (%s); they wait in the spool", err)
            await self._spool(recs)
            return
        self._direct_backoff = 0.0

    async def _spool(self, recs: Sequence[UsageRecord]) -> None:
        self._unflushed += await self._append_to_spool(recs)
        if self._unflushed >= self.batch:
            self._wake.set()

    def _add(self, tenant: str, day: str, scopes: Iterable[tuple[str, str]], inc: Mapping[str, int]) -> None:
        t = tenant or "_"
        for scope, sid in scopes:
            counters = self._agg.setdefault((t, day, scope, sid), {})
            for name, v in inc.items():
                counters[name] = counters.get(name, 0) + v

    async def load_aggregates(self, rows: Iterable[AggregateRow]) -> None:
        """Add (tenant, day, scope, id, counters) rows, e.g. the ledger's per-day totals at start.
        For scope "tenant" the id is ignored."""
        for tenant, day, scope, sid, counters in rows:
            self._add(tenant, day, [(scope, "" if scope == "tenant" else sid or "_")], counters)

    async def aggregates(self, tenant: str, day: str | date, scope: Scope, id: str = "") -> dict[str, int | str]:
        sid = "" if scope == "tenant" else id or "_"
        return shape_aggregates(self._agg.get((tenant or "_", utc_day(day), scope, sid), {}))

    def counter(self, tenant: str, day: str, scope: Scope, id: str, name: str) -> int:
        """One counter of one aggregate, without I/O (budgets read it on the request path)."""
        sid = "" if scope == "tenant" else id or "_"
        return self._agg.get((tenant or "_", day, scope, sid), {}).get(name, 0)

    async def _store(self, recs: list[UsageRecord]) -> None:
        """Insert into the ledger; what it refuses as invalid is set aside in the spool's dead file."""
        n, refused = await insert_setting_aside(self.ledger, recs)
        if refused:
            # Durably set aside before the segment holding them can be deleted.
            await self.spool.set_aside([(recs[i], str(err)) for i, err in refused])
            self.counters.refused += len(refused)
        self.counters.written += n
        self.counters.duplicates += len(recs) - n - len(refused)

    async def _insert(self, recs: list[UsageRecord]) -> None:
        """The spool replay's step."""
        await self._store(recs)
        self.counters.replayed += len(recs)

    async def _flush_once(self) -> None:
        self._unflushed = 0
        await self.spool.replay(self._insert, batch=self.batch)

    async def _flush_loop(self) -> None:
        delay = self.min_backoff
        pending = False
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            if self._closing:
                return  # close() moves the rest (and cancel() alone may be lost, see RedisUsageSink)
            if not (pending or self._unflushed):
                continue
            try:
                await self._flush_once()
            except Exception as err:
                pending = True
                if _throttle.allow("ledger", 60.0):
                    log.warning(
                        "usage sink: the ledger cannot take records (%s); %d bytes wait in the spool",
                        err,
                        self.spool.size_bytes,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            pending = False
            delay = self.min_backoff

    async def flush(self) -> None:
        """Move everything spooled so far into the ledger now (raises if the ledger cannot)."""
        await self.spool.flush()
        await self._flush_once()

    async def close(self) -> None:
        """One last move into the ledger; what the ledger cannot take stays in the spool."""
        while self._committer is not None and not self._committer.done():
            await asyncio.wait({self._committer})
        self._closing = True
        if self._flusher is not None:
            self._wake.set()
            self._flusher.cancel()
            # wait(), not `await task`: the task's CancelledError must not hide a cancel of close().
            await asyncio.wait({self._flusher})
            self._flusher = None
        try:
            await self.flush()
        except Exception as err:
            log.warning("usage sink: closing with records in the spool (%s); the next start moves them", err)
        await super().close()
