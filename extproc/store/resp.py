"""One pipelined RESP connection for the scripts on the request path.

Written by hand because redis-py's asyncio client costs ~140-220 µs of CPU per command on the
reference machine (connection pool checkout, retry wrapper, health checks, argument encoding in
Python), which is as much as the whole rest of a request's limit check; a limit check is two script
calls per request. Here a command is `hiredis.pack_command` + one transport write, and replies are
parsed by hiredis and matched to callers in order (RESP replies come back in the order the commands
were sent): ~15-25 µs per call, and concurrent requests share the connection and its round trips.

It does only that: send a command, await its reply. Commands made in one event-loop iteration go out
in one write, and one watchdog per connection (not a timer per call) enforces the timeout.
Everything else (pub/sub, streams, admin) stays on redis-py through RedisBackend. It speaks RESP2
with AUTH and SELECT from the same URL, over TCP, TLS (`rediss://`) or a unix socket. Any failure
(refused, reset, a reply later than the timeout) closes the connection and fails every call waiting
on it with StoreUnavailable; the next call reconnects. A late reply can therefore never be taken for
the answer to a later command.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, parse_url

from .errors import StoreUnavailable


class ReplyError(Exception):
    """Redis answered this command with an error (a reply, not an outage), e.g. NOSCRIPT."""


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RespConnection) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(encoding="utf-8")
        # Calls waiting for their reply, in the order their commands were written, with when each
        # was sent (a watchdog, not a timer per call, fails the connection when the oldest is late).
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        # Commands of this loop iteration, written together (one syscall for many callers).
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes, fut: asyncio.Future[Any], now: float) -> None:
        self.waiting.append((fut, now))
        self.out.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            fut.get_loop().call_soon(self.flush)
        if self.watchdog is None:
            self.watchdog = fut.get_loop().call_later(self.owner.timeout, self.check)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out = []

    def check(self) -> None:
        """A reply later than the timeout: the connection is dropped, so that reply can never be
        taken for the answer to a later command."""
        self.watchdog = None
        if not self.waiting:
            return
        loop = self.waiting[0][0].get_loop()
        age = loop.time() - self.waiting[0][1]
        if age >= self.owner.timeout:
            self.fail("TimeoutError")
        else:
            self.watchdog = loop.call_later(self.owner.timeout - age, self.check)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self.fail("protocol error")
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail("a reply nobody asked for")
                return
            fut, _ = self.waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(ReplyError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("connection lost")

    def fail(self, why: str) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.out = []
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(StoreUnavailable(f"redis: {why}"))
        if self.owner._protocol is self:
            self.owner._protocol = None


class RespConnection:
    def __init__(self, url: str, timeout: float = 0.5) -> None:
        self.timeout = timeout
        opts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._path: str | None = opts.get("path")
        self._host: str = opts.get("host", "localhost")
        self._port: int = int(opts.get("port", 6379))
        self._ssl = ssl.create_default_context() if opts.get("connection_class") is SSLConnection else None
        self._hello: list[tuple[Any, ...]] = []
        if opts.get("password"):
            user = opts.get("username")
            self._hello.append(("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"]))
        if int(opts.get("db") or 0):
            self._hello.append(("SELECT", int(opts["db"])))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto = _Protocol(self)
        try:
            if self._path:
                coro = loop.create_unix_connection(lambda: proto, self._path, ssl=self._ssl)
            else:
                coro = loop.create_connection(lambda: proto, self._host, self._port, ssl=self._ssl)
            await asyncio.wait_for(coro, self.timeout)
            for cmd in self._hello:
                await self._send(proto, cmd)
        except ReplyError as err:
            proto.fail("handshake refused")
            raise StoreUnavailable(f"redis: {str(err).split(' ', 1)[0]}") from None
        except (OSError, TimeoutError) as err:
            proto.fail("connect failed")
            raise StoreUnavailable(f"redis: {type(err).__name__}") from None
        return proto

    async def _ready(self) -> _Protocol:
        proto = self._protocol
        if proto is not None and proto.transport is not None:
            return proto
        # One connect at a time; concurrent callers wait for it.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            proto = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._protocol = proto
        return proto

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        if proto.transport is None:
            raise StoreUnavailable("redis: connection lost")
        return await self._queue(proto, args)

    @staticmethod
    def _queue(proto: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        proto.send(hiredis.pack_command(args), fut, loop.time())
        return fut

    def call(self, *args: Any) -> Awaitable[Any]:
        """One command's reply. Raises ReplyError (Redis said no) or StoreUnavailable. While the
        connection is up, the reply's future itself (no coroutine frames on the request path)."""
        proto = self._protocol
        if proto is not None and proto.transport is not None:
            return self._queue(proto, args)
        return self._call_connecting(args)

    async def _call_connecting(self, args: tuple[Any, ...]) -> Any:
        return await self._send(await self._ready(), args)

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.fail("closed")
