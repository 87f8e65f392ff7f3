"""Usage records through the whole stack: real Envoy, the real server (`extproc serve`), the mock
provider, and the ledger a deployment would use: Redis + PostgreSQL, and the embedded default
(SQLite). Every record is compared with what the mock reported, in the provider's own field names,
and every cost with the shipped price table computed here by hand in decimals."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.accounting.record import UsageRecord
from extproc.config import load_config
from extproc.devstack import Stack
from extproc.ledger import open_ledger
from tests.e2e.conftest import Admin, Mock, access_log, anthropic_client, make_stack, openai_client

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PRICES = yaml.safe_load((ROOT / "extproc" / "accounting" / "prices.yaml").read_text())["models"]
MSGS: list[Any] = [{"role": "user", "content": "Say something short please"}]


@dataclass
class Env:
    stack: Stack
    admin: Admin
    key: str
    key_id: str
    mock: Mock
    ledger_env: dict[str, str]
    kind: str

    def records(self, request_id: str, wait: float = 15.0) -> list[UsageRecord]:
        """The ledger's records for one request id, waiting for the stream consumer to move it."""
        deadline = time.monotonic() + wait
        while True:
            found = [r for r in self._all() if r.request_id == request_id]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def record(self, request_id: str) -> UsageRecord:
        found = self.records(request_id)
        assert len(found) == 1, f"expected one record for {request_id}, got {len(found)}"
        return found[0]

    def _all(self) -> list[UsageRecord]:
        async def go() -> list[UsageRecord]:
            ledger = open_ledger(self.admin.config, self.ledger_env)
            try:
                return await ledger.list(None, None, self.key_id, None, 10_000)
            finally:
                await ledger.close()

        return asyncio.run(go())


def _setup(workdir: Path, kind: str, redis_url: str, pg_url: str) -> tuple[Stack, Admin, dict[str, str]]:
    stack, admin = make_stack(workdir, redis_url if kind == "redis-postgres" else None)
    ledger_env: dict[str, str] = {}
    if kind == "redis-postgres":
        data = yaml.safe_load(admin.config_path.read_text())
        data["ledger"] = {"database_url_env": "DATABASE_URL"}
        admin.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        admin.config = load_config(admin.config_path)
        # A schema of this module's own in the session database (the ledger tests use others).
        schema = f"acct_{uuid.uuid4().hex[:8]}"
        url = f"{pg_url}{'&' if '?' in pg_url else '?'}options=-csearch_path%3D{schema}"
        import psycopg

        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        ledger_env = {"DATABASE_URL": url}
        stack.env["DATABASE_URL"] = url
        proc = admin.cli("db", "migrate", env=ledger_env)
        assert proc.returncode == 0, proc.stderr
    return stack, admin, ledger_env


@pytest.fixture(scope="module", params=["redis-postgres", "embedded-sqlite"])
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str, pg_url: str
) -> Iterator[Env]:
    kind = request.param
    stack, admin, ledger_env = _setup(tmp_path_factory.mktemp(kind), kind, redis_url, pg_url)
    secret, key = admin.key("acct", "k")
    stack.start()
    try:
        yield Env(stack, admin, secret, key.id, Mock(stack.mock_url), ledger_env, kind)
    finally:
        stack.stop()


def price(model: str, input_: int, cached: int, creation: int, output: int) -> str:
    """The price table's arithmetic, written out independently of extproc.accounting.pricing."""
    p = {
        k: Decimal(v)
        for k, v in PRICES[model].items()
        if k in ("input", "cached_input", "cache_creation_input", "output")
    }
    total = (
        (input_ - cached - creation) * p["input"]
        + cached * p["cached_input"]
        + creation * p["cache_creation_input"]
        + output * p["output"]
    ) / Decimal(1_000_000)
    return str(total.normalize()) if total else "0"


def same_cost(a: str | None, b: str) -> bool:
    return a is not None and Decimal(a) == Decimal(b)


