"""Observability end to end: real Envoy, the real server, real Redis, an OTLP receiver.

After a known set of requests (JSON, stream, refused, provider error) the server's /metrics holds
exactly those counts and token sums, and the receiver holds one trace per request with Envoy's
spans and the server's span in it (same trace id, the server's span a child of Envoy's ext_proc
call), with the GenAI attributes. Readiness and Envoy's gRPC health check follow Redis in fail-closed
mode. The Grafana dashboard only queries metrics a real scrape has.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from extproc.devstack import Stack
from tests.dashboard_metrics import dashboard_metric_names
from tests.e2e.conftest import (
    Admin,
    access_log_lines,
    extproc_status,
    health_check_successes,
    make_stack,
    openai_client,
    scrape,
    total,
)
from tests.e2e.otlp_receiver import OtlpReceiver, Span

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
MSGS = [{"role": "user", "content": "hello there"}]
MODEL = "gpt-5.4-mini"
SERVER = "llm-gateway-extproc"
ENVOY = "llm-gateway-envoy"


def gateway_log_line(stack: Stack, gateway_request_id: str) -> dict[str, str]:
    found = access_log_lines(stack, lambda line: line.get("gateway_request_id") == gateway_request_id)
    assert found, f"no access log line for {gateway_request_id}"
    return found[0]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Stack, Admin, OtlpReceiver]]:
    receiver = OtlpReceiver("http/protobuf").start()
    workdir = tmp_path_factory.mktemp("observability")
    stack, admin = make_stack(
        workdir,
        redis_url,
        overrides={"tracing": {"sampling_ratio": 1.0}},
        extra_env=receiver.env(),
        sampling_ratio=1.0,
    )
    stack.start()
    yield stack, admin, receiver
    stack.stop()
    receiver.stop()


def test_metrics_and_traces_after_known_requests(traced: tuple[Stack, Admin, OtlpReceiver]) -> None:
    stack, admin, receiver = traced
    tenant = f"obs{uuid.uuid4().hex[:6]}"
    key, vkey = admin.key(tenant, "metrics")
    tag = uuid.uuid4().hex
    client = openai_client(stack, key, tag)

    plain = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    completion = plain.parse()
    assert completion.usage is not None
    with client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
        model=MODEL,
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "12"},
    ) as streamed:
        stream_id = streamed.headers["x-gateway-request-id"]
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    stream_usage = next(c["usage"] for c in chunks if c.get("usage"))
    with pytest.raises(openai.AuthenticationError) as refused:
        openai_client(stack, "sk-gw-" + "x" * 40, tag).chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    refused_id = refused.value.response.headers["x-gateway-request-id"]
    refused_code = refused.value.body["code"]  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=MODEL, messages=MSGS, extra_headers={"x-mock-status": "500"})  # type: ignore[arg-type]
    failed_id = failed.value.response.headers["x-gateway-request-id"]
    ids = [plain.headers["x-gateway-request-id"], stream_id, failed_id]

    # -- metrics ----------------------------------------------------------------------------------
    m = scrape(stack)
    ok = {"tenant": tenant, "model": MODEL, "provider": "openai", "status": "200", "code": ""}
    assert total(m, "gateway_requests_total", **ok) == 2
    assert total(m, "gateway_requests_total", tenant=tenant, model=MODEL, status="500") == 1
    assert total(m, "gateway_requests_total", status="401", code=refused_code) >= 1
    assert total(m, "gateway_auth_refusals_total", code=refused_code) >= 1
    input_sum = completion.usage.prompt_tokens + stream_usage["prompt_tokens"]
    output_sum = completion.usage.completion_tokens + stream_usage["completion_tokens"]
    assert total(m, "gateway_tokens_total", tenant=tenant, model=MODEL, type="input") == input_sum
    assert total(m, "gateway_tokens_total", tenant=tenant, model=MODEL, type="output") == output_sum
    # Token usage histograms (GenAI): one observation per forwarded request, the provider error too.
    genai = {"gen_ai_request_model": MODEL, "gen_ai_provider_name": "openai", "gen_ai_operation_name": "chat"}
    assert total(m, "gen_ai_client_token_usage_count", gen_ai_token_type="input", **genai) >= 3
    mine = [k for k in m if k[0] == "gen_ai_client_token_usage_sum" and ("gen_ai_token_type", "output") in k[1]]
    assert mine, "no output token usage series"
    assert total(m, "gen_ai_server_request_duration_seconds_count", **genai) >= 3
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count", **genai) >= 1
    assert total(m, "gen_ai_server_time_per_output_token_seconds_count", **genai) >= 1
    # Cost: exactly what the usage records (Envoy's access log lines) say.
    costs = [Decimal(gateway_log_line(stack, rid)["cost_usd"] or "0") for rid in ids]
    assert sum(costs) > 0
    assert total(m, "gateway_cost_usd_total", tenant=tenant, model=MODEL) == pytest.approx(float(sum(costs)))
    assert total(m, "gateway_stage_duration_seconds_count", stage="auth") >= 4
    assert total(m, "gateway_stage_duration_seconds_count", stage="accounting") >= 3
    assert total(m, "gateway_requests_in_flight") == 0
    assert ("gateway_open_streams", frozenset()) in m
    assert total(m, "gateway_build_info") == 1
    assert total(m, "gateway_usage_records_total") >= 4
    assert total(m, "process_resident_memory_bytes") > 10e6

    # -- traces -----------------------------------------------------------------------------------
    def server_span(spans: list[Span], rid: str) -> Span | None:
        return next((s for s in spans if s.service == SERVER and s.attributes.get("gateway.request_id") == rid), None)

    def complete(spans: list[Span]) -> bool:
        found = [server_span(spans, rid) for rid in [*ids, refused_id]]
        if not all(found):
            return False
        traces = {s.trace_id for s in found if s is not None}
        return all(any(e.service == ENVOY and e.trace_id == t for e in spans) for t in traces)

    spans = receiver.wait_for(complete)
    span = server_span(spans, ids[0])
    assert span is not None
    envoy_spans = {s.span_id: s for s in spans if s.service == ENVOY and s.trace_id == span.trace_id}
    # Envoy's ingress span, its ext_proc call (the server span's parent) and the provider call.
    assert span.parent_span_id in envoy_spans, (span.parent_span_id, list(envoy_spans))
    assert len(envoy_spans) >= 2
    attrs = span.attributes
    assert span.name == f"chat {MODEL}"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.model"] == completion.model
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert attrs["gen_ai.response.finish_reasons"] == [completion.choices[0].finish_reason]
    assert attrs["gateway.tenant"] == tenant
    assert attrs["gateway.key_id"] == vkey.id
    assert Decimal(attrs["gateway.cost_usd"]) == costs[0]
    assert span.status_code != 2  # not an error
    # The provider saw the same trace (Envoy's upstream span's context).
    upstream = [r for r in httpx.get(f"{stack.mock_url}/_mock/requests", params={"tag": tag}).json()]
    assert any(r["headers"].get("traceparent", "").split("-")[1] == span.trace_id for r in upstream)

    streamed_span = server_span(spans, stream_id)
    assert streamed_span is not None
    assert streamed_span.attributes["gen_ai.usage.output_tokens"] == stream_usage["completion_tokens"]
    assert "gateway.ttft_ms" in streamed_span.attributes
    refused_span = server_span(spans, refused_id)
    assert refused_span is not None
    assert refused_span.attributes["error.type"] == refused_code
    assert refused_span.attributes["gateway.refused_by"] == "auth"
    assert refused_span.attributes["http.response.status_code"] == 401
    failed_span = server_span(spans, failed_id)
    assert failed_span is not None
    assert failed_span.status_code == 2  # STATUS_CODE_ERROR: the provider's 500
    assert failed_span.attributes["http.response.status_code"] == 500
    # No prompt text on any span (capture_content is off).
    assert not any("hello there" in json.dumps(s.attributes) for s in spans)


def test_health_endpoints_status_and_envoy_health_check(traced: tuple[Stack, Admin, OtlpReceiver]) -> None:
    stack, _, _ = traced
    base = f"http://127.0.0.1:{stack.ports.metrics}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    status = httpx.get(f"{base}/status").json()
    assert status["store"] == "redis" and status["store_reachable"] is True and status["tracing"] is True
    out = extproc_status(base)
    assert out.returncode == 0, out.stderr
    assert "version" in out.stdout and "redis (reachable)" in out.stdout
    # Envoy's active health check of the extproc cluster reaches the gRPC health service.
    assert health_check_successes(stack, at_least=2) >= 2


def test_grpc_otlp_joins_envoy_and_server_spans(tmp_path: Path, redis_url: str) -> None:
    """The same trace over OTLP/gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc): Envoy's tracer and the
    server's exporter both switch protocol."""
    receiver = OtlpReceiver("grpc").start()
    stack, admin = make_stack(tmp_path, redis_url, extra_env=receiver.env(), sampling_ratio=1.0)
    stack.start()
    try:
        key, _ = admin.key("grpc-otlp", "k")
        resp = openai_client(stack, key).chat.completions.with_raw_response.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
        rid = resp.headers["x-gateway-request-id"]

        def joined(spans: list[Span]) -> bool:
            mine = [s for s in spans if s.service == SERVER and s.attributes.get("gateway.request_id") == rid]
            return bool(mine) and any(s.service == ENVOY and s.span_id == mine[0].parent_span_id for s in spans)

        receiver.wait_for(joined)
    finally:
        stack.stop()
        receiver.stop()


