"""OpenTelemetry traces of the server's side of each exchange.

The server's span is a child of Envoy's ext_proc span (Envoy sends its W3C trace context in the
ext_proc stream's gRPC metadata), so one trace shows Envoy's request, the ext_proc call with the
gateway's decisions, and Envoy's call to the provider. The span is built whole in the exchange's
finish with its real start time: nothing is done on the request path, and an exchange Envoy did not
sample (trace flags 00) costs one string check.

A finished span goes straight to the batch processor as the SDK's ReadableSpan, not through
`Tracer.start_span` / `end`: the sampling decision is already made (Envoy's, or the ratio for a
span without a parent), and the attributes are ours, built from typed fields. The SDK's path spent
45 µs a span on this machine's event loop, most of it re-validating each attribute value; this
one 8.6 µs.

Export is the SDK's: a BatchSpanProcessor hands finished spans to a background thread that sends
them with the OTLP exporter the standard variables choose (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL = grpc | http/protobuf, headers, timeouts). No endpoint: off.
The exporter encodes with `otlp_encode` (the same request as the SDK's encoder, ~4x cheaper).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..config import TracingConfig
from . import otlp_encode
from .otlp_env import otlp_endpoint, otlp_protocol

log = logging.getLogger("extproc.tracing")
_UNSET = Status(StatusCode.UNSET)  # immutable: one for every span without an error

# What a span attribute may hold: the SDK's validation is skipped (module docstring), so the type
# checker holds this line instead.
AttributeValue = str | bool | int | float | list[str]


def parse_traceparent(value: str | None) -> SpanContext | None:
    """A W3C traceparent (version 00) as a remote parent, or None when absent or malformed."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16 or not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF))


class _FixedResource(Resource):
    """The process's resource, hashed once. The span encoders (ours and the SDK's) group each
    batch's spans by resource and so hash the resource once per span, which Resource does by
    JSON-encoding its attributes; this one never changes after start."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(dict(resource.attributes), resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


@dataclass(slots=True)
class SpanData:
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue]
    error: str | None = None


class Tracing:
    """The process's tracer; `export` takes a finished exchange's span data."""

    def __init__(self, config: TracingConfig, version: str, exporter: Any = None) -> None:
        resource_attrs: dict[str, str] = {"service.version": version}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            resource_attrs["service.name"] = config.service_name
        self.resource = _FixedResource(Resource.create(resource_attrs))
        self.scope = InstrumentationScope("extproc", version)
        self.processor = BatchSpanProcessor(exporter if exporter is not None else _exporter())
        self.root_sampler = TraceIdRatioBased(config.sampling_ratio)
        self.ids = RandomIdGenerator()
        self.capture_content = config.capture_content

    def export(self, traceparent: str | None, data: SpanData) -> None:
        parent = parse_traceparent(traceparent)
        if parent is None:
            # No usable trace context (Envoy not tracing): a root span, sampled at the ratio.
            trace_id = self.ids.generate_trace_id()
            if self.root_sampler.should_sample(None, trace_id, data.name).decision is not Decision.RECORD_AND_SAMPLE:
                return
        elif not parent.trace_flags.sampled:
            return  # Envoy decided not to trace this one
        else:
            trace_id = parent.trace_id
        context = SpanContext(trace_id, self.ids.generate_span_id(), False, TraceFlags(TraceFlags.SAMPLED))
        status = Status(StatusCode.ERROR, data.error) if data.error is not None else _UNSET
        span = ReadableSpan(
            name=data.name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=data.attributes,
            kind=SpanKind.SERVER,
            status=status,
            start_time=data.start_ns,
            end_time=data.end_ns,
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def shutdown(self) -> None:
        """Flushes what is queued (bounded by the exporter's timeout)."""
        self.processor.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated


def _exporter() -> Any:
    """The SDK's OTLP exporter for the chosen protocol, encoding with `otlp_encode` (the SDK's
    encoder was nearly all of a sampled span's cost). Each hook is taken only where the installed
    SDK still has it (a test checks that it does); otherwise the SDK encodes, slower but the same."""
    if otlp_protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        class _GrpcExporter(GrpcExporter):
            def _translate_data(self, data: Any) -> Any:
                return otlp_encode.encode_spans(data)

        return _GrpcExporter() if hasattr(GrpcExporter, "_translate_data") else GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_module

    if getattr(http_module, "encode_spans", None) is otlp_encode.sdk_encode_spans:
        # The HTTP exporter calls the module's `encode_spans` inside `export`: the one hook it has.
        http_module.encode_spans = otlp_encode.encode_spans  # type: ignore[attr-defined]
    return http_module.OTLPSpanExporter()


def start_tracing(config: TracingConfig, version: str) -> Tracing | None:
    endpoint = otlp_endpoint()
    if endpoint is None:
        return None
    tracing = Tracing(config, version)
    # The endpoint may carry credentials in its userinfo: log only the protocol.
    log.info(
        "tracing on: OTLP over %s, sampling ratio %s for requests Envoy did not decide",
        otlp_protocol(),
        config.sampling_ratio,
    )
    return tracing
