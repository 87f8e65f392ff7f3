"""The response cache end to end: real Envoy, the real server, the mock provider (whose request log
shows whether a request reached it), on Redis and on the embedded store, with both SDKs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.accounting.record import UsageRecord
from extproc.auth.keys import hash_key
from extproc.cache.store import Entry
from extproc.devstack import Stack
from tests.e2e.conftest import (
    Admin,
    Mock,
    anthropic_client,
    free_ports,
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
EMAIL = "maria.gonzalez@northwind-traders.com"
EMBED_KEY = "sk-gw-" + "e" * 32
# This anthropic SDK's messages.stream() takes no temperature argument: sent as a body field.
ZERO = {"temperature": 0}


@dataclass
class Env:
    kind: str
    stack: Stack
    admin: Admin
    mock: Mock
    keys: dict[str, str]
    redis_url: str | None

    def oai(self, tenant: str = "cached") -> openai.OpenAI:
        return openai_client(self.stack, self.keys[tenant])

    def claude(self, tenant: str = "cached") -> anthropic.Anthropic:
        return anthropic_client(self.stack, self.keys[tenant])

    def upstream(self, tag: str) -> int:
        return len(self.mock.requests(tag))

    def record(self, request_id: str) -> UsageRecord:
        return usage_record(self.admin.config, request_id)

    def _all(self) -> list[UsageRecord]:
        return ledger_records(self.admin.config)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"REDIS_URL": self.redis_url} if self.redis_url else {}
        return self.admin.cli("cache", *args, env=env)


@pytest.fixture(scope="module", params=["redis", "embedded"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Env]:
    kind = request.param
    ports = free_ports()
    overrides: dict[str, Any] = {
        # A generous vector search: the default 50 ms is a miss on a machine running two test workers.
        "cache": {"mode": "exact", "ttl_seconds": 600, "search_timeout_seconds": 5},
        # The semantic tenant's embeddings go through this stack's Envoy with the embedder's key.
        "server": {"envoy_url": f"http://127.0.0.1:{ports.listener}"},
        "auth": {"static_keys": [{"id": "embedder", "name": "e", "tenant": "embedder", "sha256": hash_key(EMBED_KEY)}]},
        "tenants": {
            "cached": {},
            "neighbour": {},
            "short": {"cache": {"ttl_seconds": 1}},
            "masked": {"pii": {"action": "mask"}},
            "warm": {"cache": {"cache_nonzero_temperature": True}},
            "truncating": {"cache": {"cache_truncated": True}},
            "uncached": {"cache": {"mode": "off"}},
            "semantic": {"cache": {"mode": "semantic", "similarity_threshold": 0.95}},
            "semantic-model": {
                "cache": {
                    "mode": "semantic",
                    "embedding": "text-embedding-3-small",
                    "embedding_key_env": "EMBED_KEY",
                    "similarity_threshold": 0.9,
                }
            },
            "embedder": {},
            # A small token rate: hits that count exhaust it; hits that do not never do.
            "counted": {"cache": {"count_hits": True}, "limits": {"tokens_per_minute": 150}},
            "free": {"limits": {"tokens_per_minute": 150}},
        },
    }
    url = redis_url if kind == "redis" else None
    stack, admin = make_stack(
        tmp_path_factory.mktemp(f"cache-{kind}"),
        url,
        overrides=overrides,
        ports=ports,
        extra_env={"EMBED_KEY": EMBED_KEY},
    )
    keys = {t: admin.key(t, "k")[0] for t in overrides["tenants"]}
    stack.start()
    try:
        yield Env(kind, stack, admin, Mock(stack.mock_url), keys, url)
    finally:
        stack.stop()


def question() -> list[Any]:
    """A prompt of its own per test: entries of one test never answer another's."""
    return [{"role": "user", "content": f"What is a gateway? ({uuid.uuid4().hex})"}]


def tagged(tag: str, **more: str) -> dict[str, str]:
    return {"x-mock-tag": tag, **more}


def test_openai_json_hit_skips_the_provider_and_is_recorded(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    client = env.oai()
    first = client.chat.completions.with_raw_response.create(
        model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag, **{"x-mock-output-tokens": "6"})
    )
    second = client.chat.completions.with_raw_response.create(
        model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag)
    )
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "hit"
    assert int(second.headers["age"]) >= 0
    assert env.upstream(tag) == 1
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content == "The quick brown fox jumps over"
    assert b.usage is not None and b.usage.completion_tokens == 6
    miss = env.record(first.headers["x-gateway-request-id"])
    hit = env.record(second.headers["x-gateway-request-id"])
    assert (hit.cache_hit, hit.cost_usd, hit.status) == (True, "0", 200)
    assert (hit.input_tokens, hit.output_tokens) == (miss.input_tokens, miss.output_tokens)
    assert hit.saved_usd == miss.cost_usd and miss.cost_usd not in (None, "0")
    assert hit.provider == "openai" and hit.upstream_model == "gpt-5.5" and not miss.cache_hit


