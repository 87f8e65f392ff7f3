"""Routing decisions and refusals, observed at the client and at the provider."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from extproc.devstack import Stack
from tests.e2e.conftest import Mock, access_log

pytestmark = pytest.mark.e2e
MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
A_MSGS: list[MessageParam] = [{"role": "user", "content": "hello"}]


def test_alias_rewrites_body_and_keeps_everything_else(oai: openai.OpenAI, mock: Mock, tag: str, stack: Stack) -> None:
    sent: dict[str, Any] = {
        "model": "fast",
        "messages": [{"role": "user", "content": "ünïcödé \u2028 and a long tail " * 50}],
        "temperature": 0.25,
        "max_tokens": 100,
        "user": "u-1",
        "metadata": {"nested": [1, 2.5, None, True]},
    }
    raw = oai.chat.completions.with_raw_response.create(**sent)
    assert raw.parse().model == "gpt-5.4-mini"  # the provider's answer is passed through unchanged
    seen = mock.one(tag)
    received = orjson.loads(seen["body"])
    assert received == {**sent, "model": "gpt-5.4-mini"}
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())
    log = access_log(stack, seen["headers"]["x-request-id"])
    assert (log["provider"], log["model"], log["upstream_model"], log["status"]) == (
        "openai",
        "fast",
        "gpt-5.4-mini",
        200,
    )


def test_anthropic_alias_and_wildcard(claude: anthropic.Anthropic, oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    claude.messages.create(model="sonnet", max_tokens=10, messages=A_MSGS)
    oai.chat.completions.create(model="openai/gpt-5-nano", messages=MSGS)
    models = [orjson.loads(r["body"])["model"] for r in mock.requests(tag)]
    assert models == ["claude-sonnet-5-5", "gpt-5-nano"]


def test_unknown_model_is_404_in_each_schema(
    oai: openai.OpenAI, claude: anthropic.Anthropic, mock: Mock, tag: str
) -> None:
    with pytest.raises(openai.NotFoundError) as e1:
        oai.chat.completions.create(model="gpt-nonexistent", messages=MSGS)
    assert e1.value.code == "model_not_found"
    assert e1.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as e2:
        claude.messages.create(model="claude-nonexistent", max_tokens=5, messages=A_MSGS)
    assert e2.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert mock.requests(tag) == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "gpt-5.5", "messages": [', "invalid_json"),
        (b"", "empty_body"),
        (b'"just a string"', "invalid_json"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b"\xff\xfe garbage", "invalid_json"),
    ],
)
def test_bad_bodies_are_400_and_never_forwarded(
    raw: httpx.Client, mock: Mock, tag: str, body: bytes, code: str
) -> None:
    r = raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    assert r.headers["x-request-id"]
    assert mock.requests(tag) == []


def test_unknown_path(raw: httpx.Client, mock: Mock, tag: str) -> None:
    r = raw.post("/v1/images/generations", json={"model": "gpt-5.5", "prompt": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_endpoint")
    assert mock.requests(tag) == []


def test_forged_routing_headers_change_nothing(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    forged = {"x-gateway-provider": "anthropic", "x-gateway-model": "evil", "x-gateway-tenant": "admin"}
    r = oai.chat.completions.create(model="gpt-5.5", messages=MSGS, extra_headers=forged)
    assert r.object == "chat.completion"
    seen = mock.one(tag)
    assert seen["path"] == "/v1/chat/completions"
    assert orjson.loads(seen["body"])["model"] == "gpt-5.5"
    assert not [h for h in seen["headers"] if h.startswith("x-gateway-")], "internal headers must not reach providers"


def test_provider_errors_pass_through_in_provider_format(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(openai.InternalServerError) as e500:
        oai.chat.completions.create(model="gpt-5.5", messages=MSGS, extra_headers={"x-mock-status": "500"})
    assert e500.value.status_code == 500 and e500.value.body["type"] == "server_error"  # type: ignore[index]
    with pytest.raises(openai.RateLimitError) as e429:
        oai.chat.completions.create(
            model="gpt-5.5",
            messages=MSGS,
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "7"},
        )
    assert e429.value.response.headers["retry-after"] == "7"
    assert e429.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as a429:
        claude.messages.create(model="sonnet", max_tokens=5, messages=A_MSGS, extra_headers={"x-mock-status": "429"})
    assert a429.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as a529:
        claude.messages.create(model="sonnet", max_tokens=5, messages=A_MSGS, extra_headers={"x-mock-status": "529"})
    assert a529.value.status_code == 529 and a529.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_long_prompt_fits_and_oversized_body_is_413(raw: httpx.Client, mock: Mock, tag: str) -> None:
    big = "word " * (5 * 1024 * 1024 // 5)  # ~5 MiB prompt
    r = raw.post("/v1/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 200, r.text[:300]
    assert orjson.loads(mock.one(tag)["body"])["messages"][0]["content"] == big
    r = raw.post(
        "/v1/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": "x" * 20_000_000}]}
    )
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "gateway_error"
    assert r.json()["error"]["code"] == "request_payload_too_large"
    assert len(mock.requests(tag)) == 1


def test_clients_cannot_steer_envoy_retries_or_timeouts(raw: httpx.Client, mock: Mock, tag: str) -> None:
    body = {"model": "gpt-5.5", "messages": MSGS}
    steer = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "5", "x-envoy-upstream-rq-timeout-ms": "1"}
    r = raw.post("/v1/chat/completions", json=body, headers={**steer, "x-mock-status": "500"})
    assert r.status_code == 500
    assert len(mock.requests(tag)) == 1, "a client header must not multiply upstream attempts"
    r = raw.post("/v1/chat/completions", json=body, headers={**steer, "x-mock-latency-ms": "50"})
    assert r.status_code == 200


def test_paths_are_normalized_before_the_gateway_sees_them(raw: httpx.Client, mock: Mock, tag: str) -> None:
    body = {"model": "gpt-5.5", "messages": MSGS}
    assert raw.post("/v1//chat/./completions?trace=1", json=body).status_code == 200
    assert mock.one(tag)["path"] == "/v1/chat/completions"
    r = raw.post("/v1%2Fchat/completions", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "path_normalization_failed")
    r = raw.post("/v1/chat/completions/../../v1/embeddings", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_endpoint")
    assert len(mock.requests(tag)) == 1


def test_a_provider_stream_broken_midway_reaches_the_client_as_an_error(
    oai: openai.OpenAI, stack: Stack, mock: Mock, tag: str
) -> None:
    hdrs = {"x-mock-fail-after": "3", "x-mock-output-tokens": "20", "x-mock-chunk-delay-ms": "50"}
    received: list[str] = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in oai.chat.completions.create(model="gpt-5.5", messages=MSGS, stream=True, extra_headers=hdrs):
            received += [c.delta.content or "" for c in chunk.choices]
    assert 0 < len(received) < 20, "some events arrived, then the break surfaced as an error"
    log = access_log(stack, mock.one(tag)["headers"]["x-request-id"])
    assert "UPE" in log["flags"] or "UR" in log["flags"], log["flags"]  # Envoy saw the upstream break
    assert oai.chat.completions.create(model="gpt-5.5", messages=MSGS).choices, "the gateway keeps serving"
