"""The native HTTP/2 + gRPC transport against a real HTTP/2 client (the `h2` library over a socket):
the protocol paths Envoy may take that the end-to-end tests do not force (flow control with small
windows, messages split and packed across frames, resets, protocol errors, graceful shutdown)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from extproc.pipeline import DirectReply, Pipeline, RequestContext, Stage
from extproc.transport.h2server import PATH, NativeServer
from extproc.wire import external_processor_pb2 as ep


class Probe(Stage):
    """Answers /big with a large direct reply, holds /hold until released, counts finishes."""

    name = "probe"

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def request_headers(self, ctx: RequestContext) -> None:
        if ctx.path == "/big":
            ctx.reply = DirectReply(200, b"x" * (3 * 1024 * 1024))
        elif ctx.path == "/hold":
            self.holding.set()
            await self.release.wait()
            ctx.reply = DirectReply(200, b"released")
        else:
            ctx.reply = DirectReply(200, ctx.path.encode())

    async def finish(self, ctx: RequestContext) -> None:
        self.finished.append(ctx.path)


def headers_message(path: str) -> bytes:
    req = ep.ProcessingRequest()
    for k, v in ((":method", "POST"), (":path", path)):
        h = req.request_headers.headers.headers.add()
        h.key = k
        h.raw_value = v.encode()
    req.request_headers.end_of_stream = True
    payload = req.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass
class Client:
    """A blocking-free HTTP/2 client driven by the test: send, then read until a condition."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    events: list[Any] = field(default_factory=list)
    data: dict[int, bytearray] = field(default_factory=dict)

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def open(self, path: bytes = PATH, end: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(":method", "POST"), (":scheme", "http"), (":path", path.decode()), (":authority", "x"),
             ("content-type", "application/grpc"), ("te", "trailers")],
            end_stream=end,
        )  # fmt: skip
        self.flush()
        return sid

    async def pump(self, until: Any, limit: float = 5.0) -> None:
        async def go() -> None:
            while not until(self):
                chunk = await self.reader.read(65536)
                if not chunk:
                    return
                for ev in self.conn.receive_data(chunk):
                    self.events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.flush()

        await asyncio.wait_for(go(), limit)

    def ended(self, sid: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and e.stream_id == sid for e in self.events
        )

    def trailers(self, sid: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.events:
            if isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived) and e.stream_id == sid:
                out.update({str(k): str(v) for k, v in e.headers or ()})
        return out

    def replies(self, sid: int) -> list[ep.ProcessingResponse]:
        buf, out = bytes(self.data.get(sid, b"")), []
        while len(buf) >= 5:
            n = int.from_bytes(buf[1:5], "big")
            out.append(ep.ProcessingResponse.FromString(buf[5 : 5 + n]))
            buf = buf[5 + n :]
        return out


