"""Fallback across a model's targets and weighted targets, end to end: real Envoy makes the
attempts (retry policy and priorities on the model's target cluster), the server's per-attempt
filter rewrites each one for its target, and the answer reaches both SDKs in their own schema.

The stack runs the shipped envoy.yaml with three models of targets: `smart` (shipped: OpenAI
first, Claude second; first_byte_timeout 1 s here), `guarded` (its first target's endpoint is a
closed port: connection refused) and `spread` (two OpenAI targets of one priority, weights 1:3).
The mock fails only the model named by x-mock-only-model, so one target fails and the next answers."""

from __future__ import annotations

import copy
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import yaml

from extproc.accounting.record import UsageRecord
from extproc.devstack import Stack
from tests.e2e.conftest import (
    Admin,
    Mock,
    access_log_lines,
    anthropic_client,
    grown,
    ledger_records,
    make_stack,
    openai_client,
    scrape,
    series,
    usage_record,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MSGS: list[Any] = [{"role": "user", "content": "say something nice"}]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_config(workdir: Path) -> Path:
    """The shipped envoy.yaml plus routes, target clusters and internal listeners for `guarded`
    and `spread`, copied from smart's the way ops would; smart's first target's first-byte timeout
    at 1 s (its second keeps 30 s: the timeouts are per target)."""
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    listeners = cfg["static_resources"]["listeners"]
    hcm = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    clusters = cfg["static_resources"]["clusters"]
    smart_route = next(r for r in routes if r.get("name") == "targets-smart")
    smart_cluster = next(c for c in clusters if c["name"] == "targets-smart")
    inner = {lst["name"]: lst for lst in listeners if "internal_listener" in lst}

    def inner_route(listener: dict[str, Any]) -> dict[str, Any]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return dict(hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"])

    inner_route(inner["target-smart-1"])  # the shape is as expected
    inner["target-smart-1"]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0][
        "routes"
    ][0]["route"]["retry_policy"]["per_try_timeout"] = "1s"

    def add(model: str, endpoints: list[tuple[int, int, str, str]]) -> None:
        """endpoints: (priority, weight, target key, the cluster its internal listener uses)."""
        route = copy.deepcopy(smart_route)
        route["name"] = f"targets-{model}"
        route["match"]["headers"][0]["string_match"]["exact"] = model
        route["route"]["cluster"] = f"targets-{model}"
        cluster = copy.deepcopy(smart_cluster)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"targets-{model}"
        groups: dict[int, list[Any]] = {}
        for n, (priority, weight, target, upstream) in enumerate(endpoints, 1):
            name = f"target-{model}-{n}"
            listener = copy.deepcopy(inner["target-smart-1"])
            listener["name"] = name
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["stat_prefix"] = name
            action = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
            action["cluster"] = upstream
            action["retry_policy"]["per_try_timeout"] = "30s"
            listeners.append(listener)
            groups.setdefault(priority, []).append(
                {
                    "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": name}}},
                    "load_balancing_weight": weight,
                    "metadata": {"filter_metadata": {"gateway": {"target": target}}},
                }
            )
        cluster["load_assignment"]["endpoints"] = [{"priority": p, "lb_endpoints": eps} for p, eps in groups.items()]
        routes.insert(routes.index(smart_route) + 1, route)
        clusters.append(cluster)

    # guarded's first target goes to a cluster on a closed port: connection refused.
    closed = {
        "name": "closed",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "closed",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": closed_port()}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    clusters.append(closed)
    add("guarded", [(0, 1, "openai/gpt-5.4-mini", "closed"), (1, 1, "anthropic/claude-haiku-5-5", "anthropic")])
    add("spread", [(0, 1, "openai/gpt-5.5", "openai"), (0, 3, "openai/gpt-5.4-mini", "openai")])
    # smart's failing target answers again in the next test: it must not be ejected meanwhile
    # (guarded keeps the shipped outlier detection and checks the ejection).
    smart_cluster["outlier_detection"] = {"consecutive_5xx": 1000, "consecutive_gateway_failure": 1000}
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


MODELS = [
    {
        "name": "smart",
        "targets": [
            {"provider": "openai", "upstream": "gpt-5.5", "first_byte_timeout": "1s"},
            {"provider": "anthropic", "upstream": "claude-sonnet-5-5", "priority": 2, "first_byte_timeout": "30s"},
        ],
    },
    {
        "name": "guarded",
        "targets": [
            {"provider": "openai", "upstream": "gpt-5.4-mini", "first_byte_timeout": 30},
            {"provider": "anthropic", "upstream": "claude-haiku-5-5", "priority": 2, "first_byte_timeout": 30},
        ],
    },
    {
        "name": "spread",
        "targets": [
            {"provider": "openai", "upstream": "gpt-5.5", "weight": 1, "first_byte_timeout": 30},
            {"provider": "openai", "upstream": "gpt-5.4-mini", "weight": 3, "first_byte_timeout": 30},
        ],
    },
]


@dataclass
class Env:
    stack: Stack
    admin: Admin
    key: str
    mock: Mock

    def oai(self, tag: str) -> openai.OpenAI:
        return openai_client(self.stack, self.key, tag)

    def claude(self, tag: str) -> anthropic.Anthropic:
        return anthropic_client(self.stack, self.key, tag)

    def record(self, request_id: str) -> UsageRecord:
        return usage_record(self.admin.config, request_id)

    def _all(self) -> list[UsageRecord]:
        return ledger_records(self.admin.config)

    def upstream(self, tag: str) -> list[tuple[str, str, int | None]]:
        """Each attempt the provider saw: (path, model, status)."""
        return [(r["path"], orjson.loads(r["body"])["model"], r["status"]) for r in self.mock.requests(tag)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("fallback")
    base = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    models = [m for m in base["models"] if m["name"] != "smart"] + MODELS
    stack, admin = make_stack(work, None, overrides={"models": models}, envoy_config=envoy_config(work))
    key, _ = admin.key("fallback", "k")
    stack.start()
    try:
        yield Env(stack, admin, key, Mock(stack.mock_url))
    finally:
        stack.stop()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def fail_first(status: int | None = None, **more: str) -> dict[str, str]:
    hdrs = {"x-mock-only-model": "gpt-5.5", **more}
    if status is not None:
        hdrs["x-mock-status"] = str(status)
    return hdrs


def test_first_target_answers_when_healthy(env: Env, tag: str) -> None:
    raw = env.oai(tag).chat.completions.with_raw_response.create(model="smart", messages=MSGS)
    r = raw.parse()
    assert r.choices[0].message.content
    assert env.upstream(tag) == [("/v1/chat/completions", "gpt-5.5", 200)]
    assert "x-gateway-target" not in raw.headers and "x-gateway-attempts" not in raw.headers
    rec = env.record(raw.headers["x-gateway-request-id"])
    assert (rec.model, rec.provider, rec.upstream_model, rec.attempts) == ("smart", "openai", "gpt-5.5", 1)


@pytest.mark.parametrize("status", [503, 429, 500])
def test_a_failing_first_target_falls_back_translated(env: Env, tag: str, status: int) -> None:
    """OpenAI SDK: the OpenAI target fails, Claude answers, translated to the OpenAI schema."""
    raw = env.oai(tag).chat.completions.with_raw_response.create(
        model="smart", messages=MSGS, extra_headers=fail_first(status, **{"x-mock-output-tokens": "4"})
    )
    r = raw.parse()
    assert r.object == "chat.completion" and r.choices[0].message.content == "The quick brown fox"
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert env.upstream(tag) == [
        ("/v1/chat/completions", "gpt-5.5", status),
        ("/v1/messages", "claude-sonnet-5-5", 200),
    ]
    second = env.mock.requests(tag)[1]["headers"]
    assert second["x-api-key"] and "authorization" not in second and second["anthropic-version"]
    rec = env.record(raw.headers["x-gateway-request-id"])
    assert (rec.provider, rec.upstream_model, rec.attempts, rec.status) == ("anthropic", "claude-sonnet-5-5", 2, 200)
    assert rec.output_tokens == 4 and not rec.estimated
    # Envoy logged both attempts: the failed one and the one that answered.
    rid = raw.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while len(attempts := access_log_lines(env.stack, lambda x: x["request_id"] == rid, attempts=True)) < 2:
        assert time.monotonic() < deadline, attempts
        time.sleep(0.1)
    assert [(a["target"], int(a["status"])) for a in attempts] == [
        ("openai/gpt-5.5", status),
        ("anthropic/claude-sonnet-5-5", 200),
    ]


def test_fallback_stream_works_with_the_stream_helper(env: Env, tag: str) -> None:
    with env.oai(tag).chat.completions.stream(
        model="smart",
        messages=MSGS,
        stream_options={"include_usage": True},
        extra_headers=fail_first(503, **{"x-mock-output-tokens": "5"}),
    ) as s:
        text = "".join(e.delta for e in s if e.type == "content.delta")
        final = s.get_final_completion()
    assert text == "The quick brown fox jumps"
    assert final.usage is not None and final.usage.completion_tokens == 5
    assert [p for p, _, _ in env.upstream(tag)] == ["/v1/chat/completions", "/v1/messages"]


def test_anthropic_sdk_falls_back_from_a_translated_target_to_its_own_schema(env: Env, tag: str) -> None:
    raw = env.claude(tag).messages.with_raw_response.create(
        model="smart", max_tokens=50, messages=MSGS, extra_headers=fail_first(503)
    )
    msg = raw.parse()
    assert msg.type == "message" and msg.content[0].type == "text"
    attempts = env.mock.requests(tag)
    assert [(a["path"], orjson.loads(a["body"]).get("max_completion_tokens")) for a in attempts] == [
        ("/v1/chat/completions", 50),  # translated for the OpenAI target
        ("/v1/messages", None),  # the client's own schema for the Anthropic one
    ]
    assert "authorization" in attempts[0]["headers"] and "x-api-key" in attempts[1]["headers"]
    assert env.record(raw.headers["x-gateway-request-id"]).provider == "anthropic"


def test_a_slow_first_byte_falls_back(env: Env, tag: str) -> None:
    started = time.monotonic()
    r = env.oai(tag).chat.completions.create(
        model="smart", messages=MSGS, extra_headers=fail_first(None, **{"x-mock-latency-ms": "3000"})
    )
    elapsed = time.monotonic() - started
    assert r.choices[0].message.content
    assert [m for _, m, _ in env.upstream(tag)] == ["gpt-5.5", "claude-sonnet-5-5"]
    assert elapsed < 2.8, f"the per-try timeout (1 s) did not cut the slow target: {elapsed:.1f}s"


def test_first_byte_timeouts_are_per_target(env: Env, tag: str) -> None:
    """Both targets take 2 s to answer: the first (first_byte_timeout 1 s) is cut, the second
    (30 s) is waited for."""
    started = time.monotonic()
    raw = env.oai(tag).chat.completions.with_raw_response.create(
        model="smart",
        messages=MSGS,
        extra_headers={"x-mock-only-model": "gpt-5.5,claude-sonnet-5-5", "x-mock-latency-ms": "2000"},
    )
    elapsed = time.monotonic() - started
    assert raw.parse().choices[0].message.content
    assert [m for _, m, _ in env.upstream(tag)] == ["gpt-5.5", "claude-sonnet-5-5"]
    assert 2.5 < elapsed < 5, elapsed
    assert env.record(raw.headers["x-gateway-request-id"]).provider == "anthropic"


def test_a_connection_refusal_falls_back_and_the_dead_target_is_ejected(env: Env, tag: str) -> None:
    seen: list[int] = []
    for _ in range(6):
        raw = env.oai(tag).chat.completions.with_raw_response.create(model="guarded", messages=MSGS)
        assert raw.parse().choices[0].message.content
        seen.append(env.record(raw.headers["x-gateway-request-id"]).attempts)
    # Every answer came from the second target, translated; the refused one never saw a byte.
    assert {m for _, m, _ in env.upstream(tag)} == {"claude-haiku-5-5"}
    assert seen[0] == 2, seen
    # Outlier detection ejects the refusing endpoint: later requests go straight to the next.
    assert seen[-1] == 1, seen


def test_a_mid_stream_failure_is_not_retried(env: Env, tag: str) -> None:
    """The first target's stream breaks after it started: the client gets the error (a 502 when
    the break beats the response headers to the client, else a broken stream), never a second
    answer spliced in."""
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        stream = env.oai(tag).chat.completions.create(
            model="smart",
            messages=MSGS,
            stream=True,
            extra_headers=fail_first(None, **{"x-mock-fail-after": "3", "x-mock-output-tokens": "8"}),
        )
        for _ in stream:
            pass
    assert [m for _, m, _ in env.upstream(tag)] == ["gpt-5.5"]


def test_weights_spread_load_among_targets_of_one_priority(env: Env, tag: str) -> None:
    client = env.oai(tag)
    for _ in range(80):
        client.chat.completions.create(model="spread", messages=MSGS)
    counts = Counter(m for _, m, _ in env.upstream(tag))
    assert sum(counts.values()) == 80
    # Weights 1:3 -> 20:60 expected; round-robin with weights is close to exact.
    assert 10 <= counts["gpt-5.5"] <= 30 and counts["gpt-5.4-mini"] >= 50, counts


def test_untranslatable_for_a_fallback_target_is_refused_clearly(env: Env, tag: str) -> None:
    """n=2 is fine for the OpenAI target; when it fails, the Claude target cannot take it."""
    with pytest.raises(openai.BadRequestError) as info:
        env.oai(tag).chat.completions.create(model="smart", messages=MSGS, n=2, extra_headers=fail_first(503))
    assert info.value.code == "unsupported_parameter" and info.value.param == "n"
    assert env.upstream(tag) == [("/v1/chat/completions", "gpt-5.5", 503)]


def test_metrics_count_attempts_fallbacks_and_translations(env: Env, tag: str) -> None:
    before = scrape(env.stack)
    env.oai(tag).chat.completions.create(model="smart", messages=MSGS, extra_headers=fail_first(503))
    env.oai(tag).chat.completions.create(model="smart", messages=MSGS)
    claude = "anthropic/claude-sonnet-5-5"
    want: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
        series("gateway_fallbacks_total", model="smart", target=claude): 1,
        series("gateway_target_attempts_total", model="smart", target=claude): 2,
        series("gateway_target_attempts_total", model="smart", target="openai/gpt-5.5"): 1,
        series("gateway_translations_total", pair="openai->anthropic"): 1,
    }
    assert grown(env.stack, before, want) == want