def test_openai_json_with_cached_and_reasoning_tokens(env: Env) -> None:
    tag = uuid.uuid4().hex
    client = openai_client(env.stack, env.key, tag)
    hdrs = {"x-mock-cached-tokens": "3", "x-mock-content": "thinking,text", "x-mock-reasoning-tokens": "4"}
    raw = client.chat.completions.with_raw_response.create(model="gpt-5.5", messages=MSGS, extra_headers=hdrs)
    rid = raw.headers["x-gateway-request-id"]
    reported = env.mock.one(tag)["usage"]
    rec = env.record(rid)
    assert (rec.input_tokens, rec.cached_input_tokens, rec.output_tokens, rec.reasoning_tokens) == (
        reported["prompt_tokens"],
        reported["prompt_tokens_details"]["cached_tokens"],
        reported["completion_tokens"],
        reported["completion_tokens_details"]["reasoning_tokens"],
    )
    assert rec.reasoning_tokens == 4 and rec.cached_input_tokens == 3 and not rec.estimated
    assert rec.total_tokens == reported["total_tokens"]
    assert (rec.tenant, rec.key_id, rec.model, rec.upstream_model, rec.provider) == (
        "acct",
        env.key_id,
        "gpt-5.5",
        "gpt-5.5",
        "openai",
    )
    assert rec.status == 200 and rec.stream is False and rec.endpoint == "/v1/chat/completions"
    assert same_cost(rec.cost_usd, price("gpt-5.5", rec.input_tokens, 3, 0, rec.output_tokens))
    line = access_log(env.stack, raw.headers["x-request-id"])
    assert line["gateway_request_id"] == rid and int(line["output_tokens"]) == rec.output_tokens
    assert Decimal(line["cost_usd"]) == Decimal(rec.cost_usd or "x") and line["estimated"] in (False, "false")


@pytest.mark.parametrize("client_schema", ["openai", "anthropic"])
def test_translated_streams_are_recorded_with_the_provider_that_answered(env: Env, client_schema: str) -> None:
    """An OpenAI client on a Claude model and an Anthropic client on an OpenAI model: the record
    holds the usage the provider itself reported, in the provider's meaning, and names it."""
    tag = uuid.uuid4().hex
    hdrs = {"x-mock-output-tokens": "5", "x-mock-cached-tokens": "2", "x-mock-cache-read-tokens": "2"}
    if client_schema == "openai":
        oai = openai_client(env.stack, env.key, tag)
        with oai.chat.completions.with_streaming_response.create(
            model="sonnet", messages=MSGS, stream=True, extra_headers=hdrs
        ) as resp:
            rid = resp.headers["x-gateway-request-id"]
            text = "".join(line for line in resp.iter_lines())
        assert "[DONE]" in text and "content_block" not in text
        provider, upstream = "anthropic", "claude-sonnet-5-5"
    else:
        claude = anthropic_client(env.stack, env.key, tag)
        with claude.messages.with_streaming_response.create(
            model="gpt-5.5", max_tokens=50, messages=MSGS, stream=True, extra_headers=hdrs
        ) as resp:
            rid = resp.headers["x-gateway-request-id"]
            text = "".join(line for line in resp.iter_lines())
        assert "message_stop" in text and "[DONE]" not in text
        provider, upstream = "openai", "gpt-5.5"
    reported = env.mock.one(tag)["usage"]
    rec = env.record(rid)
    assert (rec.provider, rec.upstream_model, rec.stream, rec.estimated) == (provider, upstream, True, False)
    if provider == "anthropic":
        assert rec.input_tokens == reported["input_tokens"] + 2 and rec.cached_input_tokens == 2
    else:
        assert rec.input_tokens == reported["prompt_tokens"] and rec.cached_input_tokens == 2
    assert rec.output_tokens == 5
    assert same_cost(rec.cost_usd, price(upstream, rec.input_tokens, 2, 0, 5))


def test_openai_stream_without_include_usage_is_recorded_and_hidden(env: Env) -> None:
    tag = uuid.uuid4().hex
    client = openai_client(env.stack, env.key, tag)
    with client.chat.completions.with_streaming_response.create(
        model="fast", messages=MSGS, stream=True, extra_headers={"x-mock-cached-tokens": "2"}
    ) as resp:
        rid = resp.headers["x-gateway-request-id"]
        body = resp.read()
    # Exactly the stream the client asked for: no usage-only chunk, no "usage" members at all.
    assert b'"usage"' not in body and body.rstrip().endswith(b"data: [DONE]")
    upstream = env.mock.one(tag)
    assert '"include_usage":true' in upstream["body"].replace(" ", "")
    rec = env.record(rid)
    reported = upstream["usage"]
    assert (rec.input_tokens, rec.cached_input_tokens, rec.output_tokens) == (
        reported["prompt_tokens"],
        2,
        reported["completion_tokens"],
    )
    assert rec.stream and not rec.estimated and rec.model == "fast" and rec.upstream_model == "gpt-5.4-mini"
    assert rec.ttft_ms is not None and 0 < rec.ttft_ms <= rec.latency_ms
    assert same_cost(rec.cost_usd, price("gpt-5.4-mini", rec.input_tokens, 2, 0, rec.output_tokens))


