"""Limits end to end: real Envoy, the real server (`extproc serve`), the mock provider and a real
Redis, with the official SDKs where the client matters. Two gateway replicas (each its own Envoy and
server process) share one Redis, so "exactly N" means N in total, not N per replica."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

from extproc.devstack import Stack, free_port
from tests.e2e.conftest import Admin, make_stack, openai_client, scrape, total

pytestmark = pytest.mark.e2e

MSGS: list[Any] = [{"role": "user", "content": "Say something short please"}]


class Webhook:
    """A budget-alert receiver: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_tenant(self, tenant: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b.get("tenant") == tenant]

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Pair:
    a: Stack
    b: Stack
    admin: Admin
    webhook: Webhook
    redis_url: str = ""
    prefix: str = ""

    def key(self, tenant: str | None = None) -> tuple[str, str, str]:
        """(secret, key id, tenant) of a new key in a new tenant."""
        tenant = tenant or f"lim{uuid.uuid4().hex[:8]}"
        secret, key = self.admin.key(tenant, "k")
        return secret, key.id, tenant

    def limits(self, *args: str) -> None:
        done = self.admin.cli("limits", "set", *args)
        assert done.returncode == 0, done.stderr
        time.sleep(0.3)  # pub/sub invalidation reaches both servers well within this


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Pair]:
    webhook = Webhook()
    prefix = f"lim{uuid.uuid4().hex[:8]}:"
    overrides = {"alerts": {"webhook_url": webhook.url}}
    a, admin = make_stack(tmp_path_factory.mktemp("replica-a"), redis_url, prefix=prefix, overrides=overrides)
    b, _ = make_stack(tmp_path_factory.mktemp("replica-b"), redis_url, prefix=prefix, overrides=overrides)
    a.start()
    b.start()
    yield Pair(a, b, admin, webhook, redis_url, prefix)
    a.stop()
    b.stop()
    webhook.close()


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "gpt-5.4-mini", "messages": MSGS, **kw}


