"""Load shedding: bounded open streams and bounded request-body bytes per server process.

A burst or a wave of large uploads must not grow the process without bound (the container has a
memory limit and gets killed, taking every open stream with it). Past a limit the request is
refused early with 503 `gateway_overloaded` and `retry-after`, which the SDKs retry with backoff,
instead of queueing until Envoy's per-message timeout fires. Bytes are reserved at header time from
content-length (before Envoy sends the body) and released once the request phases are over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ErrorKind, GatewayError, overloaded
from ..pipeline import RequestContext, Stage
from ..throttle import LogThrottle

log = logging.getLogger("extproc.admission")


@dataclass
class AdmissionCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    streams: int = 0
    body_bytes: int = 0
    refused_streams: int = 0
    refused_bytes: int = 0
    # The most body bytes in flight and the most open streams since `take_peak` was last called.
    peak_body_bytes: int = 0
    peak_streams: int = 0

    def take_peak(self) -> tuple[int, int]:
        """(body bytes, streams) at their most since the last call; both restart from now."""
        peak = (self.peak_body_bytes, self.peak_streams)
        self.peak_body_bytes, self.peak_streams = self.body_bytes, self.streams
        return peak


class AdmissionStage(Stage):
    name = "admission"

    def __init__(self, max_streams: int, max_body_bytes: int) -> None:
        self.max_streams = max_streams
        self.max_body_bytes = max_body_bytes
        self.counters = AdmissionCounters()
        # Loud, but one line per second under a flood.
        self._warnings = LogThrottle(1.0)

    def _refuse(self, what: str) -> None:
        if self._warnings.allow():
            c = self.counters
            log.warning(
                "overloaded (%s): %d streams open, %d body bytes in flight; refused so far: %d by streams, %d by bytes",
                what,
                c.streams,
                c.body_bytes,
                c.refused_streams,
                c.refused_bytes,
            )
        raise overloaded(what)

    async def request_headers(self, ctx: RequestContext) -> None:
        c = self.counters
        if c.streams >= self.max_streams:
            c.refused_streams += 1
            self._refuse("too many open requests")
        c.streams += 1
        c.peak_streams = max(c.peak_streams, c.streams)
        ctx.state[self.name] = 0  # admitted; bytes reserved so far
        declared = ctx.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and len(declared) < 19:
            size = int(declared)
            if size > self.max_body_bytes:  # can never fit: not a retriable overload
                raise GatewayError(
                    ErrorKind.TOO_LARGE,
                    f"Request body of {size} bytes is larger than this gateway accepts ({self.max_body_bytes}).",
                    "request_too_large",
                )
            self._reserve(ctx, size)

    async def request_body(self, ctx: RequestContext) -> None:
        size = len(ctx.body or b"")
        reserved = ctx.state.get(self.name)
        if reserved is not None and size > reserved:
            self._reserve(ctx, size - reserved)  # chunked uploads: what actually arrived

    def _reserve(self, ctx: RequestContext, n: int) -> None:
        c = self.counters
        if n and c.body_bytes + n > self.max_body_bytes:
            c.refused_bytes += 1
            self._refuse("request bodies in flight")
        c.body_bytes += n
        c.peak_body_bytes = max(c.peak_body_bytes, c.body_bytes)
        ctx.state[self.name] += n

    def _release_bytes(self, ctx: RequestContext) -> None:
        reserved = ctx.state.get(self.name)
        if reserved:
            self.counters.body_bytes -= reserved
            ctx.state[self.name] = 0

    async def response_headers(self, ctx: RequestContext) -> None:
        self._release_bytes(ctx)  # the request phases are over; the stream may run for minutes

    async def finish(self, ctx: RequestContext) -> None:
        if self.name in ctx.state:
            self._release_bytes(ctx)
            del ctx.state[self.name]
            self.counters.streams -= 1
