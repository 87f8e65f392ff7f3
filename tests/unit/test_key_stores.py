"""One contract, two stores: the embedded SQLite store and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from extproc.auth.embedded import EmbeddedStore
from extproc.auth.keys import Tenant, mint
from extproc.auth.redis_store import RedisStore
from extproc.auth.store import KeyStore, StoreUnavailable
from extproc.store import RedisBackend

Factory = Callable[[], KeyStore]


@pytest.fixture(params=["embedded", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Returns a factory: every call opens another handle on the *same* backing store, as another
    process would."""
    opened: list[KeyStore] = []
    backends: list[RedisBackend] = []
    prefix = f"t{uuid.uuid4().hex[:8]}:"

    def factory() -> KeyStore:
        if request.param == "embedded":
            store: KeyStore = EmbeddedStore(tmp_path / "state.db", poll_interval=0.05)
        else:
            backend = RedisBackend(request.getfixturevalue("redis_url"), prefix=prefix)
            backends.append(backend)
            store = RedisStore(backend)
        opened.append(store)
        return store

    yield factory
    for s in opened:
        await s.close()
    for b in backends:
        await b.close()


async def wait_for(cond: Callable[[], Awaitable[bool]], limit: float = 1.0) -> float:
    start = time.monotonic()
    while not await cond():
        assert time.monotonic() - start < limit, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_put_find_list(make_store: Factory) -> None:
    store = make_store()
    await store.start(watch=False)
    _, k1 = mint("acme", "one")
    _, k2 = mint("beta", "two", models=("gpt-*",))
    await store.put_key(k1)
    await store.put_key(k2)
    assert await store.find_by_hash(k1.key_hash) == k1
    assert await store.get_key(k2.id) == k2
    assert await store.find_by_hash("0" * 64) is None
    assert await store.get_key("key_missing") is None
    assert [k.id for k in await store.list_keys()] == [k1.id, k2.id]
    assert [k.id for k in await store.list_keys("beta")] == [k2.id]


async def test_rotation_kills_the_old_hash(make_store: Factory) -> None:
    store = make_store()
    await store.start(watch=False)
    _, key = mint("acme", "k")
    await store.put_key(key)
    _, other = mint("acme", "k")
    rotated = key.with_changes(key_hash=other.key_hash, prefix=other.prefix)
    await store.put_key(rotated, replaces_hash=key.key_hash)
    assert await store.find_by_hash(key.key_hash) is None
    assert await store.find_by_hash(rotated.key_hash) == rotated
    assert await store.get_key(key.id) == rotated
    assert len(await store.list_keys()) == 1


async def test_tenants(make_store: Factory) -> None:
    store = make_store()
    await store.start(watch=False)
    await store.put_tenant(Tenant("b", None))
    await store.put_tenant(Tenant("a", ("gpt-*",), {"rpm": 5}))
    assert [t.name for t in await store.list_tenants()] == ["a", "b"]
    assert await store.get_tenant("a") == Tenant("a", ("gpt-*",), {"rpm": 5})
    assert await store.get_tenant("zzz") is None


async def test_changes_reach_another_process_within_a_second(make_store: Factory) -> None:
    server = make_store()
    heard: list[list[str] | None] = []
    server.on_invalidate(heard.append)
    await server.start(watch=True)
    await wait_for(lambda: _true(server.live))
    cli = make_store()
    await cli.start(watch=False)
    _, key = mint("acme", "k")
    await cli.put_key(key)

    async def seen() -> bool:
        return await server.find_by_hash(key.key_hash) == key

    await wait_for(seen)
    heard.clear()
    await cli.put_key(key.with_changes(revoked_at=time.time()))

    async def revoked() -> bool:
        found = await server.find_by_hash(key.key_hash)
        return bool(heard) and found is not None and found.revoked_at is not None

    assert await wait_for(revoked) < 1.0
    # Both stores name the changed key, so a cache drops exactly it (None would hide a lost message).
    assert heard[-1] is not None and key.key_hash in heard[-1]


async def _true(v: bool) -> bool:
    return v


async def test_redis_unreachable_is_store_unavailable() -> None:
    backend = RedisBackend("redis://127.0.0.1:1/0", timeout=0.2)
    store = RedisStore(backend)
    try:
        with pytest.raises(StoreUnavailable):
            await store.start(watch=False)
        with pytest.raises(StoreUnavailable):
            await store.find_by_hash("0" * 64)
        await store.start(watch=True)  # servers start anyway and keep retrying
        await asyncio.sleep(0.3)
        assert not store.live
    finally:
        await store.close()
        await backend.close()


async def test_embedded_unwritable_path_is_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = EmbeddedStore(blocker / "sub" / "state.db")
    with pytest.raises(StoreUnavailable):
        await store.start(watch=False)
