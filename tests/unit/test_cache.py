"""The response cache's parts: the key, settings resolution, client directives, entries and the
embedded store (the Redis store and the whole stage run end to end in tests/e2e/test_cache.py)."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.cache.key import cache_key, temperature_of
from extproc.cache.store import EmbeddedCacheStore, Entry, RedisCacheStore
from extproc.config import ConfigError, parse_config
from extproc.devstack import free_port, tcp_open, wait_until
from extproc.pipeline import RequestContext
from extproc.stages.cache import CacheStage, _directive
from extproc.stages.headers import StripInternalHeaders
from extproc.store.redis import RedisBackend

BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
    "max_tokens": 10,
}


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"stream": True}, True),
        ({"stream_options": {"include_usage": True}}, True),
        ({"user": "u1"}, True),
        ({"metadata": {"user_id": "x"}}, True),
        ({"model": "other-alias"}, True),
        ({"temperature": 0.5}, False),
        ({"max_tokens": 11}, False),
        ({"messages": [{"role": "user", "content": "hi!"}]}, False),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
        ({"seed": 3}, False),
        ({"stop": ["x"]}, False),
        ({"response_format": {"type": "json_object"}}, False),
        ({"some_future_field": 1}, False),
    ],
)
def test_key_covers_what_changes_the_answer(change: dict[str, Any], same: bool) -> None:
    base = cache_key("t", "openai", "gpt", BODY)
    assert (cache_key("t", "openai", "gpt", {**BODY, **change}) == base) is same


def test_key_is_per_tenant_schema_and_model_and_ignores_key_order() -> None:
    base = cache_key("t", "openai", "gpt", BODY)
    assert cache_key("t", "openai", "gpt", dict(reversed(list(BODY.items())))) == base
    assert len({base, cache_key("u", "openai", "gpt", BODY), cache_key("t", "anthropic", "gpt", BODY)}) == 3
    assert cache_key("t", "openai", "gpt2", BODY) != base


@pytest.mark.parametrize(("body", "t"), [({}, 1.0), ({"temperature": 0}, 0.0), ({"temperature": True}, 1.0)])
def test_temperature_defaults_to_the_providers(body: dict[str, Any], t: float) -> None:
    assert temperature_of(body) == t


@pytest.mark.parametrize(
    ("headers", "directive"),
    [
        ({}, ""),
        ({"x-gateway-cache": "bypass"}, "bypass"),
        ({"x-gateway-cache": "Refresh"}, "refresh"),
        ({"cache-control": "max-age=0, no-cache"}, "bypass"),
        ({"cache-control": "no-store"}, "refresh"),
        ({"x-gateway-cache": "nonsense"}, ""),
    ],
)
def test_client_directives(headers: dict[str, str], directive: str) -> None:
    assert _directive(headers) == directive


async def test_the_cache_directive_survives_the_strip_but_never_leaves() -> None:
    ctx = RequestContext()
    ctx.headers = {"x-gateway-cache": "bypass", "x-gateway-tenant": "forged"}
    await StripInternalHeaders().request_headers(ctx)
    assert ctx.headers == {"x-gateway-cache": "bypass"}
    assert set(ctx.remove_headers) == {"x-gateway-cache", "x-gateway-tenant"}


def test_settings_model_over_tenant_over_default() -> None:
    config = parse_config(
        {
            "providers": {"openai": {"schema": "openai"}},
            "cache": {"mode": "exact", "ttl_seconds": 100},
            "tenants": {"a": {"cache": {"ttl_seconds": 50, "cache_truncated": True}}, "b": {}},
            "models": [
                {"name": "gpt", "provider": "openai", "aliases": ["g"], "cache": {"mode": "off"}},
                {"name": "mini", "provider": "openai", "cache": {"max_entry_bytes": 4096}},
            ],
        }
    )
    stage = CacheStage(config, EmbeddedCacheStore(":memory:"))
    a_mini = stage.settings_for("a", "mini")
    assert (a_mini.mode, a_mini.ttl_seconds, a_mini.cache_truncated, a_mini.max_entry_bytes) == (
        "exact",
        50,
        True,
        4096,
    )
    assert stage.settings_for("b", "mini").ttl_seconds == 100
    assert stage.settings_for("a", "g").mode == "off"
    assert stage.settings_for("b", "unknown").mode == "exact"


@pytest.mark.parametrize(
    ("cache", "error"),
    [
        ({"similarity_threshold": 1.5}, "cache.similarity_threshold"),
        ({"embedding": "openai"}, "cache.embedding"),
        ({"mode": "sometimes"}, "cache.mode"),
        ({"ttl_seconds": 0}, "cache.ttl_seconds"),
        ({"max_entry_bytes": 10}, "cache.max_entry_bytes"),
        ({"surprise": 1}, "cache.surprise"),
        ({"search_timeout_seconds": 0}, "cache.search_timeout_seconds"),
        ({"search_timeout_seconds": 11}, "cache.search_timeout_seconds"),
    ],
)
def test_bad_cache_config_names_the_field(cache: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"openai": {"schema": "openai"}}, "cache": cache})
    assert error in str(info.value)


def entry(text: str = "hello") -> Entry:
    return Entry(
        "openai",
        "gpt",
        "gpt-5.5",
        "openai",
        {"choices": [{"message": {"content": text}}]},
        {"output_tokens": 3},
        time.time(),
    )


def test_entries_round_trip_and_garbage_is_a_miss() -> None:
    e = entry()
    assert Entry.decode(e.encode()) == e
    assert Entry.decode(b"not zlib") is None
    assert Entry.decode(zlib.compress(b'{"v": 99, "body": {}}')) is None
    assert Entry.decode(zlib.compress(b"[1, 2]")) is None


async def test_embedded_store_lru_ttl_clear_and_stats(tmp_path: Path) -> None:
    blobs = {k: entry(k + secrets.token_hex(300)).encode() for k in "abcd"}
    size = max(len(b) for b in blobs.values())
    # Room for three entries, not four.
    store = EmbeddedCacheStore(tmp_path / "cache.db", max_bytes=size * 3 + size // 2)
    for k in "abc":
        await store.put("t", "gpt", k, blobs[k], 60)
    assert await store.get("t", "gpt", "a") is not None  # a is now the most recently used
    await store.put("t", "gpt", "d", blobs["d"], 60)  # over the bound: b (least recently used) goes
    assert await store.get("t", "gpt", "b") is None
    assert None not in [await store.get("t", "gpt", k) for k in "acd"]
    await store.put("u", "mini", "x", blobs["a"], 1)
    assert await store.get("u", "mini", "x") is not None
    await asyncio.sleep(1.1)
    assert await store.get("u", "mini", "x") is None  # expired
    await store.count("t", hits=2, misses=1, saved_pusd=1_500_000_000_000)
    stats = await store.stats()
    # u's entry took the room of t's least recently used one.
    assert stats["t"].entries == 2 and stats["t"].hits == 2 and stats["t"].saved_usd == "1.5"
    assert await store.clear("t", "nope") == 0
    assert await store.clear("t", "gpt") == 2
    assert (await store.stats("t"))["t"].entries == 0
    await store.close()
    # Persisted: a new store on the same file sees what is left.
    again = EmbeddedCacheStore(tmp_path / "cache.db")
    assert (await again.stats("t"))["t"].hits == 2
    await again.close()


def test_an_unquoted_yaml_off_is_off() -> None:
    import yaml

    data = yaml.safe_load("providers: {openai: {schema: openai}}\ncache: {mode: off}\n")
    assert data["cache"]["mode"] is False  # YAML 1.1
    assert parse_config(data).cache.mode == "off"


def test_local_embedding_matches_near_duplicates_only() -> None:
    from extproc.cache import semantic

    long = "please explain how an api gateway with caching could help our public weather api during peaks"
    a = semantic.embed(long)
    assert semantic.cosine(a, semantic.embed(long.upper() + "!!")) == pytest.approx(1.0)
    assert semantic.cosine(a, semantic.embed(long + " today")) >= 0.95
    assert semantic.cosine(a, semantic.embed("how do I price shoes for a sale")) < 0.5
    assert semantic.unpack(semantic.pack(a)) == pytest.approx(a, abs=1e-6)
    assert semantic.embed("") == {} and semantic.unpack("garbage") == {}


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        ([{"role": "user", "content": "hi"}], "hi"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "a\nb"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None),
        ([], None),
    ],
)
def test_only_a_final_user_text_turn_is_embedded(messages: list[Any], text: str | None) -> None:
    from extproc.cache import semantic

    assert semantic.last_user_text({"messages": messages}) == text


def test_the_bucket_is_everything_but_the_last_turn() -> None:
    from extproc.cache import semantic

    system, user = {"role": "system", "content": "s"}, {"role": "user", "content": "q1"}
    body: dict[str, Any] = {"messages": [system, user], "temperature": 0}
    same = {**body, "messages": [system, {"role": "user", "content": "other question"}]}
    other_history = {**body, "messages": [{"role": "system", "content": "t"}, user]}
    b = semantic.bucket_key("t", "openai", "gpt", body)
    assert semantic.bucket_key("t", "openai", "gpt", same) == b
    assert semantic.bucket_key("t", "openai", "gpt", other_history) != b
    assert semantic.bucket_key("t", "openai", "gpt", {**body, "temperature": 0.2}) != b
    hit = semantic.best_match(semantic.embed("q1 x"), {"k": semantic.embed("Q1 x!")}, 0.95)
    assert hit is not None and hit[0] == "k"


@pytest.mark.parametrize(
    ("cache", "error"),
    [
        ({"embedding": "nope", "embedding_key_env": "K"}, "is not 'local' nor a model"),
        ({"embedding": "claude"}, "is not 'local' nor a model"),
        ({"embedding": "text-embedding-3-small"}, "embedding_key_env"),
    ],
)
def test_an_embeddings_model_must_be_an_openai_model_with_a_key(cache: dict[str, Any], error: str) -> None:
    data = {
        "providers": {"openai": {"schema": "openai"}, "anthropic": {"schema": "anthropic"}},
        "models": [
            {"name": "text-embedding-3-small", "provider": "openai"},
            {"name": "claude", "provider": "anthropic"},
        ],
        "cache": {"mode": "semantic", **cache},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert error in str(info.value)


class _SlowSearch(EmbeddedCacheStore):
    """Vectors found after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(":memory:")
        self.delay = delay

    async def candidates(self, tenant: str, model: str, bucket: str) -> dict[str, str]:
        await asyncio.sleep(self.delay)
        return await super().candidates(tenant, model, bucket)


