"""The response-phase seam through a real Envoy: a stage that asks for the response switches the
body to STREAMED per request (mode_override), sees whole SSE events in order however the provider
split them, and the client still receives every byte. Requests whose stages need nothing keep the
two-message fast path. The server runs in-process here so the test can plug in its own stage."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from extproc.devstack import Stack
from extproc.pipeline import Need, RequestContext, ResponseChunk, Stage
from extproc.providers import StreamReader
from tests.e2e.conftest import anthropic_client, make_stack, openai_client, server_in_thread

pytestmark = pytest.mark.e2e


class UsageProbe(Stage):
    """Reads usage the way the accounting stage will; only for requests tagged x-probe."""

    name = "usage-probe"

    def __init__(self) -> None:
        self.results: dict[str, dict[str, object]] = {}
        self.readers: dict[str, StreamReader] = {}
        self.bodies: dict[str, bytearray] = {}
        self.finished: list[str] = []

    async def request_body(self, ctx: RequestContext) -> None:
        if "x-probe" in ctx.headers:
            ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS)

    async def response_headers(self, ctx: RequestContext) -> None:
        # Response hooks run for every exchange another stage asked to see (accounting asks for all).
        if "x-probe" in ctx.headers:
            self.results[ctx.headers["x-probe"]] = {"status": ctx.response_status, "events": 0}

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        if "x-probe" not in ctx.headers:
            return
        assert ctx.adapter is not None
        probe = ctx.headers["x-probe"]
        result = self.results[probe]
        if chunk.events is not None:
            reader = self.readers.setdefault(probe, ctx.adapter.stream_reader())
            for ev in chunk.events:
                reader.on_event(ev)
                result["events"] = int(str(result["events"])) + 1
            result["usage"] = reader.usage
        else:
            self.bodies.setdefault(probe, bytearray()).extend(chunk.data)
            if chunk.end_of_stream:
                import orjson

                result["usage"] = ctx.adapter.usage_from_json(orjson.loads(bytes(self.bodies[probe])))

    async def finish(self, ctx: RequestContext) -> None:
        self.finished.append(ctx.headers.get("x-probe", "-"))


@pytest.fixture(scope="module")
def probe_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, UsageProbe, str]]:
    workdir = tmp_path_factory.mktemp("probe")
    stack, admin = make_stack(workdir, None, with_server=False)
    secret, _ = admin.key()
    probe = UsageProbe()
    with server_in_thread(admin, stack, (probe,)):
        stack.start()
        try:
            yield stack, probe, secret
        finally:
            stack.stop()


def test_stream_seen_event_by_event_and_delivered_whole(probe_stack: tuple[Stack, UsageProbe, str]) -> None:
    stack, probe, key = probe_stack
    client = openai_client(stack, key)
    hdrs = {"x-probe": "oai-stream", "x-mock-split": "5", "x-mock-output-tokens": "9"}
    chunks = list(
        client.chat.completions.create(
            model="gpt-5.5",
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=hdrs,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "The quick brown fox jumps over the lazy dog"
    )
    result = probe.results["oai-stream"]
    assert result["status"] == 200
    assert result["events"] == 9 + 4  # role chunk, 9 deltas, finish chunk, usage chunk, [DONE]
    usage = result["usage"]
    assert (usage.input_tokens, usage.output_tokens) == (3, 9)  # type: ignore[attr-defined]


def test_anthropic_stream_and_json_usage(probe_stack: tuple[Stack, UsageProbe, str]) -> None:
    stack, probe, key = probe_stack
    client = anthropic_client(stack, key)
    with client.messages.stream(
        model="haiku",
        max_tokens=50,
        messages=[{"role": "user", "content": "one two"}],
        extra_headers={"x-probe": "a-stream", "x-mock-split": "2"},
    ) as s:
        assert "".join(s.text_stream) == "The quick brown fox jumps over the lazy"
    usage = probe.results["a-stream"]["usage"]
    assert (usage.input_tokens, usage.output_tokens) == (2, 8)  # type: ignore[attr-defined]
    # Non-streaming JSON: content-length is dropped for the STREAMED body and the client still parses it.
    raw = client.messages.with_raw_response.create(
        model="haiku", max_tokens=50, messages=[{"role": "user", "content": "x"}], extra_headers={"x-probe": "a-json"}
    )
    assert raw.parse().content[0].text.startswith("The quick")  # type: ignore[union-attr]
    usage = probe.results["a-json"]["usage"]
    assert (usage.input_tokens, usage.output_tokens) == (1, 8)  # type: ignore[attr-defined]


def test_unprobed_requests_are_not_shown_to_the_probe(probe_stack: tuple[Stack, UsageProbe, str]) -> None:
    """A stage sees the response only of the requests it asked for (the accounting stage asks for
    every one, so the response is STREAMED and goes out chunked)."""
    stack, probe, key = probe_stack
    before = dict(probe.results)
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "gpt-5.5", "messages": []},
        headers={"authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200 and len(r.headers["x-gateway-request-id"]) == 36
    assert probe.results == before
    # finish runs once the exchange is over, just after the client has its last byte.
    deadline = time.monotonic() + 5
    while "-" not in probe.finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "-" in probe.finished, "finish runs for every exchange, probed or not"
