"""Metrics families, the observability stage, trace context parsing, OTLP targets for Envoy,
readiness and the gRPC health service on the native transport."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc import envoyconf
from extproc.accounting.record import UsageRecord
from extproc.auth.keys import Identity, ModelMatcher
from extproc.cli import status_url
from extproc.config import ConfigError, parse_config
from extproc.errors import ErrorKind, GatewayError
from extproc.observability.health import Health
from extproc.observability.http import make_registry
from extproc.observability.metrics import OVERFLOW, STAGE_BUCKETS, Counter, GatewayMetrics, Histogram
from extproc.observability.tracing import SpanData, Tracing, parse_traceparent
from extproc.pipeline import Outcome, RequestContext
from extproc.routing import Route
from extproc.server import health_status
from extproc.stages.observability import ObservabilityStage

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"providers": {"openai": {"schema": "openai"}}}


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(make_registry(metrics)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


# -- families -----------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    h = Histogram("h_seconds", "doc", ("x",), (0.1, 1.0), 10)
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(("a",), v)
    m = GatewayMetrics()
    m.histograms = (h,)
    m.counters = ()
    got = samples(m)
    le = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "h_seconds_bucket"}
    assert le == {"0.1": 2, "1.0": 4, "+Inf": 5}
    assert got[("h_seconds_count", frozenset({("x", "a")}))] == 5
    assert got[("h_seconds_sum", frozenset({("x", "a")}))] == pytest.approx(8.65)


@pytest.mark.parametrize("kind", ["counter", "histogram", "histogram, observe_each"])
def test_series_past_the_cap_are_counted_as_overflow(kind: str) -> None:
    family: Counter | Histogram
    if kind == "counter":
        family = Counter("c", "doc", ("model",), 3)
        for i in range(10):
            family.inc((f"m{i}",))
    elif kind == "histogram":
        family = Histogram("h", "doc", ("model",), (1.0,), 3)
        for i in range(10):
            family.observe((f"m{i}",), 0.5)
    else:
        family = Histogram("h", "doc", ("model",), (1.0,), 3)
        for _ in range(2):  # the second round finds every label's row cached, the overflowed too
            family.observe_each({f"m{i}": 0.5 for i in range(5)})
    assert len(family.series) == 4  # three kept, one overflow
    assert OVERFLOW in {k[0] for k in family.series}
    if isinstance(family, Counter):
        assert sum(family.value(k) for k in family.series) == 10
    else:
        assert sum(family.count(k) for k in family.series) == 10
        if kind.endswith("observe_each"):
            assert family.count((OVERFLOW,)) == 4  # m3 and m4, twice


def test_observe_each_is_observe_per_entry() -> None:
    """The stage-times shortcut must leave the same rows as one `observe` per entry, in any mix."""
    one, each = (Histogram("h", "doc", ("stage",), STAGE_BUCKETS, 100) for _ in range(2))
    rounds = [{"auth": 1e-5, "limits": 3e-4, "pii": 0.02}, {"auth": 5e-5, "cache": 2.0}, {"limits": 0.0}]
    for values in rounds:
        for label, value in values.items():
            one.observe((label,), value)
        each.observe_each(values)
        each.observe(("auth",), 1e-4)  # the two ways write the same rows
        one.observe(("auth",), 1e-4)
    assert each.series == one.series


def test_sources_and_gauges_are_read_at_scrape() -> None:
    m = GatewayMetrics()
    box = {"n": 1}
    m.counter_source("things", "doc", lambda: box["n"])
    m.gauge("level", "doc", lambda: {("a",): 2.0, ("b",): 3.0}, ("k",))
    box["n"] = 7
    got = samples(m)
    assert got[("things_total", frozenset())] == 7
    assert got[("level", frozenset({("k", "b")}))] == 3


# -- the stage ------------------------------------------------------------------------------------


def _ctx(**kw: Any) -> RequestContext:
    ctx = RequestContext()
    ctx.path = "/v1/chat/completions"
    ctx.method = "POST"
    ctx.route = Route("fast", "openai", "openai", "gpt-5.4-mini")
    ctx.identity = Identity(key_id="k1", key_name="n", tenant="acme", models=ModelMatcher(None), policy={})
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _usage(**kw: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "request_id": "r",
        "ts": datetime.now(UTC),
        "tenant": "acme",
        "model": "fast",
        "status": 200,
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_usd": "0.0001",
    }
    return UsageRecord(**{**base, **kw})


CASES = [
    # (name, context fields, (status, code) counted, auth refusal, limit refusal kind)
    ("ok", {"outcome": Outcome.COMPLETED, "usage": _usage()}, ("200", ""), None, None),
    (
        "auth refused",
        {
            "outcome": Outcome.REFUSED,
            "stage": "auth",
            "route": None,
            "identity": None,
            "error": GatewayError(ErrorKind.UNAUTHENTICATED, "no", "invalid_api_key"),
        },
        ("401", "invalid_api_key"),
        "invalid_api_key",
        None,
    ),
    (
        "limit refused",
        {
            "outcome": Outcome.REFUSED,
            "stage": "limits",
            "notes": {"limits": "refused:tokens"},
            "error": GatewayError(ErrorKind.RATE_LIMITED, "no", "rate_limit_exceeded"),
        },
        ("429", "rate_limit_exceeded"),
        None,
        "tokens",
    ),
    (
        "provider error",
        {"outcome": Outcome.COMPLETED, "usage": _usage(status=500, error_code="server_error", cost_usd="0")},
        ("500", "server_error"),
        None,
        None,
    ),
    ("client gone", {"outcome": Outcome.NO_RESPONSE}, ("0", "no_response"), None, None),
]


@pytest.mark.parametrize(("name", "fields", "counted", "auth", "limit"), CASES, ids=[c[0] for c in CASES])
def test_stage_counts_each_ending(
    name: str, fields: dict[str, Any], counted: tuple[str, str], auth: str | None, limit: str | None
) -> None:
    m = GatewayMetrics()
    ctx = _ctx(**fields)
    ctx.timings = {"auth": 0.0001}
    asyncio.run(ObservabilityStage(m).finish(ctx))
    (key, n), *_ = m.requests.series.items()
    assert n == [1] and key[3:] == counted
    assert dict(m.auth_refusals.series) == ({(auth,): [1.0]} if auth else {})
    assert dict(m.limit_refusals.series) == ({(limit,): [1.0]} if limit else {})
    assert m.stage_time.count(("auth",)) == 1


def test_stage_records_tokens_cost_and_genai_histograms() -> None:
    m = GatewayMetrics()
    ctx = _ctx(outcome=Outcome.COMPLETED, usage=_usage(stream=True, ttft_ms=50.0), response_model="gpt-5.4-mini-2026")
    ctx.response_ended_at = ctx.started_at + 0.45
    asyncio.run(ObservabilityStage(m).finish(ctx))
    assert m.tokens.value(("acme", "fast", "input")) == 10 and m.tokens.value(("acme", "fast", "output")) == 5
    assert m.cost.value(("acme", "fast")) == pytest.approx(0.0001)
    labels = ("chat", "fast", "gpt-5.4-mini-2026", "openai")
    assert m.token_usage.count(("input", *labels)) == 1
    assert m.ttft.count(labels) == 1
    row = m.tpot.series[labels]
    assert row[-1] == pytest.approx((0.45 - 0.05) / 4)  # after the first token, per remaining token


def test_tenant_labels_off_leaves_the_label_empty() -> None:
    m = GatewayMetrics()
    asyncio.run(ObservabilityStage(m, tenant_labels=False).finish(_ctx(outcome=Outcome.COMPLETED, usage=_usage())))
    assert {k[0] for k in m.requests.series} == {""}
    assert {k[0] for k in m.tokens.series} == {""}


class _Exporter:
    """An in-memory SpanExporter."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


