"""Hostile input through the real Envoy: every defect of the hardening issue, at the client, at the
provider (the mock's request log) and in the logs (no key, no prompt)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import yaml

from extproc import envoyconf
from extproc.config import load_config
from extproc.devstack import Stack
from extproc.pipeline import RequestContext, Stage
from tests.e2e.conftest import Admin, Mock, access_log, access_log_lines, make_stack, openai_client, server_in_thread

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
PROMPT = "the secret prompt text 7f3a"
BODY: dict[str, Any] = {"model": "gpt-5.5", "messages": [{"role": "user", "content": PROMPT}]}


def assert_logs_clean(stack: Stack, *secrets: str) -> None:
    for name in ("envoy", "access", "server"):
        text = stack.log_path(name).read_text()
        for s in (*secrets, PROMPT):
            assert s not in text, f"{name}.log holds {s[:12]}…"


# -- 2. keys outside the auth headers, query strings ----------------------------------------------


@pytest.mark.parametrize(
    ("where", "extra_headers", "query"),
    [
        ("query", {}, "?key={key}"),
        ("query, percent-encoded", {}, "?api_key=%73k-gw-{rest}"),
        ("query name", {}, "?{key}=1"),
        ("cookie", {"cookie": "session=abc; token={key}"}, ""),
        ("proxy-authorization", {"proxy-authorization": "Bearer {key}"}, ""),
        ("any header", {"x-forwarded-key": "{key}"}, ""),
    ],
)
def test_a_key_outside_the_auth_headers_is_refused(
    stack: Stack, api_key: str, mock: Mock, tag: str, where: str, extra_headers: dict[str, str], query: str
) -> None:
    fill = {"key": api_key, "rest": api_key.removeprefix("sk-")}
    headers = {k: v.format(**fill) for k, v in extra_headers.items()}
    r = httpx.post(
        stack.base_url + CHAT + query.format(**fill),
        json=BODY,
        headers={"authorization": f"Bearer {api_key}", "x-mock-tag": tag, **headers},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "misplaced_api_key"), where
    assert api_key not in r.text
    assert mock.requests(tag) == [], "nothing is forwarded"
    log = access_log(stack, r.headers["x-request-id"])
    assert "?" not in log["path"] and log["gateway_error"] == "misplaced_api_key"
    assert_logs_clean(stack, api_key)


def test_query_parameters_providers_do_not_read_are_dropped(
    raw: httpx.Client, mock: Mock, tag: str, stack: Stack
) -> None:
    r = raw.post(CHAT + "?trace=1&debug=true&api-version=2024", json=BODY)
    assert r.status_code == 200
    upstream = mock.one(tag)
    assert upstream["query"] == ""
    log = access_log(stack, upstream["headers"]["x-request-id"])
    assert log["path"] == CHAT, "query strings never reach the access log"
    # Anthropic reads ?beta=true on /v1/messages (older SDKs send it on beta calls): it is kept.
    r = raw.post(
        "/v1/messages?debug=1&beta=true",
        json={"model": "haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 200
    assert mock.requests(tag)[-1]["query"] == "beta=true"


# -- 4. duplicate JSON keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model":"gpt-5.5","model":"gpt-5.4-mini","messages":[]}', "model"),
        (b'{"model":"gpt-5.5" , "messages":[{"role":"user","content":"a","content" :"b"}]}', "content"),
        (b'{"model":"gpt-5.5","messages":[],"stream":false,"stream":true}', "stream"),
    ],
)
def test_duplicate_keys_are_refused_and_never_forwarded(
    raw: httpx.Client, mock: Mock, tag: str, body: bytes, key: str
) -> None:
    r = raw.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    assert repr(key) in r.json()["error"]["message"], "the message names the key"
    assert mock.requests(tag) == []


def test_the_provider_sees_exactly_what_the_gateway_checked(stack: Stack, admin: Admin, mock: Mock, tag: str) -> None:
    secret, _ = admin.key("e2e", "mini-only", models=("gpt-5.4-mini",))
    body = b'{"model":"gpt-5.4-mini","model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}'
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json", "x-mock-tag": tag}
    for b in (body, body.replace(b"gpt-5.4-mini", b"X").replace(b"gpt-5.5", b"gpt-5.4-mini").replace(b"X", b"gpt-5.5")):
        r = httpx.post(stack.base_url + CHAT, content=b, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    assert mock.requests(tag) == []


# -- 5. model names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "openai/" + "m" * 1_000_000,
        "openai/" + "m" * 70_000,
        "openai/" + "m" * 8_000_000,
        "openai/gpt\r\nx-injected: 1",
        "openai/gpt\x00x",
        "gpt 5",
        "openai/" + "é",
    ],
)
def test_model_names_are_bounded_and_printable(
    raw: httpx.Client, mock: Mock, tag: str, stack: Stack, model: str
) -> None:
    r = raw.post(CHAT, json={"model": model, "messages": []})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_model")
    assert len(r.content) < 1024, "error bodies quote at most a short prefix"
    assert mock.requests(tag) == []
    server_log = stack.log_path("server").read_text()
    assert "Traceback" not in server_log and "m" * 200 not in server_log


def test_long_values_are_never_echoed_whole(raw: httpx.Client) -> None:
    long = "z" * 5000
    cases = [
        raw.post(CHAT, json={"model": long, "messages": []}),
        raw.post("/v1/" + long, json=BODY),
        raw.post(CHAT, json=BODY, headers={"content-type": "text/" + long}),
        raw.get("/v1/models/" + long),
    ]
    for r in cases:
        assert r.status_code >= 400
        assert "z" * 100 not in r.text, r.text[:200]


# -- 6. header limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [75, 86, 90])
def test_too_many_headers_is_431_not_503(stack: Stack, api_key: str, mock: Mock, tag: str, count: int) -> None:
    headers = {f"x-extra-{i}": "v" for i in range(count)}
    r = httpx.post(
        stack.base_url + CHAT, json=BODY, headers={"authorization": f"Bearer {api_key}", "x-mock-tag": tag, **headers}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (431, "request_headers_too_large")
    assert mock.requests(tag) == []


def test_header_bytes_limit_is_431(stack: Stack, api_key: str, mock: Mock, tag: str) -> None:
    headers = {f"x-big-{i}": "v" * 10_000 for i in range(5)}  # 50 KB: past the server's 48 KiB
    r = httpx.post(
        stack.base_url + CHAT, json=BODY, headers={"authorization": f"Bearer {api_key}", "x-mock-tag": tag, **headers}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (431, "request_headers_too_large")
    assert mock.requests(tag) == []


def test_headers_past_envoys_own_limit_never_get_a_503(stack: Stack, api_key: str, mock: Mock, tag: str) -> None:
    headers = {f"x-extra-{i}": "v" for i in range(120)}
    try:
        r = httpx.post(
            stack.base_url + CHAT,
            json=BODY,
            headers={"authorization": f"Bearer {api_key}", "x-mock-tag": tag, **headers},
        )
        assert r.status_code == 431
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass  # Envoy answers 431 and closes before the client finished sending
    assert mock.requests(tag) == []
    [log] = access_log_lines(stack, lambda line: line["details"] == "http1.too_many_headers")[-1:]
    assert log["status"] == 431


# -- 7. client headers that steer the provider ----------------------------------------------------


def test_only_allow_listed_client_headers_reach_the_provider(
    oai: openai.OpenAI, claude: anthropic.Anthropic, mock: Mock, tag: str
) -> None:
    steer = {
        "openai-organization": "org-client",
        "openai-project": "proj-client",
        "cookie": "session=abc",
        "proxy-authorization": "Basic Zm9vOmJhcg==",
        "x-custom-thing": "1",
        "x-stainless-key": "looks-like-a-credential",
    }
    oai.chat.completions.create(model="gpt-5.5", messages=[{"role": "user", "content": "hi"}], extra_headers=steer)
    claude.messages.create(
        model="haiku",
        max_tokens=5,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={**steer, "anthropic-beta": "tools-2024-04-04"},
    )
    oai_req, ant_req = mock.requests(tag)
    for req in (oai_req, ant_req):
        h = req["headers"]
        for name in ("cookie", "proxy-authorization", "x-custom-thing", "x-stainless-key", "x-forwarded-for"):
            assert name not in h, name
        assert h["user-agent"] and h["x-stainless-lang"] == "python", "SDK headers pass"
        assert not any(k.startswith("x-envoy-") for k in h)
    # Organization and project are the gateway's choice (gateway.yaml), never the client's.
    assert oai_req["headers"]["openai-organization"] == "org-gateway"
    assert "openai-project" not in oai_req["headers"]
    assert "openai-organization" not in ant_req["headers"]
    assert ant_req["headers"]["anthropic-beta"] == "tools-2024-04-04"


# -- 8. provider auth failures, hung server, logs -------------------------------------------------


def test_a_provider_401_or_403_is_a_502_not_a_bad_key(
    oai: openai.OpenAI, claude: anthropic.Anthropic, stack: Stack, mock: Mock, tag: str
) -> None:
    for status in ("401", "403"):
        with pytest.raises(openai.InternalServerError) as e1:
            oai.chat.completions.create(
                model="gpt-5.5", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-status": status}
            )
        assert e1.value.status_code == 502 and e1.value.code == "upstream_authentication_failed"
        with pytest.raises(anthropic.APIStatusError) as e2:
            claude.messages.create(
                model="haiku",
                max_tokens=5,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-mock-status": status},
            )
        assert e2.value.status_code == 502
        assert e2.value.body["error"]["code"] == "upstream_authentication_failed"  # type: ignore[index]
    assert len(mock.requests(tag)) == 4
    deadline = time.monotonic() + 5
    while "GATEWAY MISCONFIGURED" not in stack.log_path("envoy").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GATEWAY MISCONFIGURED" in stack.log_path("envoy").read_text(), "logged loudly on Envoy's stderr"
    # A bad virtual key is still the client's 401.
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "sk-gw-" + "q" * 32).chat.completions.create(
            model="gpt-5.5", messages=[{"role": "user", "content": "hi"}]
        )


def envoy_allocated(stack: Stack) -> int:
    r = httpx.get(f"http://{stack.ports.host}:{stack.ports.admin}/memory")  # live, not the 5 s stats flush
    return int(r.json()["allocated"])


@pytest.mark.xfail(
    # Not strict: on a loaded machine the mock writes too slowly to fill Envoy in the test's 10 s,
    # and the defect does not show (seen once while a benchmark ran beside the suite).
    strict=False,
    reason="Known defect: with the response body STREAMED through ext_proc (accounting reads every "
    "stream), Envoy 1.40 reads ~16-28 MiB of a stream whose client stopped reading before it pauses "
    "the upstream (then flat), whatever the listener and cluster buffer limits (tried 64 KiB both); "
    "10 such clients: 35 MiB after 4 s, 140 MiB after 32 s. Bounded by the overload manager's stream "
    "resets (README, 'Slow clients'). Measured 2026-12-02.",
)
def test_clients_that_stop_reading_cost_envoy_little_memory(tmp_path: Path) -> None:
    """Defect 1: with 16 MiB per-connection buffers, each client that opened a long stream and
    stopped reading made Envoy buffer up to 16 MiB of it, and more as the stream went on. With 1 MiB
    buffers and no response processing this was ~0.5 MiB per stalled stream. What is wanted: a bound
    reached within seconds and then flat however long the stream goes on.

    A stack of its own: Envoy and the mock go on moving these ~600 MB for seconds after the sockets
    close, and the session's shared stack timed the next test out while they did."""
    stack, admin = make_stack(tmp_path, None)
    api_key, _ = admin.key()
    stack.start()
    try:
        grown, later = stall_ten_streams(stack, api_key)
    finally:
        stack.stop()
    # With the old 16 MiB buffers this grew by ~60 MiB in the same 6 s and on towards 160 MiB (the
    # mock being the bottleneck).
    assert grown < 64 * 1024 * 1024, f"Envoy grew by {grown / 2**20:.0f} MiB for 10 stalled clients"
    assert later - grown < 8 * 1024 * 1024, f"still growing: {grown / 2**20:.0f} then {later / 2**20:.0f} MiB"