async def burst(urls: list[str], key: str, n: int, **kw: Any) -> list[httpx.Response]:
    """n requests at once, spread over the replicas' URLs."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(i: int) -> httpx.Response:
            return await client.post(
                f"{urls[i % len(urls)]}/v1/chat/completions",
                json=body(**kw),
                headers={"authorization": f"Bearer {key}"},
            )

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def refusals_are_well_formed(responses: list[httpx.Response], code: str) -> None:
    for r in responses:
        if r.status_code == 200:
            continue
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["type"] in ("rate_limit_error", "insufficient_quota")
        assert "x-gateway-request-id" in r.headers


def test_rpm_exactly_n_of_200_at_once_across_two_replicas(pair: Pair) -> None:
    key, _, tenant = pair.key()
    pair.limits("--tenant", tenant, "--rpm", "37")
    responses = asyncio.run(burst([pair.a.base_url, pair.b.base_url], key, 200))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 37, 429: 163}, statuses
    # Each replica got 100 of the requests: without the shared count each would have served 37.
    assert Counter(str(r.url).startswith(pair.a.base_url) for r in responses) == {True: 100, False: 100}
    refusals_are_well_formed(responses, "rate_limit_exceeded")
    for r in responses:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 2  # 60 s / 37 per request
            assert r.headers["x-ratelimit-limit-requests"] == "37"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"


def test_one_replica_alone_is_also_exact(pair: Pair) -> None:
    key, _, tenant = pair.key()
    pair.limits("--tenant", tenant, "--rpm", "20")
    responses = asyncio.run(burst([pair.a.base_url], key, 200))
    assert Counter(r.status_code for r in responses) == {200: 20, 429: 180}


def test_remaining_counts_down_and_provider_headers_are_kept_apart(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    pair.limits("--key", key_id, "--rpm", "5", "--tpm", "100000")
    client = openai_client(pair.a, key)
    seen = []
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(model="gpt-5.4-mini", messages=MSGS)
        h = raw.headers
        seen.append(int(h["x-ratelimit-remaining-requests"]))
        assert h["x-ratelimit-limit-requests"] == "5"
        assert h["x-ratelimit-limit-tokens"] == "100000"
        assert int(h["x-ratelimit-remaining-tokens"]) < 100000
        assert h["x-ratelimit-reset-requests"].endswith("s")
        # The mock provider's own figures, renamed (never mixed with the gateway's).
        assert h["x-upstream-ratelimit-limit-requests"] == "10000"
        assert h["x-upstream-ratelimit-remaining-tokens"] == "29999000"
    assert seen == [4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-5.4-mini", messages=MSGS)
    assert info.value.code == "rate_limit_exceeded"
    assert "5 requests per minute" in info.value.message
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_request_without_limits_has_no_gateway_rate_headers(pair: Pair) -> None:
    key, _, _ = pair.key()
    raw = openai_client(pair.a, key).chat.completions.with_raw_response.create(model="gpt-5.4-mini", messages=MSGS)
    assert not any(h.startswith("x-ratelimit-") for h in raw.headers)
    assert raw.headers["x-upstream-ratelimit-limit-requests"] == "10000"


def test_limit_changes_reach_running_servers_within_a_second(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    client = openai_client(pair.b, key)
    client.chat.completions.create(model="gpt-5.4-mini", messages=MSGS)  # identity cached, no limits
    done = pair.admin.cli("limits", "set", "--key", key_id, "--rpm", "1")
    assert done.returncode == 0, done.stderr
    start = time.monotonic()
    while True:
        raw = client.chat.completions.with_raw_response.create(model="gpt-5.4-mini", messages=MSGS)
        if "x-ratelimit-limit-requests" in raw.headers:
            break
        assert time.monotonic() - start < 1.0, "the new limit did not arrive within a second"
        time.sleep(0.02)


def test_tokens_per_minute_stop_streamed_traffic_without_overshoot(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    tpm = 3000
    pair.limits("--key", key_id, "--tpm", str(tpm))
    client = openai_client(pair.a, key)
    used, reservation, passed = 0, 0, 0
    start = time.monotonic()
    while True:
        try:
            stream = client.chat.completions.create(
                model="gpt-5.4-mini",
                messages=MSGS,
                max_tokens=200,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-mock-output-tokens": "150"},
            )
        except openai.RateLimitError as err:
            assert err.code == "rate_limit_exceeded"
            break
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        used += usage.prompt_tokens + usage.completion_tokens
        reservation = max(reservation, usage.prompt_tokens + 200 + 10)  # prompt estimate + max_tokens
        passed += 1
        assert passed < 100
    elapsed = time.monotonic() - start
    refill = elapsed * tpm / 60
    assert used >= tpm - reservation, "traffic stopped before the tokens were used"
    assert used <= tpm + refill + reservation, f"overshot: {used} tokens against {tpm}/min"


def test_concurrency_holds_and_frees_slots_when_streams_end_or_clients_leave(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    pair.limits("--key", key_id, "--concurrency", "2")
    slow = {"x-mock-chunk-delay-ms": "150", "authorization": f"Bearer {key}"}
    url = f"{pair.a.base_url}/v1/chat/completions"
    with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2, httpx.Client(timeout=30) as c3:
        with c1.stream("POST", url, json=body(stream=True), headers=slow) as s1:
            # Keep each line iterator: a discarded one closes the response (the client leaves).
            lines1 = s1.iter_lines()
            next(lines1)
            with c2.stream("POST", url, json=body(stream=True), headers=slow) as s2:
                lines2 = s2.iter_lines()
                next(lines2)
                third = c3.post(url, json=body(), headers={"authorization": f"Bearer {key}"})
                assert third.status_code == 429
                assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
                assert third.headers["retry-after"] == "1"
                for _ in lines2:  # the second stream runs to its end
                    pass
            # The slot is freed with the last chunk, before the client has it: no retry needed.
            assert c3.post(url, json=body(), headers={"authorization": f"Bearer {key}"}).status_code == 200
        # The first client left mid-stream: its slot is freed when Envoy ends the exchange.
        deadline = time.monotonic() + 5
        while True:
            r1 = c3.post(url, json=body(stream=True), headers=slow)
            r2 = c3.post(url, json=body(), headers={"authorization": f"Bearer {key}"})
            if r1.status_code == 200 and r2.status_code == 200:
                break
            assert time.monotonic() < deadline, "a slot of a client that left was not freed"
            time.sleep(0.1)


def test_an_abandoned_stream_settles_and_frees_its_reservation(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    pair.limits("--key", key_id, "--tpm", "1000")
    url = f"{pair.a.base_url}/v1/chat/completions"
    headers = {"authorization": f"Bearer {key}", "x-mock-chunk-delay-ms": "100", "x-mock-output-tokens": "50"}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url, json=body(stream=True, max_tokens=600), headers=headers) as s:
            next(s.iter_lines())  # one event, then the client goes away
        # 600 + the prompt were reserved; the estimate it settles on is a few tokens, so a second
        # 600-token request fits once it settled (it would not while the reservation held).
        deadline = time.monotonic() + 5
        while True:
            r = c.post(url, json=body(max_tokens=600), headers={"authorization": f"Bearer {key}"})
            if r.status_code == 200:
                break
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert time.monotonic() < deadline, "the abandoned stream's reservation was never settled"
            time.sleep(0.1)


def test_max_tokens_beyond_the_whole_minute_is_refused_clearly(pair: Pair) -> None:
    key, key_id, _ = pair.key()
    pair.limits("--key", key_id, "--tpm", "1000")
    with pytest.raises(openai.RateLimitError) as info:
        openai_client(pair.a, key).chat.completions.create(model="gpt-5.4-mini", messages=MSGS, max_tokens=5000)
    assert "can never pass" in info.value.message and "max_tokens" in info.value.message
    assert "retry-after" not in info.value.response.headers


def spend_until_refused(pair: Pair, key: str, most: int) -> tuple[int, openai.RateLimitError]:
    """Requests of 150 output tokens (~0.000676 USD on gpt-5.4-mini), alternating replicas, every
    third one streamed, until one is refused: (how many were served, the refusal)."""
    clients = [openai_client(pair.b, key), openai_client(pair.a, key)]
    for i in range(most):
        c = clients[i % 2]
        try:
            if i % 3 == 0:
                for _ in c.chat.completions.create(
                    model="gpt-5.4-mini", messages=MSGS, stream=True, extra_headers={"x-mock-output-tokens": "150"}
                ):
                    pass
            else:
                c.chat.completions.create(
                    model="gpt-5.4-mini", messages=MSGS, extra_headers={"x-mock-output-tokens": "150"}
                )
        except openai.RateLimitError as err:
            return i, err
    pytest.fail(f"{most} requests and the budget never stopped the tenant")


def test_usd_budget_stops_a_tenant_and_alerts_once_per_threshold(pair: Pair) -> None:
    key, _, tenant = pair.key()
    # gpt-5.4-mini: 4.50 USD per 1M output tokens; 150 output tokens ~ 0.000675 USD a request.
    pair.limits("--tenant", tenant, "--budget-usd", "0.006", "--period", "day", "--alert-at", "0.8", "1.0")
    served, err = spend_until_refused(pair, key, 40)
    # The first refusal is the budget used up: a finished request counts at its real cost from its
    # last chunk on, and exactly once (its record takes its reservation along).
    assert err.code == "insufficient_quota"
    assert "0.006 USD" in err.message
    assert 8 <= served <= 10  # ~0.000676 USD each: the 9th crosses 0.006
    shown = pair.admin.cli("limits", "show", "--tenant", tenant, "--json")
    status = json.loads(shown.stdout)["status"][0]
    assert status["limit"] == "budget_usd" and float(status["used"]) >= 0.006
    deadline = time.monotonic() + 10
    while len(pair.webhook.for_tenant(tenant)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # nothing more may arrive
    alerts = pair.webhook.for_tenant(tenant)
    assert sorted(a["threshold"] for a in alerts) == [0.8, 1.0], alerts
    assert all(a["budget"] == "usd" and a["limit"] == "0.006" and a["period"] == "day" for a in alerts)


def test_a_monthly_budget_reads_its_period_total_and_leaves_no_reservation(pair: Pair) -> None:
    """A monthly budget across two replicas: the first check starts the month's total, every record
    adds to it in step with its day, the budget stops the tenant where the spend says, and when the
    traffic is over nothing is reserved any more (estimates and ended requests' real costs alike)."""
    from datetime import UTC, datetime

    from redis import Redis

    from extproc.accounting.periods import period_days, period_id
    from extproc.accounting.sink import aggregate_key

    key, _, tenant = pair.key()
    pair.limits("--tenant", tenant, "--budget-usd", "0.004", "--period", "month")
    served, err = spend_until_refused(pair, key, 30)
    assert err.code == "insufficient_quota"
    assert 5 <= served <= 7  # ~0.000676 USD each: the 6th crosses 0.004
    r = Redis.from_url(pair.redis_url, decode_responses=True)
    today = datetime.now(UTC).date()
    total = aggregate_key(pair.prefix, tenant, period_id("month", today), "tenant")
    days = [aggregate_key(pair.prefix, tenant, d, "tenant") for d in period_days("month", today)]
    deadline = time.monotonic() + 10
    while True:
        res: dict[str, str] = r.hgetall(f"{pair.prefix}{{t:{tenant}}}:res:tenant:budget_usd")  # type: ignore[assignment]
        if int(res.get("__total", 0)) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.hget(total, "__init") == "1"
    spent = sum(int(r.hget(d, "cost_pusd") or 0) for d in days)
    assert spent >= 4 * 10**9 and int(r.hget(total, "cost_pusd") or -1) == spent
    assert int(res.get("__total", 0)) == 0 and int(res.get("__real", 0)) == 0, res
    assert [f for f in res if not f.startswith("__")] == [], res


def test_cli_refuses_bad_input_and_writes_nothing(pair: Pair) -> None:
    _, key_id, tenant = pair.key()
    for args in (
        ["--tenant", tenant, "--rpm", "-1"],
        ["--tenant", tenant, "--rpm", "ten"],
        ["--tenant", tenant, "--budget-usd", "1e3"],
        ["--tenant", tenant, "--period", "year", "--budget-usd", "1"],
        ["--key", "key_0123456789abcdef", "--rpm", "3"],
        ["--key", key_id, "--model", "gpt-*", "--budget-usd", "3"],
    ):
        done = pair.admin.cli("limits", "set", *args)
        assert done.returncode != 0 and "error" in done.stderr, args
    shown = json.loads(pair.admin.cli("limits", "show", "--tenant", tenant, "--json").stdout)
    assert shown["limits"] == {} and shown["status"] == []


# -- the embedded backend: one process ----------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Admin]]:
    stack, admin = make_stack(tmp_path_factory.mktemp("embedded-limits"), None)
    stack.start()
    yield stack, admin
    stack.stop()


def test_embedded_backend_enforces_the_same_limits(embedded: tuple[Stack, Admin]) -> None:
    stack, admin = embedded
    secret, key = admin.key("emb", "k")
    done = admin.cli("limits", "set", "--key", key.id, "--rpm", "12", "--concurrency", "50")
    assert done.returncode == 0, done.stderr
    time.sleep(0.6)  # the server polls the store every 200 ms
    responses = asyncio.run(burst([stack.base_url], secret, 60))
    assert Counter(r.status_code for r in responses) == {200: 12, 429: 48}
    refusals_are_well_formed(responses, "rate_limit_exceeded")
    time.sleep(0.7)  # the snapshot `limits show` reads is written twice a second
    shown = json.loads(admin.cli("limits", "show", "--key", key.id, "--json").stdout)
    by_limit = {s["limit"]: s for s in shown["status"]}
    assert by_limit["requests_per_minute"]["remaining"] == 0
    assert by_limit["concurrent_requests"]["used"] == 0
    reset = admin.cli("limits", "reset", "--key", key.id)
    assert reset.returncode == 0, reset.stderr
    time.sleep(0.6)
    ok = openai_client(stack, secret).chat.completions.with_raw_response.create(model="gpt-5.4-mini", messages=MSGS)
    assert ok.headers["x-ratelimit-remaining-requests"] == "11"


def test_embedded_concurrency_slot_is_freed(embedded: tuple[Stack, Admin]) -> None:
    stack, admin = embedded
    secret, key = admin.key("emb2", "k")
    assert admin.cli("limits", "set", "--key", key.id, "--concurrency", "1").returncode == 0
    time.sleep(0.6)
    url = f"{stack.base_url}/v1/chat/completions"
    slow = {"authorization": f"Bearer {secret}", "x-mock-chunk-delay-ms": "100"}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url, json=body(stream=True), headers=slow) as s:
            lines = s.iter_lines()
            next(lines)
            assert c.post(url, json=body(), headers=slow).status_code == 429
        time.sleep(0.3)
        assert c.post(url, json=body(), headers=slow).status_code == 200