def test_readyz_and_health_check_follow_redis_in_fail_closed_mode(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.e2e.test_accounting_outages import RedisServer, poll

    workdir = tmp_path_factory.mktemp("readyz")
    redis = RedisServer(workdir / "redis")
    redis.start()
    stack, _ = make_stack(workdir / "stack", redis.url, overrides={"auth": {"failure_mode": "closed"}})
    stack.start()
    base = f"http://127.0.0.1:{stack.ports.metrics}"
    admin = f"http://127.0.0.1:{stack.ports.admin}"

    def extproc_host_flags() -> str:
        clusters = httpx.get(f"{admin}/clusters").text
        return " ".join(
            line for line in clusters.splitlines() if line.startswith("extproc::") and "health_flags" in line
        )

    try:
        assert httpx.get(f"{base}/readyz").status_code == 200
        redis.kill()
        poll("readyz 503", lambda: httpx.get(f"{base}/readyz").status_code == 503, timeout=10)
        reasons = httpx.get(f"{base}/readyz").json()["reasons"]
        assert any("store unreachable" in why for why in reasons), reasons
        assert httpx.get(f"{base}/healthz").status_code == 200  # alive: no restart for a Redis outage
        out = extproc_status(base)
        assert out.returncode == 3 and "redis (UNREACHABLE)" in out.stdout, out.stdout
        poll("Envoy marks the server unhealthy", lambda: "failed_active_hc" in extproc_host_flags(), timeout=15)
        redis.start()
        poll("readyz 200", lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout=15)
        poll("Envoy marks it healthy", lambda: "failed_active_hc" not in extproc_host_flags(), timeout=15)
        m = scrape(stack)
        assert total(m, "gateway_redis_errors_total") >= 1
    finally:
        stack.stop()
        redis.stop()


def test_dashboard_queries_only_metrics_a_real_scrape_has(traced: tuple[Stack, Admin, OtlpReceiver]) -> None:
    stack, admin, _ = traced
    key, _ = admin.key("dash", "k")
    openai_client(stack, key).chat.completions.create(model=MODEL, messages=MSGS, stream=False)  # type: ignore[arg-type]
    families: set[str] = set()
    names = {name for name, _ in scrape(stack, families)}
    envoy_text = httpx.get(f"http://127.0.0.1:{stack.ports.admin}/stats/prometheus").text
    envoy_names = {line.split("{")[0].split(" ")[0] for line in envoy_text.splitlines() if line and line[0] != "#"}
    queried = dashboard_metric_names(ROOT / "observability" / "grafana" / "dashboards" / "llm-gateway.json")
    # A family without samples yet (no refusal, no redaction so far) is declared all the same.
    missing = sorted(q for q in queried if q not in names and q not in envoy_names and _family(q) not in families)
    assert not missing, f"the dashboard queries metrics no scrape has: {missing}"


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_captured_content_is_redacted_even_when_the_client_gets_values_back(tmp_path: Path, redis_url: str) -> None:
    """capture_content with PII in restore mode: the client reads its e-mail address back; the
    span holds the placeholder sent to the provider and a masked answer, never the address."""
    receiver = OtlpReceiver("http/protobuf").start()
    overrides = {
        "tracing": {"sampling_ratio": 1.0, "capture_content": True},
        "pii": {"action": "restore", "responses": "restore"},
    }
    stack, admin = make_stack(tmp_path, redis_url, overrides=overrides, extra_env=receiver.env(), sampling_ratio=1.0)
    stack.start()
    try:
        key, _ = admin.key("capture", "k")
        email = "jane.doe@corp-mail.net"
        resp = openai_client(stack, key).chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"write to {email} please"}],
            extra_headers={"x-mock-echo": "1"},
        )
        assert email in (resp.parse().choices[0].message.content or "")  # restored for the client
        rid = resp.headers["x-gateway-request-id"]

        def captured(spans: list[Span]) -> bool:
            return any(s.attributes.get("gateway.request_id") == rid for s in spans)

        span = next(s for s in receiver.wait_for(captured) if s.attributes.get("gateway.request_id") == rid)
        prompt = json.loads(span.attributes["gen_ai.input.messages"])
        assert prompt["messages"][0]["content"] == "write to [EMAIL_1] please"
        answer = json.loads(span.attributes["gen_ai.output.messages"])
        assert answer[0]["role"] == "assistant" and "write to" in answer[0]["parts"][0]["content"]
        assert email not in json.dumps(span.attributes)
    finally:
        stack.stop()
        receiver.stop()