@pytest.mark.parametrize(
    ("traceparent", "exported"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),  # Envoy sampled it
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", False),  # Envoy did not
        (None, True),  # no parent: the ratio (1.0 here) decides
        ("garbage", True),  # unusable: a root span, like none
    ],
)
def test_spans_follow_envoys_sampling_decision(traceparent: str | None, exported: bool) -> None:
    from extproc.config import TracingConfig

    exporter = _Exporter()
    tracing = Tracing(TracingConfig(sampling_ratio=1.0), "test", exporter)
    tracing.export(traceparent, SpanData("chat m", 1_000_000_000, 2_000_000_000, {"gen_ai.request.model": "m"}))
    tracing.shutdown()
    assert len(exporter.spans) == (1 if exported else 0)
    if exported and traceparent and traceparent.startswith("00-"):
        span = exporter.spans[0]
        assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
        assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
        assert span.start_time == 1_000_000_000 and span.end_time == 2_000_000_000


def test_exported_spans_encode_with_the_processs_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resource is hashed once (the encoder groups spans by it): it must still be the resource
    the SDK would build, equal and hashing alike, and the encoded batch must carry it once."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource

    from extproc.config import TracingConfig

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    exporter = _Exporter()
    tracing = Tracing(TracingConfig(sampling_ratio=1.0, service_name="gw"), "9.9", exporter)
    sdk = Resource.create({"service.version": "9.9", "service.name": "gw"})
    assert tracing.resource == sdk and hash(tracing.resource) == hash(sdk)
    assert tracing.resource.attributes["deployment.environment"] == "test"
    for i in range(3):
        tracing.export(None, SpanData(f"s{i}", 1, 2, {"a": i}))
    tracing.shutdown()
    (batch,) = encode_spans(exporter.spans).resource_spans
    attrs = {kv.key: kv.value.string_value for kv in batch.resource.attributes}
    assert attrs["service.name"] == "gw" and attrs["deployment.environment"] == "test"
    assert [s.name for s in batch.scope_spans[0].spans] == ["s0", "s1", "s2"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),  # zero trace id
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),  # forbidden version
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01x", False),
        ("00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        ("", False),
    ],
)
def test_traceparent_parsing(value: str, ok: bool) -> None:
    assert (parse_traceparent(value) is not None) == ok


