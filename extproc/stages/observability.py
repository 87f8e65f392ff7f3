"""Metrics and the trace span of each exchange, recorded once it has ended.

First in the pipeline, so its finish runs last (the onion order) and sees everything the other
stages concluded: the usage record, the refusal and who refused, their notes. It has no other hook:
on the request path it costs nothing, and it never makes the processor keep a stream open.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..observability.metrics import GatewayMetrics
from ..observability.otlp_env import caller_sampled
from ..observability.tracing import AttributeValue, SpanData, Tracing
from ..pipeline import Outcome, RequestContext, Stage

log = logging.getLogger("extproc.observability")

# Stages whose refusals are authentication's (an unknown, revoked or expired key; a model the key
# may not use).
AUTH_STAGES = frozenset({"auth", "model-access"})
# GenAI operation names (gen_ai.operation.name) by endpoint path.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/messages": "chat", "/v1/embeddings": "embeddings"}
_FORWARDED = frozenset({Outcome.COMPLETED, Outcome.INCOMPLETE})
_STATUS = {n: str(n) for n in range(100, 600)}
_TOKEN_TYPES = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_creation_input", "cache_creation_input_tokens"),
    ("reasoning", "reasoning_tokens"),
)


# Exchanges alike in every label (most of them) share one _Rows; this many kinds are kept, and an
# exchange of yet another kind is recorded through a _Rows made for it alone (slower, as right).
MAX_KINDS = 4096


@dataclass(slots=True)
class _Rows:
    """The counter cells and histogram rows one kind of exchange adds to (the same tenant, model,
    provider, status, code, operation and response model): an exchange finds them by one lookup of
    its labels instead of building a key tuple and looking it up for each metric (~40% of the
    stage's time). A row is fetched the first time it is needed, so that a series exists only once
    observed (a JSON answer's kind has no time-to-first-token series)."""

    labels: tuple[str, str, str, str]  # the GenAI labels: operation, model, response model, provider
    requests: list[float]
    duration: list[float] | None = None
    tokens_in: list[float] | None = None
    tokens_out: list[float] | None = None
    ttft: list[float] | None = None
    tpot: list[float] | None = None
    cost: list[float] | None = None
    # gateway_tokens cells, by _TOKEN_TYPES index.
    tokens: list[list[float] | None] = field(default_factory=lambda: [None] * len(_TOKEN_TYPES))


class ObservabilityStage(Stage):
    name = "observability"

    def __init__(self, metrics: GatewayMetrics, tracing: Tracing | None = None, tenant_labels: bool = True) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.tenant_labels = tenant_labels
        self._kinds: dict[tuple[str, ...], _Rows] = {}

    async def finish(self, ctx: RequestContext) -> None:
        try:
            self._record(ctx)
        except Exception:
            # Never the exchange's problem: its answer has gone.
            log.exception("recording metrics failed (request %s)", ctx.request_id)

    def _rows(self, kind: tuple[str, ...]) -> _Rows:
        tenant, model, provider, status, code, operation, response_model = kind
        rows = _Rows(
            (operation, model, response_model, provider),
            self.metrics.requests.cell((tenant, model, provider, status, code)),
        )
        if len(self._kinds) < MAX_KINDS:
            self._kinds[kind] = rows
        return rows

    def _record(self, ctx: RequestContext) -> None:
        m = self.metrics
        route, identity, usage, err = ctx.route, ctx.identity, ctx.usage, ctx.error
        tenant = identity.tenant if identity is not None and self.tenant_labels else ""
        model = route.public_model if route is not None else ""
        provider = route.provider if route is not None else ""
        if err is not None:
            status, code = err.status, err.code or "error"
        elif ctx.reply is not None:
            status, code = ctx.reply.status, ""
        elif usage is not None:
            status, code = usage.status, usage.error_code or ""
        else:
            status = ctx.response_status
            code = "" if ctx.outcome is Outcome.COMPLETED else (ctx.outcome.value if ctx.outcome else "")
        operation = OPERATIONS.get(ctx.path, "")
        kind = (tenant, model, provider, _STATUS.get(status) or str(status), code, operation, ctx.response_model or "")
        rows = self._kinds.get(kind) or self._rows(kind)
        rows.requests[0] += 1
        if err is not None:
            if ctx.stage in AUTH_STAGES:
                m.auth_refusals.inc((code,))
            limits = ctx.notes.get("limits", "")
            if limits.startswith("refused:"):
                m.limit_refusals.inc((limits[8:],))
        m.stage_time.observe_each(ctx.timings)
        notes = ctx.notes
        cache = notes.get("cache")
        if cache is not None:
            m.cache.inc((cache, model))
            if usage is not None and usage.cache_hit and usage.saved_usd not in (None, "0"):
                m.cache_saved.inc((tenant, model), float(usage.saved_usd or 0))
        if ctx.attempts and route is not None and route.targets:
            target = f"{route.provider}/{route.upstream_model}" if route.provider else "none"
            m.attempts.inc((model, target), ctx.attempts)
            if ctx.attempts > 1:
                m.fallbacks.inc((model, target))
        pair = notes.get("translation")
        if pair is not None:
            m.translations.inc((pair,))
        ended = ctx.response_ended_at or time.monotonic()
        if route is not None and ctx.outcome in _FORWARDED:
            duration = ended - ctx.started_at
            m.duration.add(rows.duration or _set(rows, "duration", m.duration.row((*rows.labels, code))), duration)
            if usage is not None:
                tu = m.token_usage
                row = rows.tokens_in or _set(rows, "tokens_in", tu.row(("input", *rows.labels)))
                tu.add(row, usage.input_tokens)
                row = rows.tokens_out or _set(rows, "tokens_out", tu.row(("output", *rows.labels)))
                tu.add(row, usage.output_tokens)
                if usage.ttft_ms is not None and usage.stream:
                    ttft = usage.ttft_ms / 1000
                    m.ttft.add(rows.ttft or _set(rows, "ttft", m.ttft.row(rows.labels)), ttft)
                    if usage.output_tokens > 1 and not code:
                        tpot = max(duration - ttft, 0.0) / (usage.output_tokens - 1)
                        m.tpot.add(rows.tpot or _set(rows, "tpot", m.tpot.row(rows.labels)), tpot)
        if usage is not None:
            cells = rows.tokens
            for i, (token_type, attr) in enumerate(_TOKEN_TYPES):
                n = getattr(usage, attr)
                if n:
                    cell = cells[i]
                    if cell is None:
                        cell = cells[i] = m.tokens.cell((tenant, model, token_type))
                    cell[0] += n
            if usage.cost_usd is not None and usage.cost_usd != "0":
                cell = rows.cost or _set(rows, "cost", m.cost.cell((tenant, model)))
                cell[0] += float(usage.cost_usd)
        if self.tracing is not None and caller_sampled(ctx.traceparent):
            self._span(ctx, operation, status, code, ended)

    def _span(self, ctx: RequestContext, operation: str, status: int, code: str, ended: float) -> None:
        tracing = self.tracing
        assert tracing is not None
        route, identity, usage = ctx.route, ctx.identity, ctx.usage
        attrs: dict[str, AttributeValue] = {
            "gateway.request_id": ctx.request_id,
            "gateway.outcome": ctx.outcome.value if ctx.outcome else "",
        }
        if operation:
            attrs["gen_ai.operation.name"] = operation
        if route is not None:
            attrs["gen_ai.request.model"] = route.public_model
            attrs["gen_ai.provider.name"] = route.provider
            attrs["gateway.upstream_model"] = route.upstream_model
        if ctx.response_model:
            attrs["gen_ai.response.model"] = ctx.response_model
        if ctx.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(ctx.finish_reasons)
        if identity is not None:
            attrs["gateway.tenant"] = identity.tenant
            attrs["gateway.key_id"] = identity.key_id
        if status:
            attrs["http.response.status_code"] = status
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
            attrs["gateway.estimated"] = usage.estimated
            if usage.cost_usd is not None:
                attrs["gateway.cost_usd"] = usage.cost_usd
            if usage.ttft_ms is not None:
                attrs["gateway.ttft_ms"] = usage.ttft_ms
        for stage, note in ctx.notes.items():
            attrs[f"gateway.{stage}"] = note
        if ctx.error is not None:
            attrs["gateway.refused_by"] = ctx.stage
        if code:
            attrs["error.type"] = code
        if "input" in ctx.captured:
            attrs["gen_ai.input.messages"] = ctx.captured["input"]
        if "output" in ctx.captured:
            attrs["gen_ai.output.messages"] = ctx.captured["output"]
        # As for HTTP server spans: the gateway's and the provider's 5xx and a missing response are
        # errors; a refusal (4xx) is the gateway doing its job and carries error.type only.
        error = code if code and (status >= 500 or status == 0) else None
        name = f"{operation} {route.public_model}" if operation and route is not None else f"ext_proc {ctx.method}"
        wall_end = ctx.ts + (ended - ctx.started_at)
        tracing.export(ctx.traceparent, SpanData(name, int(ctx.ts * 1e9), int(wall_end * 1e9), attrs, error))


def _set(rows: _Rows, name: str, value: list[float]) -> list[float]:
    setattr(rows, name, value)
    return value
