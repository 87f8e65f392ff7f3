"""Keys in Redis, shared by replicas, on the process's one Redis client (extproc.store).

Layout (prefix `gw:` by default):
  {p}hash:{sha256}   -> key record (JSON)   one GET per cache miss on the hot path
  {p}key:{id}        -> sha256 of the current secret
  {p}keys            -> set of key ids
  {p}tenant:{name}   -> tenant record (JSON)
  {p}tenants         -> set of tenant names
  {p}invalidate      pub/sub channel: {"hashes": [...]} or {"all": true}

Every write publishes an invalidation; each process's subscriber drops the affected cache entries.
While the subscriber is disconnected the store reports `live = False` and callers stop caching,
so a missed message can never keep a revoked key alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from ..store.redis import RedisBackend
from .keys import Tenant, VirtualKey
from .store import KeyStore

log = logging.getLogger("extproc.auth.redis")


class RedisStore(KeyStore):
    def __init__(self, backend: RedisBackend) -> None:
        super().__init__()
        self.backend = backend
        self.prefix = backend.prefix
        self.channel = f"{self.prefix}invalidate"
        self.client = backend.client
        self._subscriber: asyncio.Task[None] | None = None
        self._live = False

    @property
    def live(self) -> bool:
        return self._live

    async def _call(self, coro: Any) -> Any:
        return await self.backend.call(coro)

    async def start(self, watch: bool = True) -> None:
        """With watch (servers), an unreachable Redis is not fatal: the subscriber keeps retrying
        and lookups fail with StoreUnavailable meanwhile. Without (the CLI), fail now."""
        if not watch:
            await self.backend.ping()
        else:
            self._subscriber = asyncio.create_task(self._subscribe_forever())

    async def _subscribe_forever(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                # Anything published while we were away is lost: start from an empty cache.
                self._notify(None)
                self._live = True
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._handle(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if self._live:
                    log.warning(
                        "redis invalidation channel lost (%s); caching off until it is back", type(err).__name__
                    )
                self._live = False
                self._notify(None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8

    def _handle(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            return
        hashes = msg.get("hashes") if isinstance(msg, dict) else None
        self._notify([h for h in hashes if isinstance(h, str)] if isinstance(hashes, list) else None)

    async def close(self) -> None:
        self._live = False
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def find_by_hash(self, key_hash: str) -> VirtualKey | None:
        raw = await self._call(self.client.get(self._k("hash", key_hash)))
        return VirtualKey.from_dict(json.loads(raw)) if raw else None

    async def get_key(self, key_id: str) -> VirtualKey | None:
        key_hash = await self._call(self.client.get(self._k("key", key_id)))
        return await self.find_by_hash(key_hash) if key_hash else None

    async def list_keys(self, tenant: str | None = None) -> list[VirtualKey]:
        ids = sorted(await self._call(self.client.smembers(self._k("keys"))))
        if not ids:
            return []
        hashes = await self._call(self.client.mget([self._k("key", i) for i in ids]))
        live = [h for h in hashes if h]
        records = await self._call(self.client.mget([self._k("hash", h) for h in live])) if live else []
        keys = [VirtualKey.from_dict(json.loads(r)) for r in records if r]
        return sorted((k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: k.created_at)

    async def put_key(self, key: VirtualKey, replaces_hash: str | None = None) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k("hash", key.key_hash), json.dumps(key.to_dict()))
        pipe.set(self._k("key", key.id), key.key_hash)
        pipe.sadd(self._k("keys"), key.id)
        changed = [key.key_hash]
        if replaces_hash and replaces_hash != key.key_hash:
            pipe.delete(self._k("hash", replaces_hash))
            changed.append(replaces_hash)
        pipe.publish(self.channel, json.dumps({"hashes": changed}))
        await self._call(pipe.execute())
        self._notify(changed)

    async def get_tenant(self, name: str) -> Tenant | None:
        raw = await self._call(self.client.get(self._k("tenant", name)))
        return Tenant.from_dict(json.loads(raw)) if raw else None

    async def list_tenants(self) -> list[Tenant]:
        names = sorted(await self._call(self.client.smembers(self._k("tenants"))))
        if not names:
            return []
        raws = await self._call(self.client.mget([self._k("tenant", n) for n in names]))
        return [Tenant.from_dict(json.loads(r)) for r in raws if r]

    async def put_tenant(self, tenant: Tenant) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k("tenant", tenant.name), json.dumps(tenant.to_dict()))
        pipe.sadd(self._k("tenants"), tenant.name)
        pipe.publish(self.channel, json.dumps({"all": True}))
        await self._call(pipe.execute())
        self._notify(None)
