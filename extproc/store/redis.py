"""The one Redis client of a process: redis-py's asyncio client with a connection pool.

Every user (keys, usage, limits, cache) goes through `call`, so a slow or unreachable Redis shows
up everywhere as the same StoreUnavailable after the same bounded wait, never as a hang.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import StoreUnavailable
from .resp import ReplyError, RespConnection

T = TypeVar("T")
_TENANT = re.compile(r"[A-Za-z0-9_-]+")


async def bounded(coro: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for(coro, seconds)`, minus one leak: redis-py turns the cancellation of a
    command waiting for its reply into its own TimeoutError, and when the task awaiting this was
    cancelled itself (a health check's deadline, a client that left) wait_for cancelled the inner
    task without retrieving that exception, which the loop then logged as "Task exception was
    never retrieved" with a traceback, an ERROR line per command under load."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.wait_for(task, seconds)
    finally:
        if task.done() and not task.cancelled():
            task.exception()


@functools.lru_cache(maxsize=65536)
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

    def __init__(
        self,
        url: str,
        prefix: str = "gw:",
        timeout: float = 0.5,
        state_dir: Path | None = None,
        max_connections: int = 256,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        # Local files this process keeps even with Redis (the usage spool, the default SQLite ledger).
        self.state_dir = state_dir or Path(".extproc")
        # The request path's script calls go through one pipelined connection of its own (see resp.py).
        self.fast = RespConnection(url, timeout)
        self._shas: dict[str, str] = {}
        # Bumped whenever a script had to be loaded: after the first load of each, a Redis that
        # forgot its scripts (restarted, flushed) may have lost other state too.
        self.script_loads = 0
        # Calls that failed because Redis did not answer or refused (a metric).
        self.errors = 0
        # A blocking pool: past max_connections a command waits (up to `timeout`) for a connection
        # to come back, where the default pool fails at once (MaxConnectionsError) and a burst of
        # requests got 503s from a healthy Redis.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            max_connections=max_connections,
            timeout=timeout,
            decode_responses=True,
        )
        self.client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # closes the pool with the client

    async def call(self, coro: Awaitable[T]) -> T:
        try:
            return await bounded(coro, self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as err:
            self.errors += 1
            raise StoreUnavailable(f"redis: {type(err).__name__}") from None

    async def ping(self) -> None:
        await self.call(self.client.ping())

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA on the fast connection, loading it once when Redis does not
        know it (first use, or after a restart). Raises StoreUnavailable, or ReplyError when the
        script itself failed."""
        try:
            sha = self._shas.get(source)
            if sha is not None:
                try:
                    return await self.fast.call("EVALSHA", sha, len(keys), *keys, *args)
                except ReplyError as err:
                    if not str(err).startswith("NOSCRIPT"):
                        raise
            sha = self._shas[source] = await self.fast.call("SCRIPT", "LOAD", source)
            self.script_loads += 1
            return await self.fast.call("EVALSHA", sha, len(keys), *keys, *args)
        except StoreUnavailable:
            self.errors += 1
            raise

    async def close(self) -> None:
        await self.fast.close()
        await self.client.aclose()