# -- Redis outages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_outage_uses_the_configured_failure_mode_then_recovers(
    tmp_path_factory: pytest.TempPathFactory, mode: str
) -> None:
    """Keys in gateway.yaml keep authenticating while Redis is down, so the limits' own failure mode
    decides: open = a per-process limiter with each limit divided by expected_replicas; closed = 503
    limits_unavailable. Once Redis answers again the shared limits are back."""
    from extproc.auth.keys import hash_key, new_secret
    from tests.e2e.test_accounting_outages import RedisServer, poll

    workdir = tmp_path_factory.mktemp(f"outage-{mode}")
    redis = RedisServer(workdir / "redis")
    redis.start()
    secret = new_secret()
    overrides = {
        "auth": {
            "static_keys": [
                {
                    "id": "static-outage",
                    "name": "outage",
                    "tenant": "outage",
                    "sha256": hash_key(secret),
                    "limits": {"requests_per_minute": 10},
                }
            ]
        },
        "tenants": {"outage": {}},
        "limits": {"failure_mode": mode, "expected_replicas": 2},
    }
    stack, _ = make_stack(workdir / "stack", redis.url, overrides=overrides)
    stack.start()
    try:
        first = asyncio.run(burst([stack.base_url], secret, 15))
        assert Counter(r.status_code for r in first) == {200: 10, 429: 5}
        redis.kill()
        during = asyncio.run(burst([stack.base_url], secret, 12))
        statuses = Counter(r.status_code for r in during)
        if mode == "open":
            # A fresh per-process limiter: 10 per minute / 2 replicas.
            assert statuses == {200: 5, 429: 7}, statuses
            ok = next(r for r in during if r.status_code == 200)
            assert ok.headers["x-ratelimit-limit-requests"] == "5"
        else:
            assert statuses == {503: 12}, statuses
            err = during[0].json()["error"]
            assert err["code"] == "limits_unavailable" and during[0].headers["retry-after"] == "1"
        redis.start()  # its data survived (appendfsync always): the minute's 10 are still used

        def shared_again() -> bool:
            r = asyncio.run(burst([stack.base_url], secret, 1))[0]
            return r.status_code == 429 and r.headers.get("x-ratelimit-limit-requests") == "10"

        poll("shared limits back", shared_again, timeout=15, interval=0.3)
        metrics = scrape(stack)
        assert total(metrics, "gateway_limits_outages_total") >= 1
        # The 12 of the outage, and any of the polls above made before the limiter saw Redis back.
        if mode == "open":
            assert total(metrics, "gateway_limits_fallback_decisions_total") >= 12
        else:
            assert total(metrics, "gateway_limit_refusals_total", kind="unavailable") >= 12
        log = stack.log_path("server").read_text()
        assert "limits store unreachable" in log and "shared limits are back" in log
    finally:
        stack.stop()
        redis.stop()


def test_anthropic_clients_get_their_own_error_shape(pair: Pair) -> None:
    import anthropic

    from tests.e2e.conftest import anthropic_client

    key, key_id, _ = pair.key()
    pair.limits("--key", key_id, "--rpm", "1")
    client = anthropic_client(pair.a, key)
    ok = client.messages.with_raw_response.create(model="sonnet", max_tokens=64, messages=MSGS)
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["anthropic-ratelimit-requests-limit"] == "4000"  # the provider's own, untouched
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="sonnet", max_tokens=64, messages=MSGS)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
