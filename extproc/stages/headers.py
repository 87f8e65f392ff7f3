"""Drop every client-supplied header in the gateway's own namespace.

Envoy routes on x-gateway-* headers and later stages put identity there; a client that sends them
must not influence either. They are removed at request-headers time, before anything else runs;
stages that own a header set it again afterwards (routing sets its headers on the body reply).
"""

from __future__ import annotations

from ..pipeline import RequestContext, Stage

INTERNAL_PREFIX = "x-gateway-"
# The client's own directives in that namespace: removed before the request leaves, but kept for
# the stages that read them (the cache's bypass / refresh). They route and identify nothing.
CLIENT_DIRECTIVES = frozenset({"x-gateway-cache"})


class StripInternalHeaders(Stage):
    name = "strip-internal-headers"

    async def request_headers(self, ctx: RequestContext) -> None:
        forged = [k for k in ctx.headers if k.startswith(INTERNAL_PREFIX)]
        if forged:
            ctx.remove_headers.extend(forged)
            for k in forged:
                if k not in CLIENT_DIRECTIVES:
                    del ctx.headers[k]