@dataclass
class Env:
    server: NativeServer
    probe: Probe

    async def client(self, window: int | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        if window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        c = Client(reader, writer, conn)
        c.flush()
        return c


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    probe = Probe()
    server = NativeServer(Pipeline([probe]), "127.0.0.1:0", max_message=1024 * 1024, max_streams=100)
    await server.start()
    yield Env(server, probe)
    await server.stop(0)


async def test_one_stream(env: Env) -> None:
    c = await env.client()
    sid = c.open()
    c.conn.send_data(sid, headers_message("/hello"), end_stream=True)
    c.flush()
    await c.pump(lambda c: c.ended(sid))
    (reply,) = c.replies(sid)
    assert reply.immediate_response.body == b"/hello"
    assert c.trailers(sid)["grpc-status"] == "0"
    await asyncio.sleep(0.05)
    assert env.probe.finished == ["/hello"]


async def test_messages_split_across_frames_and_packed_together(env: Env) -> None:
    c = await env.client()
    sids = [c.open() for _ in range(3)]
    whole = headers_message("/a")
    sid = sids[0]
    for i in range(len(whole)):  # one byte per DATA frame
        c.conn.send_data(sid, whole[i : i + 1])
    c.conn.end_stream(sid)
    # Two messages in one frame: the second one is never read (the stream ends after the first
    # reply) and must not break anything.
    c.conn.send_data(sids[1], headers_message("/b") + headers_message("/b2"), end_stream=True)
    c.conn.send_data(sids[2], headers_message("/c"), end_stream=True)
    c.flush()
    await c.pump(lambda c: all(c.ended(s) for s in sids))
    assert [c.replies(s)[0].immediate_response.body for s in sids] == [b"/a", b"/b", b"/c"]


async def test_a_large_reply_waits_for_the_clients_window(env: Env) -> None:
    c = await env.client(window=1024)
    sid = c.open()
    c.conn.send_data(sid, headers_message("/big"), end_stream=True)
    c.flush()
    await c.pump(lambda c: c.ended(sid), limit=20)
    (reply,) = c.replies(sid)
    assert len(reply.immediate_response.body) == 3 * 1024 * 1024


async def test_a_reset_stream_still_finishes(env: Env) -> None:
    c = await env.client()
    sid = c.open()
    c.conn.send_data(sid, headers_message("/hold"))
    c.flush()
    await asyncio.wait_for(env.probe.holding.wait(), 5)
    c.conn.reset_stream(sid, 8)  # CANCEL: the client went away
    c.flush()
    for _ in range(100):
        if env.probe.finished:
            break
        await asyncio.sleep(0.01)
    assert env.probe.finished == ["/hold"]


async def test_unknown_method_compressed_oversized_and_malformed_messages(env: Env) -> None:
    c = await env.client()
    unknown = c.open(b"/grpc.health.v1.Health/Check", end=True)
    compressed = c.open()
    c.conn.send_data(compressed, b"\x01\x00\x00\x00\x02ab", end_stream=True)
    big = c.open()
    c.conn.send_data(big, b"\x00" + (2 * 1024 * 1024).to_bytes(4, "big") + b"x" * 100)
    # Not a ProcessingRequest (a truncated field): refused when the stream's task takes it.
    garbage = c.open()
    c.conn.send_data(garbage, b"\x00\x00\x00\x00\x02\x0a\x7f", end_stream=True)
    c.flush()
    await c.pump(lambda c: all(c.ended(s) for s in (unknown, compressed, big, garbage)))
    assert c.trailers(unknown)["grpc-status"] == "12"
    assert c.trailers(compressed)["grpc-status"] == "12"
    assert c.trailers(big)["grpc-status"] == "8"
    assert c.trailers(garbage)["grpc-status"] == "3"
    assert c.trailers(garbage)["grpc-message"] == "not an ext_proc ProcessingRequest"
    # The connection carries on.
    ok = c.open()
    c.conn.send_data(ok, headers_message("/after"), end_stream=True)
    c.flush()
    await c.pump(lambda c: c.ended(ok))
    assert c.replies(ok)[0].immediate_response.body == b"/after"


async def test_ping_is_answered(env: Env) -> None:
    c = await env.client()
    c.conn.ping(b"12345678")
    c.flush()
    await c.pump(lambda c: any(isinstance(e, h2.events.PingAckReceived) for e in c.events))


async def raw_exchange(server: NativeServer, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    got = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
    return got


def goaway_code(data: bytes) -> int | None:
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == 7:  # GOAWAY
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0x1),  # not HTTP/2
        (PREFACE + (2 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01", 0x6),  # a 2 MiB frame
        (PREFACE + (4).to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00" + b"abcd", 0x6),  # SETTINGS length
        (PREFACE + b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"12345678", 0x1),  # PING on a stream
        (PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00", 0x1),  # WINDOW_UPDATE 0
        (PREFACE + b"\x00\x00\x01\x09\x04\x00\x00\x00\x01" + b"\x82", 0x1),  # CONTINUATION alone
        (PREFACE + b"\x00\x00\x01\x01\x04\x00\x00\x00\x02" + b"\x82", 0x1),  # an even stream id
    ],
)
async def test_protocol_errors_end_the_connection_with_goaway(env: Env, data: bytes, code: int) -> None:
    got = await raw_exchange(env.server, data)
    assert goaway_code(got) == code


async def test_a_header_block_flood_is_refused(env: Env) -> None:
    # HEADERS without END_HEADERS, then CONTINUATION frames past the 64 KiB limit.
    flood = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82"
    flood += b"".join(b"\x00\x40\x00\x09\x00\x00\x00\x00\x01" + b"\x00" * 0x4000 for _ in range(5))
    got = await raw_exchange(env.server, PREFACE + flood)
    assert goaway_code(got) == 0xB  # ENHANCE_YOUR_CALM


async def test_graceful_stop_lets_open_streams_finish() -> None:
    probe = Probe()
    server = NativeServer(Pipeline([probe]), "127.0.0.1:0", max_message=1024 * 1024, max_streams=100)
    await server.start()
    env = Env(server, probe)
    c = await env.client()
    sid = c.open()
    c.conn.send_data(sid, headers_message("/hold"), end_stream=True)
    c.flush()
    await asyncio.wait_for(probe.holding.wait(), 5)
    stopping = asyncio.create_task(server.stop(5))
    await c.pump(lambda c: any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events))
    probe.release.set()
    # The h2 client library takes a GOAWAY as the end of everything; the stream it left open is
    # read from the raw frames that follow (RFC 9113 6.8: streams up to the last id may complete).
    raw = b""
    while True:
        chunk = await asyncio.wait_for(c.reader.read(65536), 5)
        if not chunk:
            break
        raw += chunk
    frames = list(iter_frames(raw))
    assert any(t == 0 and f_sid == sid and b"released" in payload for t, _, f_sid, payload in frames)
    assert any(t == 1 and f_sid == sid and flags & 0x1 for t, flags, f_sid, _ in frames)  # trailers: END_STREAM
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


def iter_frames(data: bytes) -> Any:
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        yield (
            data[pos + 3],
            data[pos + 4],
            int.from_bytes(data[pos + 5 : pos + 9], "big"),
            data[pos + 9 : pos + 9 + length],
        )
        pos += 9 + length


async def test_unix_socket(tmp_path: Any) -> None:
    path = tmp_path / "extproc.sock"
    server = NativeServer(Pipeline([Probe()]), f"unix:{path}", max_message=1024, max_streams=10)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(path))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    c = Client(reader, writer, conn)
    c.flush()
    sid = c.open()
    c.conn.send_data(sid, headers_message("/unix"), end_stream=True)
    c.flush()
    await c.pump(lambda c: c.ended(sid))
    assert c.replies(sid)[0].immediate_response.body == b"/unix"
    writer.close()
    await server.stop(0)