def test_streamed_hits_work_with_both_stream_helpers(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai()
    texts = []
    for _ in range(2):
        with oai.chat.completions.stream(
            model="gpt-5.5",
            messages=msgs,
            temperature=0,
            stream_options={"include_usage": True},
            extra_headers=tagged(tag, **{"x-mock-output-tokens": "5"}),
        ) as s:
            texts.append("".join(e.delta for e in s if e.type == "content.delta"))
            final = s.get_final_completion()
        assert final.usage is not None and final.usage.completion_tokens == 5
    assert texts == ["The quick brown fox jumps"] * 2
    claude = env.claude()
    answers = []
    for _ in range(2):
        with claude.messages.stream(
            model="sonnet", max_tokens=100, messages=msgs, extra_body=ZERO, extra_headers=tagged(tag + "a")
        ) as a:
            answers.append("".join(a.text_stream))
            message = a.get_final_message()
        assert message.usage.output_tokens > 0 and message.stop_reason == "end_turn"
    assert answers[0] == answers[1] and answers[0]
    assert env.upstream(tag) == 1 and env.upstream(tag + "a") == 1


def test_a_json_answer_serves_a_stream_without_an_unasked_usage_chunk(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai()
    oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    with oai.chat.completions.with_streaming_response.create(
        model="gpt-5.5", messages=msgs, temperature=0, stream=True, extra_headers=tagged(tag)
    ) as resp:
        assert resp.headers["x-gateway-cache"] == "hit"
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]"
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)
    assert env.upstream(tag) == 1


def test_tenants_never_share_entries(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    for tenant in ("cached", "neighbour"):
        raw = env.oai(tenant).chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag)
        )
        assert raw.headers["x-gateway-cache"] == "miss"
    assert env.upstream(tag) == 2


@pytest.mark.parametrize(
    ("headers", "reaches", "label"),
    [
        ({"x-gateway-cache": "bypass"}, True, "bypass"),
        ({"cache-control": "no-cache"}, True, "bypass"),
        ({"x-gateway-cache": "refresh"}, True, "miss"),
        ({"cache-control": "no-store"}, True, "miss"),
        ({}, False, "hit"),
    ],
)
def test_bypass_and_refresh(env: Env, headers: dict[str, str], reaches: bool, label: str) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai()
    oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag, **headers)
    )
    assert raw.headers["x-gateway-cache"] == label
    assert env.upstream(tag) == (2 if reaches else 1)
    sent = env.mock.requests(tag)[-1]["headers"]
    assert "x-gateway-cache" not in sent


def test_entries_expire(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai("short")
    for _ in range(2):
        oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    assert env.upstream(tag) == 1
    time.sleep(1.6)
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag)
    )
    assert raw.headers["x-gateway-cache"] == "miss" and env.upstream(tag) == 2


def test_what_is_not_cached(env: Env) -> None:
    oai = env.oai()
    # A temperature above 0 (or none: the provider's default is 1) is not reused by default...
    tag, msgs = uuid.uuid4().hex, question()
    for _ in range(2):
        raw = oai.chat.completions.with_raw_response.create(model="gpt-5.5", messages=msgs, extra_headers=tagged(tag))
        assert raw.headers["x-gateway-cache"] == "bypass"
    assert env.upstream(tag) == 2
    # ...unless the tenant says so.
    tag = uuid.uuid4().hex
    for _ in range(2):
        env.oai("warm").chat.completions.create(
            model="gpt-5.5", messages=msgs, temperature=0.7, extra_headers=tagged(tag)
        )
    assert env.upstream(tag) == 1
    # Errors are not stored.
    tag = uuid.uuid4().hex
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(
            model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag, **{"x-mock-status": "500"})
        )
    oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    assert env.upstream(tag) == 2
    # A stream the provider broke off is not stored.
    tag, msgs = uuid.uuid4().hex, question()
    for _ in range(2):
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in oai.chat.completions.create(
                model="gpt-5.5",
                messages=msgs,
                temperature=0,
                stream=True,
                extra_headers=tagged(tag, **{"x-mock-fail-after": "3", "x-mock-chunk-delay-ms": "20"}),
            ):
                pass
    oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    assert env.upstream(tag) == 3
    # Answers cut by max_tokens are not stored.
    tag, msgs = uuid.uuid4().hex, question()
    for _ in range(2):
        r = oai.chat.completions.create(
            model="gpt-5.5",
            messages=msgs,
            temperature=0,
            max_tokens=3,
            extra_headers=tagged(tag, **{"x-mock-output-tokens": "8"}),
        )
        assert r.choices[0].finish_reason == "length"
    assert env.upstream(tag) == 2
    # ...unless the tenant says so.
    tag = uuid.uuid4().hex
    for _ in range(2):
        r = env.oai("truncating").chat.completions.create(
            model="gpt-5.5",
            messages=msgs,
            temperature=0,
            max_tokens=3,
            extra_headers=tagged(tag, **{"x-mock-output-tokens": "8"}),
        )
        assert r.choices[0].finish_reason == "length"
    assert env.upstream(tag) == 1
    # A tenant with the cache off.
    tag = uuid.uuid4().hex
    for _ in range(2):
        raw = env.oai("uncached").chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag)
        )
        assert "x-gateway-cache" not in raw.headers
    assert env.upstream(tag) == 2


