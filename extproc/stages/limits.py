"""Rate limits, concurrency limits and budgets of the calling tenant and key.

Before the request leaves, its limits are charged in one step (one Redis round trip on the shared
backend): a request slot, an estimate of its tokens (input counted with the accounting tokenizer,
plus the output it allows: max_tokens / max_completion_tokens x n, or `limits.default_max_output_tokens`),
a concurrency slot, and a budget reservation (the estimate's price). When the exchange ends, however
it ends, `finish` settles on the usage record the accounting stage wrote (it finishes first: it is
later in the pipeline): the token estimate is replaced by the real count, the reservation released,
the slot freed. A record that is itself an estimate (a stream that broke off) settles on that.

Every answer to a request with limits carries OpenAI-style `x-ratelimit-*` headers for the gateway's
own tightest request and token limits. The provider's own `x-ratelimit-*` headers (which describe the
gateway's provider account) are renamed `x-upstream-ratelimit-*`, so the two are never mixed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from ..accounting.periods import period_end, period_id
from ..accounting.pricing import PriceTable
from ..accounting.sink import cost_pusd
from ..accounting.tokenizer import estimate_input_tokens
from ..errors import ErrorKind, GatewayError, quote
from ..limits.alerts import usd
from ..limits.engine import Demand, RateState, Verdict, plan
from ..limits.service import LimitsService, LimitsUnavailable
from ..pipeline import Need, RequestContext, ResponseChunk, Stage
from ..providers import ADAPTERS

log = logging.getLogger("extproc.limits")

# Bodies larger than this are tokenized in a worker thread (the Rust encoder releases the GIL; a
# small body costs less than the thread hop).
_THREAD_TOKENIZE_BYTES = 64 * 1024
_UPSTREAM_PREFIX = "x-ratelimit-"


@dataclass(slots=True)
class _Held:
    demand: Demand
    headers: dict[str, str]
    # The end-of-response call (LimitsService.ended), while it may still run.
    ending: asyncio.Future[None] | None = None


def go_duration(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it ("20ms", "1.5s", "6m0s")."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


def rate_headers(verdict: Verdict) -> dict[str, str]:
    out: dict[str, str] = {}
    best: dict[str, RateState] = {}
    for state in verdict.rates:
        what = state.check.what
        held = best.get(what)
        if held is None or (state.remaining, -state.reset) < (held.remaining, -held.reset):
            best[what] = state
    for name, state in best.items():
        out[f"x-ratelimit-limit-{name}"] = str(state.limit)
        out[f"x-ratelimit-remaining-{name}"] = str(state.remaining)
        out[f"x-ratelimit-reset-{name}"] = go_duration(state.reset)
    return out


# `Limiter.ended` calls in flight (kept so they are not collected before they ran).
_ENDING: set[asyncio.Future[None]] = set()


class LimitsStage(Stage):
    name = "limits"

    def __init__(self, service: LimitsService, prices: PriceTable, default_max_output_tokens: int = 4096) -> None:
        self.service = service
        self.prices = prices
        self.default_max_output_tokens = default_max_output_tokens
        # Upstream model -> (input, output) pico-USD per token, or None when it has no price.
        self._rates: dict[str, tuple[int, int] | None] = {}

    async def request_body(self, ctx: RequestContext) -> None:
        route, identity = ctx.route, ctx.identity
        if route is None:
            return
        # Every routed response: the provider's x-ratelimit-* headers are renamed.
        ctx.need(Need.HEADERS)
        if identity is None:
            return
        rules = identity.limits.for_model(route.public_model)
        if not rules:
            return
        tokens = pusd = 0
        if any(r.needs_tokens or r.needs_cost for r in rules):
            # The body as it is now: translated to the provider's schema, or still the client's
            # (a model with targets is translated per attempt; its first target's prices reserve).
            schema = ctx.body_schema or route.schema
            adapter = ADAPTERS[schema]
            body = ctx.json
            # Embeddings write no output tokens.
            output = (
                0 if ctx.path == "/v1/embeddings" else adapter.max_output_tokens(body) or self.default_max_output_tokens
            )
            if ctx.body is not None and len(ctx.body) > _THREAD_TOKENIZE_BYTES:
                prompt = await asyncio.to_thread(estimate_input_tokens, schema, body, route.upstream_model)
            else:
                prompt = estimate_input_tokens(schema, body, route.upstream_model)
            tokens = prompt + output
            if any(r.needs_cost for r in rules):
                rates = self._rates.get(route.upstream_model)
                if rates is None:
                    price = self.prices.price(route.upstream_model)
                    rates = price.pusd_per_token() if price is not None else None
                    if len(self._rates) < 10_000:
                        self._rates[route.upstream_model] = rates
                if rates is None:
                    ctx.notes["limits"] = "refused:unpriced"
                    # A budget in USD cannot count what has no price: refuse rather than let the
                    # request bypass the budget.
                    raise GatewayError(
                        ErrorKind.FORBIDDEN,
                        f"The model {quote(route.public_model)} has no price, and a USD budget applies to this "
                        "key; ask the gateway's operators to add its price (gateway.yaml `pricing:`).",
                        "unpriced_model",
                        "model",
                    )
                pusd = prompt * rates[0] + output * rates[1]
        demand = Demand(ctx.request_id, identity.tenant, plan(rules, tokens, pusd), tokens, pusd)
        try:
            verdict = await self.service.acquire(demand)
        except LimitsUnavailable:
            ctx.notes["limits"] = "refused:unavailable"
            raise GatewayError(
                ErrorKind.UNAVAILABLE,
                "The gateway cannot check rate limits right now; retry shortly.",
                "limits_unavailable",
                headers={"retry-after": "1"},
            ) from None
        headers = rate_headers(verdict)
        if not verdict.allowed:
            refused = verdict.refused_by
            ctx.notes["limits"] = f"refused:{refused.what if refused is not None else 'unknown'}"
            raise _refusal(verdict, headers)
        ctx.notes["limits"] = "allowed"
        ctx.usage_release = self.service.release_keys(demand)
        ctx.state[self.name] = _Held(demand, headers)

    async def response_headers(self, ctx: RequestContext) -> None:
        for name, value in ctx.response_headers.items():
            if name.startswith(_UPSTREAM_PREFIX):
                ctx.remove_headers.append(name)
                ctx.set_headers["x-upstream-" + name[2:]] = value
        held: _Held | None = ctx.state.get(self.name)
        if held is not None:
            ctx.set_headers.update(held.headers)

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        """With the last chunk, before the client has it: free the concurrency slot and count the
        budgets at the real cost (accounting has the final figures by then). A client that sends its
        next request the moment this one ended must not find this one still holding its estimate."""
        if not chunk.end_of_stream or ctx.usage is None:
            return
        held: _Held | None = ctx.state.get(self.name)
        if held is not None:
            # Not awaited: the last chunk does not wait a Redis round trip. The call is written to
            # the limiter's one pipelined connection now, so Redis runs it before the ACQUIRE of any
            # request the client sends after seeing this end. A task: the client leaving cannot cut
            # it short. It settles the request but for the budget reservations, which the usage
            # record drops; finish settles whatever it did not.
            task = held.ending = asyncio.ensure_future(self._ended(held.demand, *_figures(held.demand, ctx)))
            _ENDING.add(task)
            task.add_done_callback(_ENDING.discard)

    async def _ended(self, demand: Demand, tokens: int, pusd: int) -> None:
        # One loop turn first: the reply carrying this last chunk is queued behind this task's first
        # step, and building and sending the script call (~30-40 µs) would otherwise delay it. The
        # call still reaches Redis long before the client's next request can (that needs two
        # ext_proc messages through Envoy first).
        await asyncio.sleep(0)
        await self.service.ended(demand, tokens, pusd)

    async def finish(self, ctx: RequestContext) -> None:
        held: _Held | None = ctx.state.pop(self.name, None)
        if held is None:
            return
        if held.ending is not None and not held.ending.done():
            # Settled there already when it succeeded with the same figures (one round trip, not two).
            # wait(), not await: an end call cancelled at shutdown must not stop this settle. (By
            # finish it has usually answered: then no wait at all.)
            await asyncio.wait([held.ending])
        await self.service.settle(held.demand, *_figures(held.demand, ctx))


def _figures(demand: Demand, ctx: RequestContext) -> tuple[int, int]:
    """Tokens and pico-USD the request used, from its usage record."""
    usage = ctx.usage
    if usage is None:
        # No record (accounting off or it failed): the estimate stays charged (fail safe).
        return demand.tokens, demand.pusd
    spent = cost_pusd(usage.cost_usd)
    return usage.input_tokens + usage.output_tokens, demand.pusd if spent is None else spent


def _refusal(verdict: Verdict, headers: dict[str, str]) -> GatewayError:
    c = verdict.refused_by
    assert c is not None
    label = c.rule.label
    if c.what == "concurrency":
        return GatewayError(
            ErrorKind.RATE_LIMITED,
            f"Too many requests in flight for {label}: at most {c.limit} at once. Retry when one has finished.",
            "concurrency_limit_exceeded",
            headers={**headers, "retry-after": "1"},
        )
    if c.kind == "budget":
        now = datetime.now(UTC)
        period = c.rule.period
        renews = period_end(period, now.date())
        amount = (
            f"{usd(verdict.used)} of {usd(c.limit)} USD"
            if c.what == "budget_usd"
            else (f"{verdict.used} of {c.limit} tokens")
        )
        return GatewayError(
            ErrorKind.QUOTA_EXCEEDED,
            f"Budget used up for {label}: {amount} this {period} ({period_id(period, now.date())}, counting "
            f"requests in flight); it renews on {renews.isoformat()} UTC.",
            "insufficient_quota",
            headers=headers,
        )
    unit = "requests" if c.what == "requests" else "tokens"
    if verdict.never:
        return GatewayError(
            ErrorKind.RATE_LIMITED,
            f"This request needs {c.cost} tokens (its prompt plus the output it allows: max_tokens), more than "
            f"the whole limit of {c.limit} tokens per minute for {label}; it can never pass. Lower max_tokens "
            "or shorten the prompt.",
            "rate_limit_exceeded",
            headers=headers,
        )
    wait = max(1, math.ceil(verdict.retry_after or 1))
    return GatewayError(
        ErrorKind.RATE_LIMITED,
        f"Rate limit reached for {label}: {c.limit} {unit} per minute. Retry after {wait}s.",
        "rate_limit_exceeded",
        headers={**headers, "retry-after": str(wait)},
    )