def test_openai_stream_that_asked_for_usage_gets_it(env: Env) -> None:
    tag = uuid.uuid4().hex
    client = openai_client(env.stack, env.key, tag)
    chunks = list(
        client.chat.completions.create(
            model="gpt-5.5", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == env.mock.one(tag)["usage"]["prompt_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_anthropic_cache_tokens(env: Env, stream: bool) -> None:
    tag = uuid.uuid4().hex
    claude = anthropic_client(env.stack, env.key, tag)
    hdrs = {
        "x-mock-cache-creation-tokens": "1200",
        "x-mock-cache-read-tokens": "3000",
        "x-mock-content": "thinking,text,tool",
    }
    tools: list[Any] = [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}]
    if stream:
        with claude.messages.stream(
            model="sonnet", max_tokens=200, messages=MSGS, tools=tools, extra_headers=hdrs
        ) as s:
            output_tokens = s.get_final_message().usage.output_tokens
            rid = s.response.headers["x-gateway-request-id"]
    else:
        raw = claude.messages.with_raw_response.create(
            model="sonnet", max_tokens=200, messages=MSGS, tools=tools, extra_headers=hdrs
        )
        output_tokens = raw.parse().usage.output_tokens
        rid = raw.headers["x-gateway-request-id"]
    reported = env.mock.one(tag)["usage"]
    rec = env.record(rid)
    assert rec.input_tokens == reported["input_tokens"] + 1200 + 3000
    assert (rec.cached_input_tokens, rec.cache_creation_input_tokens) == (3000, 1200)
    assert rec.output_tokens == reported["output_tokens"] == output_tokens
    assert rec.reasoning_tokens == 0 and rec.stream is stream and not rec.estimated
    assert rec.upstream_model == "claude-sonnet-5-5" and rec.provider == "anthropic"
    assert same_cost(rec.cost_usd, price("claude-sonnet-5-5", rec.input_tokens, 3000, 1200, rec.output_tokens))


@pytest.mark.parametrize("schema", ["openai", "anthropic"])
def test_stream_broken_by_the_provider_is_one_estimated_record(env: Env, schema: str) -> None:
    tag = uuid.uuid4().hex
    path, body = _stream_request(schema)
    hdrs = {
        **_auth(env, schema),
        "x-mock-tag": tag,
        "x-mock-fail-after": "5",
        "x-mock-output-tokens": "40",
        "x-mock-chunk-delay-ms": "20",
    }
    with (
        httpx.Client(base_url=env.stack.base_url, timeout=30) as c,
        c.stream("POST", path, json=body, headers=hdrs) as r,
    ):
        assert r.status_code == 200, r.read()
        rid = r.headers["x-gateway-request-id"]
        with pytest.raises(httpx.HTTPError):
            for _ in r.iter_bytes():
                pass
    rec = env.record(rid)
    assert rec.estimated and rec.error_code == "stream_incomplete"
    assert rec.input_tokens > 0 and rec.output_tokens > 0, "a stream that sent content is never recorded as zero"
    assert rec.cost_usd is not None and Decimal(rec.cost_usd) > 0


@pytest.mark.parametrize("schema", ["openai", "anthropic"])
def test_stream_abandoned_by_the_client_is_one_estimated_record(env: Env, schema: str) -> None:
    tag = uuid.uuid4().hex
    path, body = _stream_request(schema)
    hdrs = {**_auth(env, schema), "x-mock-tag": tag, "x-mock-chunk-delay-ms": "50", "x-mock-output-tokens": "200"}
    with (
        httpx.Client(base_url=env.stack.base_url, timeout=30) as c,
        c.stream("POST", path, json=body, headers=hdrs) as r,
    ):
        rid = r.headers["x-gateway-request-id"]
        envoy_id = r.headers["x-request-id"]
        got = 0
        for chunk in r.iter_bytes():
            got += len(chunk)
            if got > 600:
                break
    rec = env.record(rid)
    assert rec.estimated and rec.error_code == "stream_incomplete"
    assert 0 < rec.output_tokens < 200 and rec.input_tokens > 0
    line = access_log(env.stack, envoy_id)
    assert line["gateway_request_id"] == rid and line["estimated"] in (True, "true")


def test_provider_error_and_gateway_refusal_are_recorded(env: Env) -> None:
    tag = uuid.uuid4().hex
    with httpx.Client(base_url=env.stack.base_url, timeout=30) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "gpt-5.5", "messages": MSGS},
            headers={**_auth(env, "openai"), "x-mock-tag": tag, "x-mock-status": "429"},
        )
        assert r.status_code == 429
        rec = env.record(r.headers["x-gateway-request-id"])
        assert (rec.status, rec.input_tokens, rec.output_tokens, rec.cost_usd) == (429, 0, 0, "0")
        assert rec.error_code and not rec.estimated
        r = c.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": MSGS},
            headers=_auth(env, "openai"),
        )
        assert r.status_code == 404
        rec = env.record(r.headers["x-gateway-request-id"])
        assert (rec.status, rec.error_code, rec.total_tokens, rec.key_id) == (404, "model_not_found", 0, env.key_id)


