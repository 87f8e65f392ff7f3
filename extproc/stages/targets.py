"""Which target answered a model with targets, from the response headers Envoy's route adds
(`x-gateway-target`: the answering endpoint's `gateway.target` metadata, "<provider>/<upstream
model>"; `x-gateway-attempts`: how many attempts Envoy made). Last in the pipeline, so its
response hook runs first: accounting, limits, translation and metrics then see the target that
answered as the route. The two headers are removed from what the client gets."""

from __future__ import annotations

import logging
from dataclasses import replace

from ..pipeline import Need, RequestContext, Stage

log = logging.getLogger("extproc.targets")

TARGET_HEADER = "x-gateway-target"
ATTEMPTS_HEADER = "x-gateway-attempts"
# Set by the per-attempt filter on an attempt it refused itself: the body is already in the
# client's schema and no provider answered (see AttemptProcessor).
REFUSED_HEADER = "x-gateway-attempt-refused"
MAX_ATTEMPTS = 100


class TargetsStage(Stage):
    name = "targets"

    async def request_body(self, ctx: RequestContext) -> None:
        if ctx.route is not None and ctx.route.targets:
            ctx.need(Need.HEADERS)

    async def response_headers(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None or not route.targets:
            return
        headers = ctx.response_headers
        key = headers.get(TARGET_HEADER, "")
        attempts = headers.get(ATTEMPTS_HEADER, "")
        for name in (TARGET_HEADER, ATTEMPTS_HEADER, REFUSED_HEADER):
            if name in headers:
                ctx.remove_headers.append(name)
        n = int(attempts) if attempts.isascii() and attempts.isdigit() and len(attempts) < 4 else 0
        if REFUSED_HEADER in headers:
            # The gateway refused the attempt for its target: no provider answered.
            ctx.notes[self.name] = "refused"
            ctx.route = replace(route, provider="", upstream_model="")
            ctx.attempts = min(n, MAX_ATTEMPTS)
            return
        answered = route.answered_by(key)
        if answered is None:
            # Envoy answered itself (every target refused the connection, none healthy): no target.
            ctx.route = replace(route, provider="", upstream_model="")
            ctx.attempts = min(n, MAX_ATTEMPTS)
            log.warning(
                "model %s: no target answered after %d attempts (status %d)",
                route.public_model,
                n,
                ctx.response_status,
            )
            return
        ctx.route = answered
        ctx.attempts = max(1, min(n, MAX_ATTEMPTS))
        ctx.metadata["provider"] = answered.provider
        ctx.metadata["upstream_model"] = answered.upstream_model
        ctx.metadata["attempts"] = ctx.attempts
        if ctx.attempts > 1:
            log.info(
                "model %s answered by %s after %d attempts (status %d, request %s)",
                route.public_model,
                key,
                ctx.attempts,
                ctx.response_status,
                ctx.request_id,
            )
