"""Both transports the server can speak to Envoy: the native one (the default, every other e2e test
uses it) and grpc.aio (`server.transport: grpcio`), through the same checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.devstack import Stack
from tests.e2e.conftest import anthropic_client, health_check_successes, make_stack, openai_client, scrape, total

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["native", "grpcio"])
def stack_key(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    overrides: dict[str, Any] = {"server": {"transport": request.param}}
    stack, admin = make_stack(tmp_path_factory.mktemp(f"transport-{request.param}"), None, overrides=overrides)
    secret, _ = admin.key("transport", "k")  # before the start: the server loads it with the store
    stack.start()
    yield stack, secret
    stack.stop()


def test_json_streams_and_refusals(stack_key: tuple[Stack, str]) -> None:
    stack, secret = stack_key
    oai = openai_client(stack, secret)
    msgs: list[Any] = [{"role": "user", "content": "hi"}]
    out = oai.chat.completions.create(model="gpt-5.4-mini", messages=msgs)
    assert out.choices[0].message.content
    chunks = list(oai.chat.completions.create(model="gpt-5.4-mini", messages=msgs, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    claude = anthropic_client(stack, secret)
    with claude.messages.stream(model="sonnet", max_tokens=64, messages=msgs) as s:
        assert "".join(s.text_stream)
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "sk-gw-" + "A" * 32).models.list()
    # A 3 MB prompt through an alias: the rewritten body goes back as a body mutation.
    big: list[Any] = [{"role": "user", "content": "word " * 600_000}]
    assert oai.chat.completions.create(model="fast", messages=big).model == "gpt-5.4-mini"


def test_envoy_health_checks_and_metrics_on_both_transports(stack_key: tuple[Stack, str]) -> None:
    """Envoy's gRPC health check of the extproc cluster succeeds, and the open-streams gauge and
    request counters are served, whichever transport runs."""
    stack, secret = stack_key
    openai_client(stack, secret).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "x"}]
    )
    assert health_check_successes(stack, at_least=1) >= 1
    metrics = scrape(stack)
    assert ("gateway_open_streams", frozenset()) in metrics
    assert total(metrics, "gateway_requests_total", tenant="transport", status="200") >= 1