def test_aggregates_and_report_equal_the_records(env: Env) -> None:
    client = openai_client(env.stack, env.key)
    ids = [
        client.chat.completions.with_raw_response.create(model="gpt-5.5", messages=MSGS).headers["x-gateway-request-id"]
        for _ in range(3)
    ]
    for rid in ids:
        env.record(rid)
    recs = [r for r in env._all() if r.model == "gpt-5.5" and r.status == 200]
    proc = env.admin.cli("usage", "report", "--by", "model", "--json", "--since", "1d", env=env.ledger_env)
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    row = {r["group"]: r for r in view["rows"]}["gpt-5.5"]
    all_model = [r for r in env._all() if r.model == "gpt-5.5"]
    assert int(row["requests"]) == len(all_model)
    assert int(row["output_tokens"]) == sum(r.output_tokens for r in all_model)
    assert Decimal(row["cost_usd"]) == sum((Decimal(r.cost_usd or "0") for r in all_model), Decimal(0))
    assert recs
    assert Decimal(view["total"]["cost_usd"]) == sum((Decimal(r["cost_usd"]) for r in view["rows"]), Decimal(0))
    if env.kind == "redis-postgres":
        # The hot-path aggregates (what budgets read) equal the durable records of the same day.
        agg = _redis_aggregates(env, recs[0].ts.strftime("%Y-%m-%d"))
        mine = [r for r in env._all() if r.ts.strftime("%Y-%m-%d") == recs[0].ts.strftime("%Y-%m-%d")]
        assert int(agg["requests"]) == len(mine)
        assert int(agg["output_tokens"]) == sum(r.output_tokens for r in mine)
        assert int(agg["input_tokens"]) == sum(r.input_tokens for r in mine)


def _redis_aggregates(env: Env, day: str) -> dict[str, int | str]:
    from extproc.accounting.sink import RedisUsageSink
    from extproc.accounting.spool import Spool
    from extproc.store import RedisBackend

    async def go() -> dict[str, int | str]:
        backend = RedisBackend(env.admin.redis_url or "", prefix=env.admin.config.store.redis_prefix)
        try:
            sink = RedisUsageSink(backend, Spool(env.stack.workdir / "agg-spool", 1 << 20))
            return await sink.aggregates("acct", day, "key", env.key_id)
        finally:
            await backend.close()

    return asyncio.run(go())


def _auth(env: Env, schema: str) -> dict[str, str]:
    if schema == "anthropic":
        return {"x-api-key": env.key, "anthropic-version": "2023-06-01"}
    return {"authorization": f"Bearer {env.key}"}


def _stream_request(schema: str) -> tuple[str, dict[str, Any]]:
    if schema == "anthropic":
        return "/v1/messages", {"model": "sonnet", "max_tokens": 500, "stream": True, "messages": MSGS}
    return "/v1/chat/completions", {"model": "gpt-5.5", "stream": True, "messages": MSGS}