@pytest.mark.parametrize(
    ("delay", "limit", "found"),
    [(0.0, None, True), (0.2, None, False), (0.2, 1.0, True), (0.2, 0.1, False)],
)
async def test_a_search_slower_than_search_timeout_seconds_is_a_miss(
    delay: float, limit: float | None, found: bool
) -> None:
    from extproc.cache import semantic

    cache: dict[str, Any] = {"mode": "semantic"}
    if limit is not None:
        cache["search_timeout_seconds"] = limit
    config = parse_config({"providers": {"openai": {"schema": "openai"}}, "cache": cache})
    store = _SlowSearch(delay)
    stage = CacheStage(config, store)
    settings = stage.settings_for("t", "gpt")
    assert settings.search_timeout_seconds == (limit if limit is not None else 0.05)
    vector = semantic.embed("how could an api gateway help our weather api")
    await store.put("t", "gpt", "k", entry("cached").encode(), 60)
    await store.add_vector("t", "gpt", "b", "k", semantic.pack(vector), 60)
    hit = await stage._similar("t", "gpt", "b", vector, settings)
    assert (hit is not None) is found
    await store.close()


def test_dense_vectors_are_scored_with_numpy() -> None:
    from extproc.cache import semantic

    q = [1.0, 0.0, 0.0]
    packed = {"near": semantic.pack([0.99, 0.1, 0.0]), "far": semantic.pack([0.0, 1.0, 0.0]), "bad": "x"}
    found = semantic.search(q, packed, 0.9)
    assert found is not None and found[0] == "near" and found[1] > 0.99
    assert semantic.search(q, {"far": packed["far"]}, 0.9) is None
    assert semantic.cosine(q, {1: 1.0}) == 0.0  # a sparse and a dense vector never match


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own with a 3 MB maxmemory and allkeys-lru."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (bash scripts/test installs it)"
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until("redis", lambda: tcp_open(port), [proc], 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_store_under_maxmemory_eviction_turns_entries_into_misses(small_redis: str) -> None:
    """Storing 60 entries of ~100 KB into 3 MB evicts most of them: every lookup is an entry or a
    miss (never an error), and storing keeps working."""
    backend = RedisBackend(small_redis, prefix="mm:")
    try:
        store = RedisCacheStore(backend)
        blobs = [entry(secrets.token_hex(60_000)).encode() for _ in range(60)]
        assert len(blobs[0]) > 50_000
        for i, data in enumerate(blobs):
            await store.put("t", "gpt", f"k{i}", data, 600)
        found = [await store.get("t", "gpt", f"k{i}") for i in range(60)]
        kept = [e for e in found if e is not None]
        assert 0 < len(kept) < 60  # evicted, not failed
        await store.put("t", "gpt", "fresh", blobs[0], 600)
        assert await store.get("t", "gpt", "fresh") is not None
    finally:
        await backend.close()