def test_a_prompt_with_pii_is_cached_only_redacted(env: Env) -> None:
    tag = uuid.uuid4().hex
    msgs: list[Any] = [{"role": "user", "content": f"Write to {EMAIL} about order {uuid.uuid4().hex}"}]
    oai = env.oai("masked")
    for _ in range(2):
        oai.chat.completions.create(
            model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag, **{"x-mock-echo": "1"})
        )
    assert env.upstream(tag) == 1
    assert EMAIL not in json.dumps(env.mock.requests(tag))
    for entry in _raw_entries(env):
        assert EMAIL not in json.dumps(entry.body)


def _raw_entries(env: Env) -> list[Entry]:
    if env.kind == "redis":
        import base64

        from redis import Redis

        prefix = env.admin.config.store.redis_prefix
        with Redis.from_url(env.redis_url or "") as r:
            keys = list(r.scan_iter(match=f"{prefix}*:cache:e:*"))
            return [e for k in keys if (e := Entry.decode(base64.b64decode(r.get(k) or b""))) is not None]
    import sqlite3

    db = sqlite3.connect(env.admin.config.state_dir / "cache.db")
    try:
        return [e for (data,) in db.execute("SELECT data FROM entries") if (e := Entry.decode(data)) is not None]
    finally:
        db.close()


def test_cli_stats_and_clear(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai("neighbour")
    for _ in range(3):
        oai.chat.completions.create(model="gpt-5.4-mini", messages=msgs, temperature=0, extra_headers=tagged(tag))
    deadline = time.monotonic() + 5
    while True:
        out = env.cli("stats", "--tenant", "neighbour", "--json")
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)["neighbour"]
        if stats["hits"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["hits"] >= 2 and stats["misses"] >= 1 and stats["entries"] >= 1 and stats["bytes"] > 0
    assert float(stats["saved_usd"]) > 0
    text = env.cli("stats")
    assert text.returncode == 0 and "neighbour" in text.stdout
    cleared = env.cli("clear", "--tenant", "neighbour", "--model", "gpt-5.4-mini")
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=msgs, temperature=0, extra_headers=tagged(tag)
    )
    assert raw.headers["x-gateway-cache"] == "miss" and env.upstream(tag) == 2


