"""The standard OTEL_* variables and the trace flags Envoy passes, read in one place: the server's
exporter and the Envoy configs `extproc dev` derives must agree on endpoint and protocol, and the
stages that skip unsampled exchanges on one test of the flags. No OpenTelemetry import here."""

from __future__ import annotations

import os
from collections.abc import Mapping


def otlp_endpoint(env: Mapping[str, str] = os.environ) -> str | None:
    """Where traces go per the standard variables, or None when tracing is off. Envoy's tracer is
    derived from the same answer (extproc.envoyconf.OtlpTarget)."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def otlp_protocol(env: Mapping[str, str] = os.environ) -> str:
    """grpc or http/protobuf. The OTLP specification's default is http/protobuf."""
    value = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    return "grpc" if value.strip().lower() == "grpc" else "http/protobuf"


def caller_sampled(traceparent: str | None) -> bool:
    """False only when the caller (Envoy) decided not to trace: a traceparent whose flags lack the
    sampled bit. Absent or unreadable: True (the sampler decides). A string test, because most
    exchanges are not sampled and this runs before anything else is done for their span."""
    if not traceparent or len(traceparent) < 55 or traceparent[52] != "-":
        return True
    return traceparent[54] not in "02468aceACE"
