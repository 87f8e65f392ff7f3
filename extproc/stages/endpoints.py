"""Refuse what the gateway does not proxy, before any body is buffered.

Only known LLM endpoints go upstream: an unknown path or method gets a 404/405 here rather than
reaching a provider with the gateway's credentials (later) attached.
"""

from __future__ import annotations

from ..errors import ErrorKind, GatewayError, method_not_allowed, quote
from ..pipeline import RequestContext, Stage


class EndpointStage(Stage):
    name = "endpoints"

    async def request_headers(self, ctx: RequestContext) -> None:
        ep = ctx.endpoint
        if ep is None:
            raise GatewayError(
                ErrorKind.NOT_FOUND, f"Invalid URL ({quote(ctx.method, 16)} {quote(ctx.path)}).", "unknown_endpoint"
            )
        if ctx.method != ep.method:
            raise method_not_allowed(ctx.method, ctx.path)
        ctype = ctx.headers.get("content-type", "application/json")
        if "json" not in ctype.lower():
            raise GatewayError(
                ErrorKind.UNSUPPORTED_MEDIA,
                f"Unsupported content-type {quote(ctype)}; send application/json.",
                "unsupported_media_type",
            )