def stall_ten_streams(stack: Stack, api_key: str) -> tuple[int, int]:
    """Envoy's growth 6 s and 10 s after ten clients opened long streams and stopped reading."""
    body = orjson.dumps({**BODY, "stream": True})
    head = (
        f"POST {CHAT} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {api_key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "x-mock-output-tokens: 400000\r\n\r\n"  # ~60 MB of SSE per stream, as fast as it goes
    ).encode()
    before = envoy_allocated(stack)
    stalled = []
    try:
        for _ in range(10):
            sock = socket.create_connection((stack.ports.host, stack.ports.listener))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(head + body)
            stalled.append(sock)  # ...and never read
        time.sleep(6)  # the mock writes (~10 MB/s in all) until Envoy stops reading from it
        grown = envoy_allocated(stack) - before
        time.sleep(4)
        later = envoy_allocated(stack) - before
    finally:
        for sock in stalled:
            sock.close()
    return grown, later


def test_the_access_log_is_json_only(stack: Stack, raw: httpx.Client) -> None:
    raw.post(CHAT, json=BODY)
    lines = stack.log_path("access").read_text().splitlines()
    assert lines and all(isinstance(orjson.loads(line), dict) for line in lines)


def test_mock_provider_keys_are_not_on_its_command_line(stack: Stack) -> None:
    pid = stack.procs["mock"].pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert "sk-" not in cmdline and "key" not in cmdline


