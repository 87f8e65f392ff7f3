"""What a request may carry besides its body: header limits, query parameters, stray keys.

- Header count and size are capped below Envoy's own limits, so the headers the gateway adds
  (routing, credentials) always fit: a client over the cap gets 431 here instead of a 503
  `header_mutation_*` from Envoy (a client error dressed as a retriable server error).
- A gateway key anywhere but the two auth headers (a query string, a cookie, Proxy-Authorization)
  is refused with 400 before anything is forwarded or logged: such keys end up in proxies' logs.
- Query parameters the provider does not read on that endpoint are dropped from `:path`, so nothing
  the client put in the URL reaches a provider by accident.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from ..auth.keys import contains_key
from ..errors import ErrorKind, GatewayError, quote
from ..pipeline import RequestContext, Stage
from .auth import CREDENTIAL_HEADERS


class RequestHygieneStage(Stage):
    name = "request-hygiene"

    def __init__(self, max_headers: int, max_headers_kb: int) -> None:
        self.max_headers = max_headers
        self.max_header_bytes = max_headers_kb * 1024

    async def request_headers(self, ctx: RequestContext) -> None:
        if ctx.header_count > self.max_headers or ctx.header_bytes > self.max_header_bytes:
            raise GatewayError(
                ErrorKind.HEADERS_TOO_LARGE,
                f"Request headers too large: at most {self.max_headers} headers and "
                f"{self.max_header_bytes // 1024} KiB in all (got {ctx.header_count} headers, "
                f"{ctx.header_bytes} bytes).",
                "request_headers_too_large",
            )
        # One search over all values (the common case: nothing found), then find which header.
        if contains_key("\n".join(v for k, v in ctx.headers.items() if k not in CREDENTIAL_HEADERS)):
            for name, value in ctx.headers.items():
                if name not in CREDENTIAL_HEADERS and contains_key(value):
                    raise _misplaced(f"the {quote(name)} header")
        query = ctx.query
        if not query:
            return
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(contains_key(k) or contains_key(v) for k, v in pairs) or contains_key(query):
            raise _misplaced("the query string")
        allowed = ctx.endpoint.query if ctx.endpoint is not None else frozenset()
        kept = [(k, v) for k, v in pairs if k in allowed]
        ctx.set_headers[":path"] = f"{ctx.path}?{urlencode(kept)}" if kept else ctx.path


def _misplaced(where: str) -> GatewayError:
    return GatewayError(
        ErrorKind.INVALID_REQUEST,
        f"A gateway API key was found in {where}. Send keys only in 'Authorization: Bearer' or 'x-api-key'; "
        "treat this key as exposed and rotate it.",
        "misplaced_api_key",
    )
