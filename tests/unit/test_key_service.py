"""The per-process cache in front of the store: hits, invalidation, and when not to cache."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.auth.keys import VirtualKey, hash_key, mint
from extproc.auth.service import AdminError, AuthFailure, KeyService
from extproc.auth.store import StoreUnavailable
from extproc.config import parse_config
from tests.memstore import CountingStore

CONFIG = parse_config(
    {
        "providers": {"openai": {"schema": "openai"}},
        "tenants": {"platform": {"models": ["gpt-*"]}},
        "auth": {
            "cache_ttl_seconds": 5,
            "static_keys": [
                {"id": "ci", "name": "ci", "tenant": "platform", "sha256": hash_key("sk-gw-" + "s" * 32)},
                {
                    "id": "old",
                    "name": "old",
                    "tenant": "platform",
                    "sha256": hash_key("sk-gw-" + "o" * 32),
                    "expires_at": "2020-01-01T00:00:00Z",
                },
            ],
        },
    }
)


async def setup() -> tuple[CountingStore, KeyService, str, VirtualKey]:
    store = CountingStore()
    svc = KeyService(store, CONFIG)
    await svc.create_tenant("acme", None)
    secret, key = await svc.create_key("acme", "app")
    return store, svc, secret, key


async def test_cache_hits_and_invalidation() -> None:
    store, svc, secret, key = await setup()
    ident = await svc.authenticate(secret)
    assert (ident.tenant, ident.key_id) == ("acme", key.id)
    await svc.authenticate(secret)
    assert store.lookups == 1, "second lookup is served from the cache"
    await svc.revoke_key(key.id)
    with pytest.raises(AuthFailure) as err:
        await svc.authenticate(secret)
    assert err.value.code == "revoked_api_key"


async def test_no_caching_while_the_store_is_not_live() -> None:
    store, svc, secret, _ = await setup()
    store.is_live = False
    await svc.authenticate(secret)
    await svc.authenticate(secret)
    assert store.lookups == 2


async def test_ttl_backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    store, svc, secret, _ = await setup()
    await svc.authenticate(secret)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 6)
    await svc.authenticate(secret)
    assert store.lookups == 2


async def test_unknown_keys_are_cached_negatively_until_created() -> None:
    store, svc, _, _ = await setup()
    ghost = "sk-gw-" + "g" * 32
    for _ in range(3):
        with pytest.raises(AuthFailure, match="invalid_api_key"):
            await svc.authenticate(ghost)
    assert store.lookups == 1
    _, key = mint("acme", "late")
    key = key.with_changes(key_hash=hash_key(ghost))
    await store.put_key(key)  # creation invalidates the negative entry
    assert (await svc.authenticate(ghost)).key_id == key.id


async def test_lookup_racing_an_invalidation_is_not_cached() -> None:
    store, svc, secret, _ = await setup()
    original = store.find_by_hash

    async def racing(h: str) -> VirtualKey | None:
        found = await original(h)
        store._notify([h])  # the key changes while our lookup is in flight
        return found

    store.find_by_hash = racing  # type: ignore[method-assign,assignment]
    await svc.authenticate(secret)
    store.find_by_hash = original  # type: ignore[method-assign]
    await svc.authenticate(secret)
    assert store.lookups == 2


def _slow_lookups(store: CountingStore) -> asyncio.Event:
    """The store answers once the returned event is set: lookups pile up meanwhile, as in a burst."""
    release = asyncio.Event()
    original = store.find_by_hash

    async def slow(h: str) -> VirtualKey | None:
        await release.wait()
        return await original(h)

    store.find_by_hash = slow  # type: ignore[method-assign,assignment]
    return release


async def test_a_burst_for_a_key_not_in_the_cache_makes_one_lookup() -> None:
    """5,000 requests at once with a cold cache took every Redis connection (109 refused)."""
    store, svc, secret, key = await setup()
    release = _slow_lookups(store)
    burst = [asyncio.ensure_future(svc.authenticate(secret)) for _ in range(200)]
    ghosts = [asyncio.ensure_future(svc.authenticate("sk-gw-" + "g" * 32)) for _ in range(50)]
    await asyncio.sleep(0.01)
    burst[0].cancel()  # the client that started the lookup leaves: the others still get the answer
    release.set()
    assert {i.key_id for i in await asyncio.gather(*burst[1:])} == {key.id}
    assert burst[0].cancelled()
    for failed in await asyncio.gather(*ghosts, return_exceptions=True):
        assert isinstance(failed, AuthFailure) and failed.code == "invalid_api_key"
    assert store.lookups == 2  # one per key
    assert not svc._pending


async def test_a_failed_shared_lookup_fails_its_waiters_and_is_not_kept() -> None:
    store, svc, secret, _ = await setup()
    release = _slow_lookups(store)
    store.down = True
    waiting = [asyncio.ensure_future(svc.authenticate(secret)) for _ in range(20)]
    await asyncio.sleep(0.01)
    release.set()
    for failed in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(failed, StoreUnavailable)
    assert store.lookups == 1
    store.down = False
    assert (await svc.authenticate(secret)).tenant == "acme"  # tried again, not a kept failure
    assert store.lookups == 2


async def test_a_request_after_an_invalidation_does_not_join_the_older_lookup() -> None:
    """A revocation while a lookup is in flight: requests arriving after it start their own."""
    store, svc, secret, key = await setup()
    release = _slow_lookups(store)
    before = asyncio.ensure_future(svc.authenticate(secret))
    await asyncio.sleep(0.01)
    await svc.revoke_key(key.id)
    after = asyncio.ensure_future(svc.authenticate(secret))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(before, return_exceptions=True)  # either answer is fair for it
    with pytest.raises(AuthFailure, match="revoked_api_key"):
        await after
    assert store.lookups == 2


async def test_rotation() -> None:
    _, svc, secret, key = await setup()
    await svc.authenticate(secret)
    new_secret, rotated = await svc.rotate_key(key.id)
    assert rotated.id == key.id and new_secret != secret
    assert (await svc.authenticate(new_secret)).key_id == key.id
    with pytest.raises(AuthFailure, match="invalid_api_key"):
        await svc.authenticate(secret)


async def test_expiry_is_checked_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    _, svc, _, _ = await setup()
    secret, _ = await svc.create_key("acme", "short", ttl=60)
    await svc.authenticate(secret)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    with pytest.raises(AuthFailure, match="expired_api_key"):
        await svc.authenticate(secret)


async def test_static_keys_and_tenants() -> None:
    _, svc, _, _ = await setup()
    ident = await svc.authenticate("sk-gw-" + "s" * 32)
    assert (ident.key_id, ident.tenant) == ("ci", "platform")
    assert ident.models.allows("gpt-5.5") and not ident.models.allows("claude-x")
    with pytest.raises(AuthFailure, match="expired_api_key"):
        await svc.authenticate("sk-gw-" + "o" * 32)
    with pytest.raises(AdminError, match=r"defined in gateway\.yaml"):
        await svc.revoke_key("ci")
    with pytest.raises(AdminError, match=r"defined in gateway\.yaml"):
        await svc.update_tenant("platform", None)
    assert {k.id for k in await svc.list_keys("platform")} == {"ci", "old"}


async def test_admin_errors() -> None:
    _, svc, _, key = await setup()
    with pytest.raises(AdminError, match="unknown tenant 'nope'"):
        await svc.create_key("nope", "x")
    with pytest.raises(AdminError, match="already exists"):
        await svc.create_tenant("acme", None)
    with pytest.raises(AdminError, match="unknown key"):
        await svc.revoke_key("key_0000000000000000")
    await svc.revoke_key(key.id)
    with pytest.raises(AdminError, match="is revoked"):
        await svc.rotate_key(key.id)


async def test_tenant_change_reaches_cached_identities() -> None:
    _, svc, secret, _ = await setup()
    assert (await svc.authenticate(secret)).models.allows("claude-x")
    await svc.update_tenant("acme", ("gpt-*",))
    assert not (await svc.authenticate(secret)).models.allows("claude-x")
