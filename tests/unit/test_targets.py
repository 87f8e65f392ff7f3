"""Models with targets: config validation, routing, the per-attempt processor and stage, the
targets stage, and `extproc check` against envoy.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.protobuf import struct_pb2

from extproc import envoyconf
from extproc.auth.credentials import load_provider_auth
from extproc.config import ConfigError, load_config, parse_config
from extproc.pipeline import RequestContext
from extproc.processor import AttemptProcessor, target_of
from extproc.routing import Router
from extproc.stages import attempt_stage
from extproc.stages.targets import TargetsStage
from extproc.wire import external_processor_pb2 as ep

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = {"openai": {"schema": "openai"}, "anthropic": {"schema": "anthropic"}}
SMART = {
    "name": "smart",
    "targets": [
        {"provider": "openai", "upstream": "gpt-5.5", "first_byte_timeout": "1500ms"},
        {
            "provider": "anthropic",
            "upstream": "claude-sonnet-5-5",
            "priority": 2,
            "weight": 3,
            "first_byte_timeout": 1.5,
        },
    ],
}
CONFIG = parse_config({"providers": PROVIDERS, "models": [SMART, {"name": "gpt-5.5", "provider": "openai"}]})


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ({**SMART, "provider": "openai"}, "either 'provider'"),
        ({"name": "x"}, "'provider' (or 'targets') is required"),
        ({"name": "x", "targets": []}, "at least one target"),
        ({"name": "x/*", "targets": SMART["targets"]}, "wildcard"),
        ({"name": "x", "targets": [SMART["targets"][0], SMART["targets"][0]]}, "listed twice"),
        ({"name": "x", "targets": [{"provider": "nope", "upstream": "m"}]}, "unknown provider 'nope'"),
        ({"name": "x", "targets": [{"provider": "openai", "upstream": "m", "first_byte_timeout": "soon"}]}, "duration"),
        (
            {"name": "x", "targets": [{"provider": "openai", "upstream": "m", "priority": 0}]},
            "models.0.targets.0.priority",
        ),
    ],
)
def test_bad_targets_are_refused_with_the_path(model: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": PROVIDERS, "models": [model]})
    assert error in str(info.value)


def test_router_orders_targets_and_names_the_one_that_answered() -> None:
    route = Router(CONFIG).resolve("smart")
    assert route is not None
    assert [(t.key, t.priority, t.weight, t.first_byte_timeout) for t in route.targets] == [
        ("openai/gpt-5.5", 1, 1, 1.5),
        ("anthropic/claude-sonnet-5-5", 2, 3, 1.5),
    ]
    answered = route.answered_by("anthropic/claude-sonnet-5-5")
    assert answered is not None
    assert (answered.provider, answered.schema, answered.upstream_model) == (
        "anthropic",
        "anthropic",
        "claude-sonnet-5-5",
    )
    assert route.answered_by("openai/other") is None


# -- the per-attempt processor ----------------------------------------------------------------------


def host_metadata(target: str) -> str:
    """What Envoy 1.40 sends for `xds.upstream_host_metadata` (text format of core.Metadata)."""
    return (
        'filter_metadata { key: "envoy.transport_socket_match" value { fields { key: "tls" value { string_value: '
        '"openai" } } } } filter_metadata { key: "gateway" value { fields { key: "target" value { string_value: '
        f'"{target}" }} }} }} }}'
    )


def headers_msg(path: str, target: str, **headers: str) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    hm = req.request_headers.headers
    for k, v in {":method": "POST", ":path": path, "content-type": "application/json", **headers}.items():
        h = hm.headers.add()
        h.key, h.raw_value = k, v.encode()
    attrs = struct_pb2.Struct()
    attrs.fields["xds.upstream_host_metadata"].string_value = host_metadata(target)
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


def body_msg(body: dict[str, Any]) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    req.request_body.body = orjson.dumps(body)
    req.request_body.end_of_stream = True
    return req


def test_target_of_reads_envoys_text_metadata() -> None:
    assert (
        target_of(headers_msg("/v1/chat/completions", "anthropic/claude-sonnet-5-5")) == "anthropic/claude-sonnet-5-5"
    )
    assert target_of(ep.ProcessingRequest()) == ""


def mutation(common: ep.CommonResponse) -> tuple[dict[str, str], list[str]]:
    sets = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    return sets, list(common.header_mutation.remove_headers)


@pytest.fixture
def provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")


async def test_an_attempt_is_rewritten_for_its_target(provider_env: None) -> None:
    config = parse_config(
        {
            "providers": {
                "openai": {"schema": "openai", "api_key_env": "OPENAI_API_KEY"},
                "anthropic": {"schema": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
            },
            "models": [SMART],
        }
    )
    stage = attempt_stage(config, load_provider_auth(config))
    assert stage is not None
    proc = AttemptProcessor(stage)
    r1 = await proc.handle(
        headers_msg("/v1/chat/completions", "anthropic/claude-sonnet-5-5", **{"user-agent": "sdk", "x-secret": "no"})
    )
    assert r1 is not None and mutation(r1.request_headers.response)[1] == ["content-length"]
    body = {"model": "smart", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r2 = await proc.handle(body_msg(body))
    assert r2 is not None and proc.done
    common = r2.request_body.response
    sent = orjson.loads(common.body_mutation.body)
    assert sent == {
        "model": "claude-sonnet-5-5",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4096,
        "stream": True,
    }
    sets, removed = mutation(common)
    assert sets[":path"] == "/v1/messages"
    assert sets["x-api-key"] == "sk-ant-test" and sets["anthropic-version"]
    assert "x-secret" in removed and "user-agent" not in removed
    length = r2.dynamic_metadata.fields["gateway"].struct_value.fields["content_length"].string_value
    assert length == str(len(common.body_mutation.body))


async def test_an_openai_stream_attempt_asks_for_usage(provider_env: None) -> None:
    stage = attempt_stage(CONFIG, load_provider_auth(CONFIG))
    assert stage is not None
    proc = AttemptProcessor(stage)
    await proc.handle(headers_msg("/v1/messages", "openai/gpt-5.5", **{"anthropic-version": "2023-06-01"}))
    r2 = await proc.handle(
        body_msg({"model": "smart", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    )
    assert r2 is not None
    sent = orjson.loads(r2.request_body.response.body_mutation.body)
    assert sent["model"] == "gpt-5.5" and sent["stream_options"] == {"include_usage": True}
    assert sent["max_completion_tokens"] == 9
    sets, removed = mutation(r2.request_body.response)
    assert sets[":path"] == "/v1/chat/completions" and "anthropic-version" in removed


@pytest.mark.parametrize(
    ("target", "body", "status", "code"),
    [
        (
            "anthropic/claude-sonnet-5-5",
            {"model": "smart", "messages": [{"role": "user", "content": "x"}], "n": 2},
            400,
            "unsupported_parameter",
        ),
        ("openai/not-a-target", {"model": "smart", "messages": []}, 500, "target_mismatch"),
        ("openai/gpt-5.5", {"model": "unknown", "messages": []}, 500, "target_mismatch"),
    ],
)
async def test_a_refused_attempt_answers_in_the_clients_schema_and_says_so(
    target: str, body: dict[str, Any], status: int, code: str
) -> None:
    stage = attempt_stage(CONFIG, load_provider_auth(CONFIG))
    assert stage is not None
    proc = AttemptProcessor(stage)
    await proc.handle(headers_msg("/v1/chat/completions", target))
    r2 = await proc.handle(body_msg(body))
    assert r2 is not None and proc.done
    ir = r2.immediate_response
    assert ir.status.code == status
    assert orjson.loads(ir.body)["error"]["code"] == code
    assert {h.header.key: h.header.raw_value for h in ir.headers.set_headers}[
        "x-gateway-attempt-refused"
    ] == code.encode()


# -- the targets stage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "provider", "attempts", "note"),
    [
        ({"x-gateway-target": "anthropic/claude-sonnet-5-5", "x-gateway-attempts": "2"}, "anthropic", 2, None),
        ({"x-gateway-target": "openai/gpt-5.5", "x-gateway-attempts": "1"}, "openai", 1, None),
        ({"x-gateway-target": "openai/gpt-5.5"}, "openai", 1, None),
        ({"x-gateway-target": "nobody/x", "x-gateway-attempts": "3"}, "", 3, None),
        ({"x-gateway-attempts": "99999"}, "", 0, None),
        ({"x-gateway-target": "anthropic/claude-sonnet-5-5", "x-gateway-attempt-refused": "x"}, "", 0, "refused"),
    ],
)
async def test_targets_stage_names_the_target_that_answered(
    headers: dict[str, str], provider: str, attempts: int, note: str | None
) -> None:
    ctx = RequestContext()
    ctx.route = Router(CONFIG).resolve("smart")
    ctx.response_status = 200
    ctx.response_headers = {"content-type": "application/json", **headers}
    await TargetsStage().response_headers(ctx)
    assert ctx.route is not None and ctx.route.provider == provider
    assert ctx.attempts == attempts
    assert set(ctx.remove_headers) == set(headers)
    assert ctx.notes.get("targets") == note


# -- extproc check -------------------------------------------------------------------------------


def shipped() -> dict[str, Any]:
    return envoyconf.load(ROOT / "envoy" / "envoy.yaml")


def test_shipped_configs_agree_on_targets() -> None:
    assert envoyconf.check(load_config(ROOT / "gateway.yaml"), shipped()) == []


def _smart(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    route = envoyconf.target_routes(cfg)["smart"]
    return route, envoyconf.clusters(cfg)["targets-smart"]


def _gateway(**target_changes: Any) -> Any:
    data = {"providers": PROVIDERS, "models": [copy.deepcopy(SMART)]}
    for t in data["models"][0]["targets"]:  # type: ignore[index]
        t["first_byte_timeout"] = "30s"
    data["models"][0]["targets"][1].update(target_changes)  # type: ignore[index]
    return parse_config(data)


def test_check_finds_a_weight_or_priority_that_differs() -> None:
    problems = envoyconf.check(_gateway(weight=3), shipped())
    assert len(problems) == 1 and "cluster 'targets-smart' endpoints" in problems[0]


def _inner_action(cfg: dict[str, Any], listener: str) -> dict[str, Any]:
    for lst in cfg["static_resources"]["listeners"]:
        if lst["name"] == listener:
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            action: dict[str, Any] = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
            return action
    raise AssertionError(listener)


def test_check_finds_a_first_byte_timeout_that_differs_per_target() -> None:
    cfg = shipped()
    _inner_action(cfg, "target-smart-2")["retry_policy"]["per_try_timeout"] = "5s"
    problems = envoyconf.check(_gateway(weight=1), cfg)
    assert len(problems) == 1 and "'target-smart-2' per_try_timeout is '5s'" in problems[0]
    # Different timeouts per target are fine when envoy.yaml says the same.
    assert envoyconf.check(_gateway(weight=1, first_byte_timeout=5), cfg) == []


def test_check_finds_a_target_sent_to_the_wrong_cluster_and_a_missing_filter() -> None:
    cfg = shipped()
    _inner_action(cfg, "target-smart-1")["cluster"] = "anthropic"
    _, cluster = _smart(cfg)
    cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "http_filters"
    ] = []
    problems = envoyconf.check(_gateway(weight=1), cfg)
    assert any("sends target openai/gpt-5.5 to cluster 'anthropic'" in p for p in problems)
    assert any("per-attempt ext_proc filter" in p for p in problems)


def test_check_finds_a_target_without_its_internal_listener() -> None:
    cfg = shipped()
    cfg["static_resources"]["listeners"] = [
        lst for lst in cfg["static_resources"]["listeners"] if lst["name"] != "target-smart-2"
    ]
    problems = envoyconf.check(_gateway(weight=1), cfg)
    assert problems == [
        "model 'smart': target anthropic/claude-sonnet-5-5 is not an internal listener defined in envoy.yaml"
    ]


def test_check_finds_a_model_without_a_route() -> None:
    cfg = shipped()
    route, _ = _smart(cfg)
    route["match"]["headers"][0]["string_match"]["exact"] = "other"
    assert envoyconf.check(_gateway(weight=1), cfg) == [
        "model 'smart': no route in envoy.yaml matches header x-gateway-targets: smart"
    ]


def test_derived_config_keeps_targets_on_their_provider_clusters() -> None:
    """The internal listeners forward to the provider clusters, which the derived config puts on
    the mock: the target cluster itself is unchanged, and only client listeners are re-addressed."""
    shipped_cfg = shipped()
    derived = envoyconf.derive_local(shipped_cfg, envoyconf.LocalPorts(mock=18080))
    assert _smart(derived)[1] == _smart(shipped_cfg)[1]
    assert envoyconf.internal_routes(derived) == envoyconf.internal_routes(shipped_cfg)
    openai = envoyconf.clusters(derived)["openai"]
    addr = openai["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "127.0.0.1", "port_value": 18080}
    assert envoyconf._has_attempt_filter(_smart(derived)[1])


async def test_an_attempt_refuses_an_integer_it_could_not_forward_unchanged() -> None:
    """The attempt re-serializes the body for its target: like the downstream processor, it
    refuses an integer beyond 64 bits (orjson would turn it into a float) instead of sending it."""
    stage = attempt_stage(CONFIG, load_provider_auth(CONFIG))
    assert stage is not None
    proc = AttemptProcessor(stage)
    await proc.handle(headers_msg("/v1/chat/completions", "openai/gpt-5.5"))
    req = ep.ProcessingRequest()
    req.request_body.body = (
        b'{"model":"smart","messages":[{"role":"user","content":"x"}],"seed":123456789012345678901234567890}'
    )
    req.request_body.end_of_stream = True
    resp = await proc.handle(req)
    assert resp is not None and resp.immediate_response.status.code == 400
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "invalid_json"
