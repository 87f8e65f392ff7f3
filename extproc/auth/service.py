"""Key lookups for the hot path and key management for the CLI, over any KeyStore.

Lookups go: static keys from gateway.yaml, then this process's cache, then the store. The cache is
used only while the store is `live` (it will hear about every change), and a generation counter
keeps a lookup that raced with an invalidation from caching stale data.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from ..config import GatewayConfig
from ..limits.spec import EPOCH_FIELD, LimitSpec
from .keys import Identity, Tenant, VirtualKey, display_prefix, hash_key, mint, new_secret
from .store import KeyStore, StoreUnavailable

_MAX_CACHE = 100_000


class AuthFailure(Exception):
    def __init__(self, code: str, key: VirtualKey | None = None) -> None:
        super().__init__(code)
        self.code = code  # invalid_api_key | expired_api_key | revoked_api_key
        self.key = key


class AdminError(Exception):
    """A management request that cannot be done; the message is for the operator."""


@dataclass
class _Entry:
    expires: float
    key: VirtualKey | None
    identity: Identity | None


def _with_limits(policy: dict[str, Any], limits: LimitSpec | None) -> dict[str, Any]:
    return {**policy, "limits": limits.to_dict()} if limits is not None else dict(policy)


def _static_layer(config: GatewayConfig) -> tuple[dict[str, VirtualKey], dict[str, Tenant]]:
    tenants = {name: Tenant(name, t.models, _with_limits(t.policy, t.limits)) for name, t in config.tenants.items()}
    keys = {}
    for k in config.auth.static_keys:
        keys[k.sha256] = VirtualKey(
            id=k.id,
            name=k.name,
            tenant=k.tenant,
            key_hash=k.sha256,
            prefix="(static)",
            created_at=0.0,
            expires_at=k.expires_at.timestamp() if k.expires_at else None,
            models=k.models,
            policy=_with_limits({}, k.limits),
            static=True,
        )
    return keys, tenants


class KeyService:
    def __init__(self, store: KeyStore, config: GatewayConfig) -> None:
        self.store = store
        self.ttl = config.auth.cache_ttl_seconds
        self.static_keys, self.static_tenants = _static_layer(config)
        self._cache: dict[str, _Entry] = {}
        # Store lookups in flight, by key hash: requests for a key the cache lacks share one.
        self._pending: dict[str, asyncio.Future[_Entry]] = {}
        self._generation = 0
        store.on_invalidate(self._invalidate)

    def _invalidate(self, hashes: list[str] | None) -> None:
        self._generation += 1
        # A lookup in flight may have read the store before the change: requests arriving from
        # now on start their own (the generation keeps the old one out of the cache).
        if hashes is None:
            self._cache.clear()
            self._pending.clear()
        else:
            for h in hashes:
                self._cache.pop(h, None)
                self._pending.pop(h, None)

    async def tenant(self, name: str) -> Tenant | None:
        static = self.static_tenants.get(name)
        if static is None:
            return await self.store.get_tenant(name)
        # A tenant from gateway.yaml may have a stored record holding only what the CLI may change
        # for it: the limits reset epoch (`extproc limits reset`). A static tenant keeps working
        # while the store is unreachable (without a reset made meanwhile).
        try:
            overlay = await self.store.get_tenant(name)
        except StoreUnavailable:
            return static
        if overlay is not None and overlay.policy.get(EPOCH_FIELD):
            return replace(static, policy={**static.policy, EPOCH_FIELD: overlay.policy[EPOCH_FIELD]})
        return static

    async def authenticate(self, secret: str) -> Identity:
        """Raises AuthFailure, or StoreUnavailable when the store cannot answer."""
        h = hash_key(secret)
        now = time.time()
        entry = self._cache.get(h)
        if entry is None or entry.expires <= now or not self.store.live:
            entry = await self._lookup(h)
        key = entry.key
        if key is None or entry.identity is None:
            raise AuthFailure("invalid_api_key")
        status = key.status(now)
        if status != "active":
            raise AuthFailure(f"{status}_api_key", key)
        return entry.identity

    async def _lookup(self, h: str) -> _Entry:
        """One store lookup per key at a time. A burst of requests with a key the cache lacks (a
        start, an expired entry, an invalidation) used to send one lookup each: 5,000 at once took
        every connection of the Redis pool and 109 requests were refused `auth_unavailable`. Now
        they wait for one answer (its failure too). Shielded: a client that leaves does not cancel
        the lookup the others wait for."""
        pending = self._pending.get(h)
        if pending is None:
            pending = self._pending[h] = asyncio.ensure_future(self._fetch(h))

            def done(fut: asyncio.Future[_Entry]) -> None:
                if self._pending.get(h) is fut:
                    del self._pending[h]
                if not fut.cancelled():
                    fut.exception()  # retrieved even when every waiter has left

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    async def _fetch(self, h: str) -> _Entry:
        generation = self._generation
        key = self.static_keys.get(h) or await self.store.find_by_hash(h)
        identity = Identity.of(key, await self.tenant(key.tenant)) if key else None
        entry = _Entry(time.time() + self.ttl, key, identity)
        if self.store.live and generation == self._generation:
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()  # a flood of random keys must not grow memory without bound
            self._cache[h] = entry
        return entry

    # -- management (CLI) -------------------------------------------------------------------------

    async def list_tenants(self) -> list[tuple[Tenant, bool]]:
        stored = [t for t in await self.store.list_tenants() if t.name not in self.static_tenants]
        return [(t, True) for t in self.static_tenants.values()] + [(t, False) for t in stored]

    async def create_tenant(self, name: str, models: tuple[str, ...] | None) -> Tenant:
        if name in self.static_tenants or await self.store.get_tenant(name):
            raise AdminError(f"tenant {name!r} already exists")
        tenant = Tenant(name, models, {}, time.time())
        await self.store.put_tenant(tenant)
        return tenant

    async def ensure_tenant(self, name: str) -> Tenant:
        """The tenant, created with no defaults if it does not exist yet."""
        return await self.tenant(name) or await self.create_tenant(name, None)

    async def update_tenant(self, name: str, models: tuple[str, ...] | None) -> Tenant:
        if name in self.static_tenants:
            raise AdminError(f"tenant {name!r} is defined in gateway.yaml; edit it there")
        tenant = await self.store.get_tenant(name)
        if tenant is None:
            raise AdminError(f"unknown tenant {name!r}")
        updated = Tenant(tenant.name, models, tenant.policy, tenant.created_at)
        await self.store.put_tenant(updated)
        return updated

    # -- limits (CLI) --------------------------------------------------------------------------------

    async def set_tenant_limits(self, name: str, limits: LimitSpec) -> Tenant:
        if name in self.static_tenants:
            raise AdminError(f"tenant {name!r} is defined in gateway.yaml; set its limits there")
        tenant = await self.store.get_tenant(name)
        if tenant is None:
            raise AdminError(f"unknown tenant {name!r}")
        policy = {k: v for k, v in tenant.policy.items() if k != "limits"}
        if not limits.empty:
            policy["limits"] = limits.to_dict()
        updated = replace(tenant, policy=policy)
        await self.store.put_tenant(updated)
        return updated

    async def set_key_limits(self, key_id: str, limits: LimitSpec) -> VirtualKey:
        key = await self._managed(key_id)
        policy = {k: v for k, v in key.policy.items() if k != "limits"}
        if not limits.empty:
            policy["limits"] = limits.to_dict()
        updated = key.with_changes(policy=policy)
        await self.store.put_key(updated)
        return updated

    async def reset_tenant_limits(self, name: str) -> Tenant:
        """A new epoch: the tenant's rate and concurrency counters start over (budgets keep their
        spend). Also for a tenant from gateway.yaml (the epoch is stored beside it)."""
        tenant = await self.tenant(name)
        if tenant is None:
            raise AdminError(f"unknown tenant {name!r}")
        stored = await self.store.get_tenant(name)
        if stored is None:  # a gateway.yaml tenant without a stored record yet
            stored = Tenant(name, None, {}, time.time())
        epoch = int(tenant.policy.get(EPOCH_FIELD) or 0) + 1
        await self.store.put_tenant(replace(stored, policy={**stored.policy, EPOCH_FIELD: epoch}))
        return replace(tenant, policy={**tenant.policy, EPOCH_FIELD: epoch})

    async def reset_key_limits(self, key_id: str) -> VirtualKey:
        key = await self._managed(key_id)
        updated = key.with_changes(policy={**key.policy, EPOCH_FIELD: int(key.policy.get(EPOCH_FIELD) or 0) + 1})
        await self.store.put_key(updated)
        return updated

    async def create_key(
        self, tenant: str, name: str, models: tuple[str, ...] | None = None, ttl: float | None = None
    ) -> tuple[str, VirtualKey]:
        if await self.tenant(tenant) is None:
            raise AdminError(f"unknown tenant {tenant!r}; create it first: extproc tenants create {tenant}")
        secret, key = mint(tenant, name, models, ttl)
        await self.store.put_key(key)
        return secret, key

    async def get_key(self, key_id: str) -> VirtualKey:
        for k in self.static_keys.values():
            if k.id == key_id:
                return k
        key = await self.store.get_key(key_id)
        if key is None:
            raise AdminError(f"unknown key {key_id!r}")
        return key

    async def list_keys(self, tenant: str | None = None) -> list[VirtualKey]:
        static = [k for k in self.static_keys.values() if tenant is None or k.tenant == tenant]
        return static + await self.store.list_keys(tenant)

    async def _managed(self, key_id: str) -> VirtualKey:
        key = await self.get_key(key_id)
        if key.static:
            raise AdminError(f"key {key_id!r} is defined in gateway.yaml; remove or change it there")
        return key

    async def revoke_key(self, key_id: str) -> VirtualKey:
        key = await self._managed(key_id)
        if key.revoked_at is not None:
            return key
        revoked = key.with_changes(revoked_at=time.time())
        await self.store.put_key(revoked)
        return revoked

    async def rotate_key(self, key_id: str) -> tuple[str, VirtualKey]:
        key = await self._managed(key_id)
        if key.revoked_at is not None:
            raise AdminError(f"key {key_id!r} is revoked; create a new one")
        secret = new_secret()
        rotated = key.with_changes(key_hash=hash_key(secret), prefix=display_prefix(secret))
        await self.store.put_key(rotated, replaces_hash=key.key_hash)
        return secret, rotated