# -- Envoy's tracer from the OTEL_* variables -----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://col:4318"}, ("http/protobuf", "col", 4318, "/v1/traces", False)),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://col:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ("grpc", "col", 4317, "/v1/traces", False),
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://x.example/otlp/t"},
            ("http/protobuf", "x.example", 443, "/otlp/t", True),
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1/base/"}, ("http/protobuf", "c", 1, "/base/v1/traces", False)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1", "OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_otlp_target_from_env(env: dict[str, str], want: tuple[Any, ...] | None) -> None:
    got = envoyconf.OtlpTarget.from_env(env)
    assert (None if got is None else (got.protocol, got.host, got.port, got.path, got.tls)) == want


def _tracer(cfg: dict[str, Any]) -> dict[str, Any] | None:
    hcm = next(envoyconf._hcms(cfg))
    tracing = hcm.get("tracing")
    return tracing if isinstance(tracing, dict) else None


def test_envoy_tracing_removed_without_a_collector_and_pointed_at_one_with() -> None:
    prod = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    assert _tracer(prod) is not None and "otel_collector" in envoyconf.clusters(prod)
    plain = envoyconf.derive_local(prod, envoyconf.LocalPorts())
    assert _tracer(plain) is None and "otel_collector" not in envoyconf.clusters(plain)
    http = envoyconf.derive_local(
        prod, envoyconf.LocalPorts(), otlp=envoyconf.OtlpTarget("http/protobuf", "127.0.0.1", 4318), sampling_ratio=0.1
    )
    tracer = _tracer(http)
    assert tracer is not None and tracer["random_sampling"] == {"value": 10.0}
    assert tracer["provider"]["typed_config"]["http_service"]["http_uri"]["uri"] == "http://127.0.0.1:4318/v1/traces"
    collector = envoyconf.clusters(http)["otel_collector"]
    assert collector["type"] == "STATIC"
    grpc = envoyconf.derive_local(prod, envoyconf.LocalPorts(), otlp=envoyconf.OtlpTarget("grpc", "collector", 4317))
    tracer = _tracer(grpc)
    assert tracer is not None and tracer["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        "otel_collector"
    )
    assert envoyconf.clusters(grpc)["otel_collector"]["type"] == "STRICT_DNS"


# -- config, readiness, health, status --------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("server", {"metrics_listen": "9464"}, "server.metrics_listen"),
        ("server", {"metrics_listen": "host:99999"}, "server.metrics_listen"),
        ("tracing", {"sampling_ratio": 1.5}, "tracing.sampling_ratio"),
        ("tracing", {"exporter": "zipkin"}, "tracing.exporter"),
        ("metrics", {"max_series": 1}, "metrics.max_series"),
    ],
)
def test_bad_observability_config_names_the_path(section: str, value: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, section: value})
    assert path in str(err.value)


def test_metrics_listen_can_be_off() -> None:
    assert parse_config({**BASE, "server": {"metrics_listen": None}}).server.metrics_listen is None


def test_readiness_follows_the_store_in_fail_closed_mode_only() -> None:
    async def run(auth_mode: str, limits_mode: str) -> tuple[bool, bool]:
        up = {"ok": True}

        async def ping() -> None:
            if not up["ok"]:
                raise ConnectionError("down")

        config = parse_config({**BASE, "auth": {"failure_mode": auth_mode}, "limits": {"failure_mode": limits_mode}})
        health = Health(config, ping, interval=3600)
        await health.start()
        before = health.ready
        up["ok"] = False
        await health.check()
        during = health.ready
        await health.close()
        assert not health.ready  # shutting down
        return before, during

    assert asyncio.run(run("closed", "open")) == (True, False)
    assert asyncio.run(run("open", "closed")) == (True, False)
    assert asyncio.run(run("open", "open")) == (True, True)


