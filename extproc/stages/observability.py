"""Metrics and the trace span of each exchange, recorded once it has ended.

First in the pipeline, so its finish runs last (the onion order) and sees everything the other
stages concluded: the usage record, the refusal and who refused, their notes. It has no other hook:
on the request path it costs nothing, and it never makes the processor keep a stream open.
"""

from __future__ import annotations

import logging
import time

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
_TOKEN_TYPES = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_creation_input", "cache_creation_input_tokens"),
    ("reasoning", "reasoning_tokens"),
)


class ObservabilityStage(Stage):
    name = "observability"

    def __init__(self, metrics: GatewayMetrics, tracing: Tracing | None = None, tenant_labels: bool = True) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.tenant_labels = tenant_labels

    async def finish(self, ctx: RequestContext) -> None:
        try:
            self._record(ctx)
        except Exception:
            # Never the exchange's problem: its answer has gone.
            log.exception("recording metrics failed (request %s)", ctx.request_id)

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
        m.requests.inc((tenant, model, provider, str(status), code))
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
        forwarded = route is not None and ctx.outcome in (Outcome.COMPLETED, Outcome.INCOMPLETE)
        operation = OPERATIONS.get(ctx.path, "")
        if forwarded:
            labels = (operation, model, ctx.response_model or "", provider)
            duration = ended - ctx.started_at
            m.duration.observe((*labels, code), duration)
            if usage is not None:
                m.token_usage.observe(("input", *labels), usage.input_tokens)
                m.token_usage.observe(("output", *labels), usage.output_tokens)
                if usage.ttft_ms is not None and usage.stream:
                    ttft = usage.ttft_ms / 1000
                    m.ttft.observe(labels, ttft)
                    if usage.output_tokens > 1 and not code:
                        m.tpot.observe(labels, max(duration - ttft, 0.0) / (usage.output_tokens - 1))
        if usage is not None:
            for kind, field in _TOKEN_TYPES:
                n = getattr(usage, field)
                if n:
                    m.tokens.inc((tenant, model, kind), n)
            if usage.cost_usd is not None and usage.cost_usd != "0":
                m.cost.inc((tenant, model), float(usage.cost_usd))
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