# -- stacks of their own: hung server, overload ---------------------------------------------------


class HoldStage(Stage):
    """Holds requests tagged x-hold in their body phase until released: their ext_proc streams stay
    open, as an SSE response's will once a stage reads responses."""

    name = "hold"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = 0

    async def request_body(self, ctx: RequestContext) -> None:
        if "x-hold" in ctx.headers:
            self.holding += 1
            await asyncio.to_thread(self.release.wait)  # set from the test's thread
            self.holding -= 1


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, Mock, HoldStage]]:
    """A stack whose server sheds load early: 3 open streams, 1 MiB of bodies in flight."""
    stack, admin = make_stack(tmp_path_factory.mktemp("tight"), None, with_server=False)
    data = yaml.safe_load(admin.config_path.read_text())
    data["server"].update(max_concurrent_streams=3, max_body_bytes_in_flight=1024 * 1024)
    admin.config_path.write_text(yaml.safe_dump(data))
    admin.config = load_config(admin.config_path)
    secret, _ = admin.key()
    hold = HoldStage()
    with server_in_thread(admin, stack, (hold,)):
        stack.start()
        try:
            yield stack, secret, Mock(stack.mock_url), hold
        finally:
            stack.stop()


def post(stack: Stack, key: str, body: dict[str, Any], tag: str = "-") -> httpx.Response:
    return httpx.post(
        stack.base_url + CHAT, json=body, headers={"authorization": f"Bearer {key}", "x-mock-tag": tag}, timeout=30
    )


