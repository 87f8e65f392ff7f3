"""Bounded Redis calls: what a cancelled caller leaves behind.

redis-py turns the cancellation of a command waiting for its reply into its own TimeoutError. When
the task awaiting a bounded call was itself cancelled (a health check's own deadline, a client that
left), `asyncio.wait_for` cancelled the command's inner task and never retrieved that exception:
the loop logged "Task exception was never retrieved" with a formatted traceback (an ERROR line per
command under load, and the source files kept in linecache for good).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.accounting.consumer import _call
from extproc.store.redis import RedisBackend


async def like_redis_py() -> str:
    """A command that never answers and, when cancelled, raises redis-py's TimeoutError."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RedisTimeoutError("Timeout reading from 127.0.0.1:1") from None
    return "never"


def backend_call(coro: Awaitable[str]) -> Awaitable[str]:
    return RedisBackend("redis://127.0.0.1:1/0", timeout=5.0).call(coro)


def consumer_call(coro: Awaitable[str]) -> Awaitable[str]:
    return _call(coro, 10.0)


@pytest.mark.parametrize("bounded", [backend_call, consumer_call], ids=["RedisBackend.call", "consumer._call"])
async def test_a_cancelled_caller_leaves_no_unretrieved_exception(
    bounded: Callable[[Awaitable[str]], Awaitable[str]],
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        async def caller() -> str:
            return await bounded(like_redis_py())

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.05)  # the command is waiting for its reply
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []
