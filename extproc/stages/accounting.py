"""Tokens and cost of every exchange, exact to what the provider reported, made durable.

One usage record per ext_proc stream, however it ends (see Outcome): the provider's own counts when
it reported them, an estimate marked `estimated` when the response broke off first, and the status
and error code for provider errors and for requests the gateway refused. The record is built in
`finish` (which the processor runs exactly once, shielded from cancellation) and handed to the
usage sink, which makes it durable before the exchange's task ends.

OpenAI streams report usage only when the request sets `stream_options.include_usage`: when the
client did not, this stage sets it upstream and removes what it adds from the client's stream (the
usage-only chunk and the `"usage":null` members), so the client sees the stream it asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from ..accounting.pricing import PriceTable, cost_usd, format_usd
from ..accounting.record import UsageRecord
from ..accounting.sink import UsageSink
from ..accounting.spool import record_json
from ..accounting.tokenizer import count_tokens, estimate_input_tokens
from ..pipeline import Need, Outcome, RequestContext, ResponseChunk, Stage
from ..providers import ADAPTERS, ProviderAdapter, StreamReader, Usage

log = logging.getLogger("extproc.accounting")
# One JSON line per request with the record's fields (never prompt or completion text).
usage_log = logging.getLogger("extproc.usage")

_ZERO = Usage()
_USAGE_FIELDS = frozenset(f.name for f in fields(Usage))


@dataclass(slots=True)
class _Exchange:
    """What this stage keeps for one request between its phases."""

    adapter: ProviderAdapter
    # The request as the client sent it (in the client's schema, which differs from the
    # provider's when translated), kept only to estimate input tokens if no usage arrives.
    request_body: bytes | None = None
    request_schema: str = "openai"
    injected_usage: bool = False
    reader: StreamReader | None = None
    first_token_at: float | None = None
    usage: Usage | None = None
    # Output text of a JSON response without usage (for the estimate).
    json_text: str = ""
    error_code: str | None = None
    record: UsageRecord | None = None
    # The client asked for usage in its stream (OpenAI stream_options.include_usage).
    client_usage: bool = False


class Counters:
    """What ops want to count (exported as metrics by the observability issue)."""

    def __init__(self) -> None:
        self.records = 0
        self.estimated = 0
        self.unpriced = 0
        self.failures = 0


class AccountingStage(Stage):
    name = "accounting"

    def __init__(self, prices: PriceTable, sink: UsageSink) -> None:
        self.prices = prices
        self.sink = sink
        self.counters = Counters()
        self._warned: set[str] = set()

    # -- request --------------------------------------------------------------------------------

    async def request_body(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None:
            return
        adapter = ADAPTERS[route.schema]
        ex = _Exchange(adapter, request_body=ctx.body, request_schema=ctx.client_schema)
        ctx.state[self.name] = ex
        ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS)
        if route.targets:
            # Which schema answers is known from the response (response_headers); each attempt
            # asks an OpenAI target for usage itself (stages/attempt.py).
            opts = ctx.json.get("stream_options")
            ex.client_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if ctx.streaming:
                ctx.need(Need.EDIT)
            return
        if ctx.streaming and adapter.request_usage_in_stream(ctx.json):
            ex.injected_usage = True
            ctx.mark_body_changed()
            # Removing what the gateway added means editing the client's stream.
            ctx.need(Need.EDIT)

    # -- response -------------------------------------------------------------------------------

    async def response_headers(self, ctx: RequestContext) -> None:
        ex: _Exchange | None = ctx.state.get(self.name)
        route = ctx.route
        if ex is not None and route is not None and route.targets:
            # The target that answered (set by the targets stage, which sees the headers first).
            ex.adapter = ADAPTERS[route.schema]
            ex.injected_usage = (
                ctx.streaming and route.schema == "openai" and ctx.client_schema == "openai" and not ex.client_usage
            )
        if ex is not None:
            # Until the last reply carries the final figures: an exchange that breaks off is logged
            # by Envoy as estimated (its record is), not as a line without figures.
            ctx.metadata["estimated"] = True

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        ex: _Exchange | None = ctx.state.get(self.name)
        if ex is None:
            return
        if chunk.events is not None:
            reader = ex.reader
            if reader is None:
                reader = ex.reader = ex.adapter.stream_reader(injected_usage=ex.injected_usage)
            for ev in chunk.events:
                if reader.on_event(ev) and ex.first_token_at is None:
                    # The chunk's arrival (the processor stamps the last one's), not this moment.
                    ex.first_token_at = ctx.response_ended_at or _now()
            if ex.injected_usage:
                kept = [e for e in map(reader.without_gateway_usage, chunk.events) if e is not None]
                if len(kept) != len(chunk.events) or any(a is not b for a, b in zip(kept, chunk.events, strict=False)):
                    chunk.events[:] = kept
                    chunk.events_changed = True
            ex.usage = reader.usage
            ctx.response_model = reader.response_model
            ctx.finish_reasons = reader.finish_reasons
            if reader.error is not None and ex.error_code is None:
                code = reader.error.get("type") or reader.error.get("code")
                ex.error_code = str(code)[:64] if code else "stream_error"
        elif chunk.end_of_stream and isinstance(chunk.json, dict):
            ex.usage = ex.adapter.usage_from_json(chunk.json)
            model = chunk.json.get("model")
            ctx.response_model = model[:256] if isinstance(model, str) else None
            ctx.finish_reasons = ex.adapter.finish_reasons_from_json(chunk.json)
            if ctx.response_status >= 400:
                ex.error_code = ex.adapter.error_code_from_json(chunk.json)
            elif ex.usage is None:
                ex.json_text = ex.adapter.output_text_from_json(chunk.json)
        if chunk.end_of_stream:
            # The last reply to Envoy carries the figures for its access log line.
            rec = self._build(ctx, ex)
            if not rec.estimated:
                ex.record = rec
                ctx.metadata.update(_log_fields(rec))
                # Final figures before the client has the last chunk: limits frees what the
                # exchange held on them (finish completes and stores this same record).
                ctx.usage = rec

    # -- end ------------------------------------------------------------------------------------

    async def finish(self, ctx: RequestContext) -> None:
        ex: _Exchange | None = ctx.state.pop(self.name, None)
        try:
            rec = ex.record if ex is not None and ex.record is not None else self._build(ctx, ex)
            if rec.estimated and ex is not None:
                await asyncio.to_thread(self._estimate, rec, ex)
            rec.total_tokens = rec.input_tokens + rec.output_tokens
            if rec.cost_usd is None and rec.estimated:
                rec.cost_usd = self._cost(rec)
        except Exception:
            # Never lose the request: record what is known for certain.
            log.exception("building the usage record failed (request %s)", ctx.request_id)
            self.counters.failures += 1
            rec = self._bare(ctx)
            rec.error_code = rec.error_code or "accounting_error"
        rec.pii = ctx.pii
        self.counters.records += 1
        self.counters.estimated += rec.estimated
        ctx.usage = rec
        payload = record_json(rec)
        await self.sink.record(rec, ctx.usage_release, payload)
        usage_log.info("%s", payload.decode())

    # -- building the record --------------------------------------------------------------------

    def _bare(self, ctx: RequestContext) -> UsageRecord:
        route = ctx.route
        identity = ctx.identity
        ended = ctx.response_ended_at or _now()
        return UsageRecord(
            request_id=ctx.request_id,
            ts=datetime.fromtimestamp(ctx.ts, UTC),
            tenant=identity.tenant if identity else "",
            key_id=identity.key_id if identity else "",
            model=route.public_model if route else "",
            # A model with targets that got no answer names no target.
            upstream_model=route.upstream_model if route and (ctx.attempts or not route.targets) else "",
            provider=route.provider if route and (ctx.attempts or not route.targets) else "",
            endpoint=ctx.path[:128],
            status=ctx.response_status,
            stream=ctx.streaming,
            latency_ms=round((ended - ctx.started_at) * 1000, 3),
            attempts=ctx.attempts,
        )

    def _build(self, ctx: RequestContext, ex: _Exchange | None) -> UsageRecord:
        rec = self._bare(ctx)
        outcome = ctx.outcome
        if outcome is Outcome.REFUSED:
            err = ctx.error
            rec.status = err.status if err else 500
            rec.error_code = err.code if err else "refused"
            rec.cost_usd = "0"
            return rec
        if outcome is Outcome.DIRECT:
            rec.status = ctx.reply.status if ctx.reply else 200
            rec.cost_usd = "0"
            hit = ctx.cache_hit
            if hit is not None:
                # Answered from the cache: the original answer's tokens, and what the provider
                # would have charged for them.
                entry = hit.entry
                rec.cache_hit, rec.cache_counted = True, hit.counted
                rec.provider, rec.upstream_model = entry.provider, entry.upstream_model
                _fill(rec, Usage(**{k: v for k, v in entry.usage.items() if k in _USAGE_FIELDS}))
                rec.saved_usd = self._cost(rec)
            return rec
        if ex is None:
            # Not forwarded by a route (nothing to count), or refused before routing.
            rec.cost_usd = "0"
            if outcome is not Outcome.COMPLETED:
                rec.error_code = "no_response" if outcome is Outcome.NO_RESPONSE else "incomplete"
            return rec
        if ex.first_token_at is not None:
            rec.ttft_ms = round((ex.first_token_at - ctx.started_at) * 1000, 3)
        usage = ex.usage
        if rec.status >= 400 and outcome is Outcome.COMPLETED:
            # A provider error: its status, zero tokens, zero cost (unless it reported usage).
            rec.error_code = ex.error_code or f"http_{rec.status}"
            _fill(rec, usage or _ZERO)
            rec.cost_usd = self._cost(rec) if usage else "0"
            return rec
        if outcome is Outcome.NO_RESPONSE:
            rec.status = 0
            rec.error_code = "no_response"
        elif outcome is Outcome.INCOMPLETE:
            rec.error_code = ex.error_code or "stream_incomplete"
        elif ex.error_code is not None:
            rec.error_code = ex.error_code
        if usage is None or (outcome is not Outcome.COMPLETED and _output_missing(ex)):
            # Broke off before the provider reported (final) usage: estimate, filled in finish.
            rec.estimated = True
            if usage is not None:
                _fill(rec, usage)
            return rec
        _fill(rec, usage)
        rec.cost_usd = self._cost(rec)
        return rec

    def _estimate(self, rec: UsageRecord, ex: _Exchange) -> None:
        """Input from the request with the offline tokenizer, output from the text streamed so far.
        Runs in a worker thread: tokenizing a long prompt takes milliseconds."""
        model = rec.upstream_model
        if rec.input_tokens == 0 and ex.request_body:
            try:
                body = orjson.loads(ex.request_body)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict):
                rec.input_tokens = estimate_input_tokens(ex.request_schema, body, model)
        reader = ex.reader
        text = reader.text if reader is not None else ex.json_text
        output = count_tokens(text, model) if text else 0
        if reader is not None and reader.dropped_chars:
            output += reader.dropped_chars // 4
        rec.output_tokens = max(rec.output_tokens, output)

    def _cost(self, rec: UsageRecord) -> str | None:
        price = self.prices.price(rec.upstream_model)
        if price is None:
            self.counters.unpriced += 1
            if rec.upstream_model not in self._warned and len(self._warned) < 10_000:
                self._warned.add(rec.upstream_model)
                log.warning("no price for model %r: its usage is recorded with cost_usd null", rec.upstream_model)
            return None
        return format_usd(
            cost_usd(
                price,
                rec.input_tokens,
                rec.cached_input_tokens,
                rec.cache_creation_input_tokens,
                rec.output_tokens,
            )
        )


def _output_missing(ex: _Exchange) -> bool:
    """An interrupted Anthropic stream has input counts from message_start but its output count
    only in the final message_delta: until then the output figure is not the provider's final one."""
    reader = ex.reader
    return reader is not None and not reader.usage_final


def _fill(rec: UsageRecord, usage: Usage) -> None:
    rec.input_tokens = usage.input_tokens
    rec.cached_input_tokens = usage.cached_input_tokens
    rec.cache_creation_input_tokens = usage.cache_creation_input_tokens
    rec.output_tokens = usage.output_tokens
    rec.reasoning_tokens = usage.reasoning_tokens
    rec.total_tokens = usage.total_tokens


def _log_fields(rec: UsageRecord) -> dict[str, Any]:
    """What Envoy's access log line shows (dynamic metadata, namespace `gateway`)."""
    return {
        "input_tokens": rec.input_tokens,
        "cached_input_tokens": rec.cached_input_tokens,
        "output_tokens": rec.output_tokens,
        "total_tokens": rec.total_tokens,
        "cost_usd": rec.cost_usd if rec.cost_usd is not None else "",
        "estimated": rec.estimated,
    }


_now = time.monotonic