def wait_for(check: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_open_streams_past_the_limit_get_503_gateway_overloaded(tight: tuple[Stack, str, Mock, HoldStage]) -> None:
    stack, key, mock, hold = tight
    hold.release.clear()

    async def held(retry_overloaded: bool = False) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as c:
            headers = {"authorization": f"Bearer {key}", "x-hold": "1"}

            async def one() -> httpx.Response:
                # A slot comes back when its exchange's finish is over (the usage record is stored
                # after the client has the response): as a client following retry-after would, try
                # again for a bounded time. A leaked slot never comes back.
                deadline = time.monotonic() + 5
                while True:
                    r = await c.post(CHAT, json=BODY, headers=headers)
                    if not (retry_overloaded and r.status_code == 503 and time.monotonic() < deadline):
                        return r
                    await asyncio.sleep(0.05)

            return list(await asyncio.gather(*(one() for _ in range(3))))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(asyncio.run, held())
        try:
            assert wait_for(lambda: hold.holding == 3)
            r = post(stack, key, BODY, "over-streams")
            assert (r.status_code, r.json()["error"]["code"]) == (503, "gateway_overloaded")
            assert r.headers["retry-after"] == "1"
            assert access_log(stack, r.headers["x-request-id"])["gateway_error"] == "gateway_overloaded"
            assert mock.requests("over-streams") == []
        finally:
            hold.release.set()
        assert [x.status_code for x in first.result(30)] == [200, 200, 200]
    # Every slot came back (nothing leaked): three more held at once are all admitted.
    hold.release.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        again = pool.submit(asyncio.run, held(retry_overloaded=True))
        try:
            assert wait_for(lambda: hold.holding == 3, timeout=10)
        finally:
            hold.release.set()
        assert [x.status_code for x in again.result(30)] == [200, 200, 200]


def test_body_bytes_past_the_budget_get_503_and_are_released(tight: tuple[Stack, str, Mock, HoldStage]) -> None:
    stack, key, mock, hold = tight
    hold.release.set()
    big = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "w" * 1_200_000}]}
    r = post(stack, key, big, "budget")
    # Larger than the whole budget: it could never fit, so a 413 the SDKs do not retry.
    assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")
    assert "retry-after" not in r.headers
    assert mock.requests("budget") == []
    # 600 KB bodies one after another all fit: each one's bytes are released when it is done.
    medium = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "w" * 600_000}]}
    assert [post(stack, key, medium).status_code for _ in range(4)] == [200] * 4
    # Two at once do not: the second is refused while the first is held in its body phase.
    hold.release.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            httpx.post,
            stack.base_url + CHAT,
            json=medium,
            headers={"authorization": f"Bearer {key}", "x-hold": "1"},
            timeout=30,
        )
        try:
            assert wait_for(lambda: hold.holding == 1)
            r = post(stack, key, medium)
            assert (r.status_code, r.json()["error"]["code"]) == (503, "gateway_overloaded")
        finally:
            hold.release.set()
        assert held.result(30).status_code == 200
    assert post(stack, key, medium).status_code == 200