def test_anthropic_json_hit_and_alias_shares_the_entry(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    claude = env.claude()
    first = claude.messages.with_raw_response.create(
        model="claude-sonnet-5-5", max_tokens=50, messages=msgs, extra_body=ZERO, extra_headers=tagged(tag)
    )
    second = claude.messages.with_raw_response.create(
        model="sonnet", max_tokens=50, messages=msgs, extra_body=ZERO, extra_headers=tagged(tag)
    )
    assert second.headers["x-gateway-cache"] == "hit" and env.upstream(tag) == 1
    assert first.parse().content == second.parse().content


def test_the_hit_path_answers_even_without_the_provider(env: Env) -> None:
    """Served by the gateway itself: a provider failing now does not matter for a cached answer."""
    tag, msgs = uuid.uuid4().hex, question()
    oai = env.oai()
    oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    r = httpx.post(
        f"{env.stack.base_url}/v1/chat/completions",
        json={"model": "gpt-5.5", "messages": msgs, "temperature": 0},
        headers={"authorization": f"Bearer {env.keys['cached']}", **tagged(tag, **{"x-mock-status": "503"})},
    )
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "hit"
    assert env.upstream(tag) == 1
    assert sys.version_info >= (3, 11)


LONG = (
    "Our team runs a public API for weather data used by many mobile apps and we keep hitting rate "
    "limits during morning peaks so please explain how an API gateway with caching could help us"
)


def test_semantic_mode_answers_a_near_duplicate_and_not_a_different_prompt(env: Env) -> None:
    tag = uuid.uuid4().hex
    oai = env.oai("semantic")
    system = {"role": "system", "content": f"Session {tag}"}

    def ask(text: str, sys_prompt: dict[str, str] = system) -> str:
        raw = oai.chat.completions.with_raw_response.create(
            model="gpt-5.5",
            messages=[sys_prompt, {"role": "user", "content": text}],  # type: ignore[list-item]
            temperature=0,
            extra_headers=tagged(tag),
        )
        return str(raw.headers["x-gateway-cache"])

    assert ask(LONG) == "miss"
    # Case, punctuation and one more word: over the threshold, answered from the cache.
    assert ask(LONG.upper().replace(" so ", ", so, ") + " today?") == "hit"
    assert env.upstream(tag) == 1
    # Half the words different: under the threshold.
    assert ask("Our company sells shoes online and wants to know how to price them for a sale next week") == "miss"
    # The same last turn after a different history never matches.
    assert ask(LONG, {"role": "system", "content": f"Another session {tag}"}) == "miss"
    assert env.upstream(tag) == 3


def test_semantic_mode_with_an_embeddings_model_called_through_envoy(env: Env) -> None:
    """The embeddings come from the mock's /v1/embeddings (deterministic word vectors), asked by
    the server through this stack's Envoy with the embedder tenant's key: recorded like any
    client's request."""
    tag = uuid.uuid4().hex
    oai = env.oai("semantic-model")
    system = {"role": "system", "content": f"Session {tag}"}

    def ask(text: str) -> str:
        raw = oai.chat.completions.with_raw_response.create(
            model="gpt-5.5",
            messages=[system, {"role": "user", "content": text}],  # type: ignore[list-item]
            temperature=0,
            extra_headers=tagged(tag),
        )
        return str(raw.headers["x-gateway-cache"])

    before = len([r for r in env._all() if r.tenant == "embedder"])
    assert ask(LONG) == "miss"
    # One word dropped, one changed case, punctuation: cosine ~0.97 of the mock's word vectors.
    assert ask(LONG.replace(" public ", " ").replace("Our", "OUR") + "?") == "hit"
    assert ask("How do I price shoes for the sale next week, and which discount works best?") == "miss"
    assert env.upstream(tag) == 2
    deadline = time.monotonic() + 10
    while True:
        embeds = [r for r in env._all() if r.tenant == "embedder"]
        if len(embeds) - before >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    new = embeds[: len(embeds) - before]
    assert len(new) >= 3
    assert all(r.endpoint == "/v1/embeddings" and r.model == "text-embedding-3-small" for r in new)
    assert all(r.input_tokens > 0 and r.output_tokens == 0 and r.status == 200 for r in new)


def test_hits_count_against_limits_only_when_configured(env: Env) -> None:
    msgs = question()
    results: dict[str, list[int]] = {}
    second: dict[str, str] = {}
    for tenant in ("free", "counted"):
        tag = uuid.uuid4().hex
        statuses = []
        for _ in range(12):
            r = httpx.post(
                f"{env.stack.base_url}/v1/chat/completions",
                json={"model": "gpt-5.5", "messages": msgs, "temperature": 0, "max_tokens": 10},
                headers={"authorization": f"Bearer {env.keys[tenant]}", **tagged(tag)},
                timeout=10,
            )
            statuses.append(r.status_code)
            if len(statuses) == 2:
                second[tenant] = r.headers["x-gateway-request-id"]
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        results[tenant] = statuses
        assert env.upstream(tag) == 1, tenant  # every later answer came from the cache
    # ~25 tokens a request against 150 a minute: hits that count run out within a dozen.
    assert results["free"] == [200] * 12
    assert 429 in results["counted"] and results["counted"][0] == 200
    free, counted = env.record(second["free"]), env.record(second["counted"])
    assert (free.cache_hit, free.cache_counted) == (True, False)
    assert (counted.cache_hit, counted.cache_counted) == (True, True) and counted.input_tokens > 0


def test_metrics_count_lookups_and_savings(env: Env) -> None:
    tag, msgs = uuid.uuid4().hex, question()
    before = scrape(env.stack)
    oai = env.oai()
    for _ in range(3):
        oai.chat.completions.create(model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag))
    oai.chat.completions.create(
        model="gpt-5.5", messages=msgs, temperature=0, extra_headers=tagged(tag, **{"x-gateway-cache": "bypass"})
    )
    lookups: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
        series("gateway_cache_lookups_total", result="miss", model="gpt-5.5"): 1,
        series("gateway_cache_lookups_total", result="hit", model="gpt-5.5"): 2,
        series("gateway_cache_lookups_total", result="bypass", model="gpt-5.5"): 1,
    }
    saved = series("gateway_cache_saved_usd_total", tenant="cached", model="gpt-5.5")
    got = grown(env.stack, before, {**lookups, saved: 1e-12})
    assert {k: got[k] for k in lookups} == lookups and got[saved] > 0
