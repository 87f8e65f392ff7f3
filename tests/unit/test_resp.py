"""The hand-written pipelined RESP connection (extproc.store.resp), on both event loops the server
may run (uvloop's transports are not asyncio's classes), against a real redis-server."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
import uvloop

from extproc.devstack import free_port
from extproc.store.errors import StoreUnavailable
from extproc.store.redis import RedisBackend
from extproc.store.resp import ReplyError, RespConnection

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if kind == "uvloop":
        return uvloop.run(coro())
    return asyncio.run(coro())


@pytest.mark.parametrize("loop", LOOPS)
def test_concurrent_calls_get_their_own_replies(loop: str, redis_url: str) -> None:
    async def go() -> None:
        conn = RespConnection(redis_url)
        key = f"resp:{uuid.uuid4().hex}"
        replies = await asyncio.gather(*(conn.call("INCR", key) for _ in range(500)))
        assert sorted(replies) == list(range(1, 501))
        echoed = await asyncio.gather(*(conn.call("ECHO", f"v{i}") for i in range(200)))
        assert echoed == [f"v{i}" for i in range(200)]
        with pytest.raises(ReplyError, match=r"WRONGTYPE|not an integer"):
            await conn.call("LPUSH", key, "x")
        assert await conn.call("GET", key) == "500"  # the connection goes on after an error reply
        await conn.close()

    run(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
def test_scripts_are_loaded_once_when_redis_does_not_know_them(loop: str, redis_url: str) -> None:
    async def go() -> None:
        backend = RedisBackend(redis_url, prefix="t:")
        script = f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}"
        first = await backend.script(script, ["k"], ["a"])
        await backend.fast.call("SCRIPT", "FLUSH")  # a restarted Redis forgot it
        second = await backend.script(script, ["k"], ["b"])
        assert first[:2] == ["k", "a"] and second[:2] == ["k", "b"]
        await backend.close()

    run(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_killed_connection_fails_its_calls_then_reconnects(loop: str, redis_url: str) -> None:
    async def go() -> None:
        conn = RespConnection(redis_url)
        client_id = await conn.call("CLIENT", "ID")
        admin = redis.Redis.from_url(redis_url)
        killed = admin.client_kill_filter(_id=str(client_id))
        admin.close()
        assert killed == 1
        with pytest.raises(StoreUnavailable):
            for _ in range(50):  # the first call after the kill may still be written before the close arrives
                await conn.call("PING")
                await asyncio.sleep(0.01)
        assert await conn.call("PING") == "PONG"
        assert await conn.call("CLIENT", "ID") != client_id  # a new connection
        await conn.close()

    run(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
def test_unreachable_and_silent_servers_are_store_unavailable(loop: str) -> None:
    async def go() -> None:
        refused = RespConnection(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        with pytest.raises(StoreUnavailable):
            await refused.call("PING")
        # A server that accepts and never answers: the call times out, and the connection is dropped
        # so a late reply can never be taken for another command's.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        silent = RespConnection(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout=0.2)
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await silent.call("PING")
        assert silent._protocol is None
        listener.close()

    run(loop, go)


def test_auth_and_database_from_the_url(redis_url: str) -> None:
    """SELECT from the URL's path: a key written on db 3 is not on db 0."""

    async def go() -> None:
        key = f"resp:{uuid.uuid4().hex}"
        on3 = RespConnection(redis_url.rsplit("/", 1)[0] + "/3")
        on0 = RespConnection(redis_url)
        await on3.call("SET", key, "x")
        assert await on0.call("GET", key) is None and await on3.call("GET", key) == "x"
        await on3.call("DEL", key)
        bad = RespConnection(redis_url.replace("redis://", "redis://:wrong-password@"))
        with pytest.raises(StoreUnavailable):
            await bad.call("PING")
        await on3.close()
        await on0.close()

    uvloop.run(go())


def test_more_commands_at_once_than_pool_connections_wait_for_one(redis_url: str) -> None:
    """The backend's redis-py pool blocks past max_connections instead of failing: a burst of
    requests got MaxConnectionsError (503s) from a healthy Redis."""

    async def go() -> None:
        # A 5 s timeout, not the default 0.5 s: what is tested is that a command waits for a
        # connection instead of failing at once; with two test workers loading the machine the
        # last of the 212 waiters once took longer than 0.5 s (a flaky ConnectionError).
        backend = RedisBackend(redis_url, prefix="t:", max_connections=4, timeout=5.0)
        key = f"t:pool:{uuid.uuid4().hex}"
        await backend.call(backend.client.set(key, "v"))
        # BLPOP holds its connection for 50 ms: 12 of them take three rounds of the four
        # connections, well within the timeout; 200 GETs wait their turn.
        got = await asyncio.gather(
            *(backend.call(backend.client.blpop([key + ":list"], timeout=0.05)) for _ in range(12)),
            *(backend.call(backend.client.get(key)) for _ in range(200)),
        )
        assert got[:12] == [None] * 12 and got[12:] == ["v"] * 200
        await backend.close()

    asyncio.run(go())
