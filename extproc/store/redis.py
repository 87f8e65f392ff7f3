"""The one Redis client of a process: redis-py's asyncio client with a connection pool.

Every user (keys, usage, limits, cache) goes through `call`, so a slow or unreachable Redis shows
up everywhere as the same StoreUnavailable after the same bounded wait, never as a hang.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import StoreUnavailable

T = TypeVar("T")
_TENANT = re.compile(r"[A-Za-z0-9_-]+")


def tenant_tag(tenant: str) -> str:
    """`{t:<tenant>}`: the hash tag of every key that belongs to one tenant (usage records,
    aggregates, limits), so one script can touch them together on Redis Cluster. A name outside
    [A-Za-z0-9_-] (never valid, but a brace would move the slot) is hex-encoded rather than trusted."""
    t = tenant or "_"
    if not _TENANT.fullmatch(t):
        t = "~" + t.encode().hex()
    return "{t:" + t + "}"


class RedisBackend:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "gw:", timeout: float = 0.5, state_dir: Path | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        # Local files this process keeps even with Redis (the usage spool, the default SQLite ledger).
        self.state_dir = state_dir or Path(".extproc")
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            max_connections=256,
            decode_responses=True,
        )

    async def call(self, coro: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(coro, self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as err:
            raise StoreUnavailable(f"redis: {type(err).__name__}") from None

    async def ping(self) -> None:
        await self.call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