def _set_every(node: Any, name: str, value: Any) -> int:
    """Sets `name` wherever it occurs in a parsed config; how many it set."""
    found = 0
    if isinstance(node, dict):
        if name in node:
            node[name] = value
            found += 1
        found += sum(_set_every(v, name, value) for v in node.values())
    elif isinstance(node, list):
        found += sum(_set_every(v, name, value) for v in node)
    return found


def test_a_hung_server_gives_503_with_retry_after(tmp_path: Path) -> None:
    """The shipped config but for a 2 s message_timeout (15 s shipped): what is checked is how the
    timeout reaches the client, not its length."""

    def short_timeout(cfg: dict[str, Any]) -> None:
        assert _set_every(cfg, "message_timeout", "2s") >= 1

    stack, key = started_with_envoy_variant(tmp_path, short_timeout)
    try:
        pid = stack.procs["server"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            r = httpx.post(stack.base_url + CHAT, json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "gateway_unavailable")
        assert r.headers["retry-after"] == "1"
        assert access_log(stack, r.headers["x-request-id"])["details"] == "ext_proc_error_per-message_timeout_exceeded"
    finally:
        stack.stop()


def started_with_envoy_variant(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> tuple[Stack, str]:
    """A stack of its own on the shipped envoy.yaml with one setting changed by `edit`; started,
    with a key."""
    stack, admin = make_stack(tmp_path, None)
    cfg = envoyconf.load(stack.envoy_config)
    edit(cfg)
    variant = tmp_path / "envoy-variant.yaml"
    variant.write_text(yaml.safe_dump(cfg))
    stack.envoy_config = variant
    key, _ = admin.key()
    stack.start()
    return stack, key


def test_a_burst_past_envoys_extproc_limit_is_503_gateway_overloaded(tmp_path: Path) -> None:
    """The extproc cluster's circuit breaker (the deliberate per-server limit), made tiny."""

    def tiny_breaker(cfg: dict[str, Any]) -> None:
        envoyconf.clusters(cfg)["extproc"]["circuit_breakers"]["thresholds"][0].update(max_requests=2)

    stack, key = started_with_envoy_variant(tmp_path, tiny_breaker)
    try:
        results = asyncio.run(burst(stack, key, 40))
        codes = {(r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "") for r in results}
        assert codes <= {(200, ""), (503, "gateway_overloaded")}, codes
        assert (503, "gateway_overloaded") in codes and (200, "") in codes
        refused = next(r for r in results if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
    finally:
        stack.stop()


async def burst(stack: Stack, key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as c:
        headers = {"authorization": f"Bearer {key}"}
        return list(await asyncio.gather(*(c.post(CHAT, json=BODY, headers=headers) for _ in range(n))))


def test_envoy_near_its_memory_limit_refuses_with_503_gateway_overloaded(tmp_path: Path) -> None:
    """The overload manager's stop_accepting_requests, forced by a heap limit below what Envoy uses."""

    def tiny_heap(cfg: dict[str, Any]) -> None:
        for monitor in cfg["overload_manager"]["resource_monitors"]:
            if monitor["name"] == "envoy.resource_monitors.fixed_heap":
                monitor["typed_config"]["max_heap_size_bytes"] = 4 * 1024 * 1024

    stack, key = started_with_envoy_variant(tmp_path, tiny_heap)
    try:
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(stack.base_url + CHAT, json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "gateway_overloaded")
        assert r.headers["retry-after"] == "1"
    finally:
        stack.stop()


def test_no_key_or_prompt_in_any_log(stack: Stack, api_key: str) -> None:
    """Runs last in this module: after every hostile request above, the shared stack's logs
    (Envoy's, its access log, the server's) hold neither the key nor any prompt text."""
    assert_logs_clean(stack, api_key)