def test_grpc_health_status_by_service() -> None:
    from grpc_health.v1 import health_pb2

    config = parse_config(BASE)
    health = Health(config, None)
    status = health_status(health)
    assert status("") == health_pb2.HealthCheckResponse.SERVING
    assert status("envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.SERVING
    assert status("other") is None
    health.stopping = True
    assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_native_transport_answers_the_health_check() -> None:
    """grpc.health.v1.Health/Check over the server's own HTTP/2 transport, with grpcio as client."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from extproc.pipeline import Pipeline
    from extproc.transport.h2server import NativeServer

    async def main() -> tuple[int, str]:
        config = parse_config(BASE)
        health = Health(config, None)
        server = NativeServer(Pipeline([]), "127.0.0.1:0", 1 << 20, 10, health_status(health))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub: Any = health_pb2_grpc.HealthStub(channel)
                ok = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                    unknown = "answered"
                except grpc.aio.AioRpcError as err:
                    unknown = err.code().name
            return ok.status, unknown
        finally:
            await server.stop(0)

    status, unknown = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert unknown == "NOT_FOUND"


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9464", "http://127.0.0.1:9464"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000"),
        ("[::1]:9464", "http://[::1]:9464"),
        (None, None),
    ],
)
def test_status_url_from_config(listen: str | None, url: str | None) -> None:
    config = parse_config({**BASE, "server": {"metrics_listen": listen}})
    assert status_url(config, None) == url


def test_check_wants_envoys_sampling_to_match_the_servers() -> None:
    prod = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    assert envoyconf.check(parse_config(BASE), prod) == []
    problems = envoyconf.check(parse_config({**BASE, "tracing": {"sampling_ratio": 0.1}}), prod)
    assert problems == [
        "envoy.yaml tracing random_sampling (100%) differs from gateway.yaml tracing.sampling_ratio (0.1)"
    ]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_dev_print_envoy_config_points_envoy_at_the_servers_collector(protocol: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({**BASE, "tracing": {"sampling_ratio": 0.25}}))
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4999",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
    }
    env.pop("OPENAI_API_KEY", None)
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "dev", "--config", str(config), "--print-envoy-config"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout
    derived = yaml.safe_load(out)
    tracer = _tracer(derived)
    assert tracer is not None and tracer["random_sampling"] == {"value": 25.0}
    endpoint = envoyconf.clusters(derived)["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4999}
    typed = tracer["provider"]["typed_config"]
    assert ("grpc_service" in typed) == (protocol == "grpc")
    assert ("http_service" in typed) == (protocol != "grpc")


def test_server_and_envoy_send_traces_to_the_same_collector_in_k8s_and_compose() -> None:
    """The deployments set the server's OTEL variables; the derived Envoy configs name the
    collector: both must point at the same host, port and protocol."""
    import yaml

    def envoy_target(path: str) -> tuple[str, int]:
        cfg = envoyconf.load(ROOT / path)
        tracer = _tracer(cfg)
        assert tracer is not None and "grpc_service" in tracer["provider"]["typed_config"]
        lb = envoyconf.clusters(cfg)["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        addr = lb["endpoint"]["address"]["socket_address"]
        return addr["address"], addr["port_value"]

    docs = list(yaml.safe_load_all((ROOT / "k8s" / "deployment.yaml").read_text()))
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    server_env = {e["name"]: e.get("value") for c in containers for e in c.get("env", []) if "value" in e}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_env = compose["services"]["extproc"]["environment"]
    for env, envoy_path in ((server_env, "k8s/envoy.yaml"), (compose_env, "envoy/envoy-compose.yaml")):
        target = envoyconf.OtlpTarget.from_env(env)
        assert target is not None and target.protocol == "grpc"
        assert (target.host, target.port) == envoy_target(envoy_path)


def test_serve_says_which_setting_when_the_metrics_port_is_taken(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    import yaml

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = tmp_path / "gateway.yaml"
    state = str(tmp_path / "state.db")
    config.write_text(yaml.safe_dump({**BASE, "store": {"path": state}, "usage": {"spool_path": str(tmp_path / "s")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "extproc",
                "serve",
                "--config",
                str(config),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        taken.close()
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"server.metrics_listen 127.0.0.1:{port}: cannot listen" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("traceparent", "sampled"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0A", False),
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra", False),  # a later version
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0z", True),  # unreadable: sampler decides
        ("garbage", True),
        (None, True),
    ],
)
def test_caller_sampled_reads_the_flags_envoy_passed(traceparent: str | None, sampled: bool) -> None:
    from extproc.observability.otlp_env import caller_sampled

    assert caller_sampled(traceparent) is sampled
