"""The ext_proc server's own HTTP/2 and gRPC transport.

Written by hand because it is the hot path: with grpc.aio, gRPC itself was ~97% of the server's CPU
(~1.1 ms per request with two messages, ~190 µs per extra message, a third of it in the kernel via
its poller thread). Serving Envoy's ext_proc client directly on the event loop costs a third of that
(measured: tests/bench/bench_transport.py, README "Performance"). It is no general gRPC server: one
service, one bidirectional method, prior-knowledge h2c from one well-behaved client (Envoy), which
keeps it small. HPACK decoding is `hpack_decoder` (the `hpack` library's tables, decoded a byte at a
time); what we send is HPACK literals (our response headers never change).

What it does, per RFC 9113 and the gRPC over HTTP/2 protocol:
- Connection: the client preface, SETTINGS (ours: MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE,
  MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE; theirs applied), PING answered, GOAWAY both ways (on
  shutdown: GOAWAY, then open streams may finish within the grace period), WINDOW_UPDATE.
- Flow control both ways. Received data is acknowledged as it is taken in (a message is buffered
  whole anyway, and is bounded by `server.max_message_bytes`); replies wait for Envoy's windows and
  for the socket to drain (pause_writing), so memory is bounded by what the stages produce.
- Streams: `:path` must be the ext_proc Process method (else grpc-status 12, UNIMPLEMENTED); gRPC
  length-prefixed messages may span DATA frames and share them; a compressed or oversized message
  ends the stream with grpc-status 12 / 8. One task per stream runs extproc.processor.run_stream;
  RST_STREAM from Envoy (the client left) cancels it, and run_stream's shielded finish still runs.
- Protocol errors (a bad preface, a frame over our maximum, a header block over the limit or that
  HPACK cannot decode, out-of-order stream ids, bad SETTINGS or WINDOW_UPDATE values, an unexpected
  CONTINUATION) end the connection with GOAWAY and the matching error code; a stream-level error
  resets that stream only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from grpc_health.v1 import health_pb2

from ..pipeline import Pipeline
from ..processor import PHASE_METADATA, run_stream
from ..wire import external_processor_pb2 as ep
from .hpack_decoder import Decoder

_PHASE = PHASE_METADATA.encode()

log = logging.getLogger("extproc.transport")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# The gRPC health checking protocol's unary Check (Envoy's grpc_health_check of the extproc cluster).
HEALTH_PATH = b"/grpc.health.v1.Health/Check"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
MAX_WINDOW = 2**31 - 1
# What we advertise. Frames up to 1 MiB: a large body arrives in few frames.
MAX_FRAME = 1 << 20
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_HEADER_BLOCK = 64 << 10

_parse = ep.ProcessingRequest.FromString


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (both under 127 bytes)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# ":status: 200" is static-table entry 8.
_RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")
_TRAILERS_OK = _literal(b"grpc-status", b"0")


def _trailers(status: int, message: str) -> bytes:
    return _literal(b"grpc-status", str(status).encode()) + _literal(b"grpc-message", message.encode()[:100])


class ProtocolError(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class _Stream:
    __slots__ = (
        "buf",
        "closed",
        "eof",
        "headers_sent",
        "inbox",
        "need",
        "raw",
        "recv_unacked",
        "reset",
        "send_window",
        "sid",
        "task",
        "waiter",
        "writable",
    )

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.inbox: collections.deque[Any] = collections.deque()
        # Messages kept as bytes (the health check's), not parsed as ext_proc requests.
        self.raw = False
        # The run task waits on this for a message or the end; a blocked write for window.
        self.waiter: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.buf = bytearray()
        self.need = 0
        self.eof = False
        self.reset = False
        self.closed = False
        self.headers_sent = False
        self.send_window = send_window
        self.recv_unacked = 0
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class H2Protocol(asyncio.Protocol):
    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(MAX_HEADER_BLOCK)
        self.buf = bytearray()
        self.preface = False
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.in_receive = False
        self.paused = False
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        # ext_proc streams opened on this connection; `mark` and `window`: at / since the last
        # NativeServer.balance() (the supervisor's rebalancing of workers).
        self.opened = 0
        self.mark = 0
        self.window = 0
        self.goaway_sent = False
        self.draining = False  # the first of a graceful shutdown's two GOAWAYs went out
        self.goaway_received = False
        # Flow control: what we may send (Envoy's windows), what we took in and did not ack yet.
        self.send_window = 65535
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.recv_unacked = 0
        # A header block arriving in CONTINUATION frames.
        self.hdr_sid = 0
        self.hdr_parts: list[bytes] = []
        self.hdr_size = 0
        self.hdr_end_stream = False

    # -- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        settings = b"".join(
            ident.to_bytes(2, "big") + value.to_bytes(4, "big")
            for ident, value in (
                (0x3, self.server.max_streams),  # MAX_CONCURRENT_STREAMS
                (0x4, STREAM_WINDOW),  # INITIAL_WINDOW_SIZE
                (0x5, MAX_FRAME),  # MAX_FRAME_SIZE
                (0x6, MAX_HEADER_BLOCK),  # MAX_HEADER_LIST_SIZE
            )
        )
        self.transport.write(
            frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        for st in list(self.streams.values()):
            self._reset(st)
        self.streams.clear()
        self.server.notify()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for st in list(self.streams.values()):
            if st.writable is not None and not st.writable.done():
                st.writable.set_result(None)

    def _write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled and not self.in_receive:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out = []

    def goaway(self, code: int = NO_ERROR, why: str = "") -> None:
        """No new streams from here on; those open may finish (shutdown), or everything ends now
        (a protocol error: code != NO_ERROR)."""
        if self.transport is None:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            debug = why.encode()[:64]
            self._write(frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big") + debug))
        self._flush()
        if code != NO_ERROR:
            log.warning("HTTP/2 error from Envoy (%s); closing the connection", why)
            self.transport.close()
        elif not self.streams:
            self.transport.close()

    def drain(self, why: str, delay: float = 1.0) -> None:
        """Graceful GOAWAY (RFC 9113 6.8): first one naming the largest stream id, so Envoy opens
        no new stream here while those already on the wire are still taken (a plain GOAWAY refuses
        them, and Envoy's gRPC client does not retry: the request fails with 500); `delay` later
        (far over a loopback round trip) the real one, with the last stream taken."""
        if self.transport is None or self.goaway_sent or self.draining:
            return
        self.draining = True
        last = (2**31 - 1).to_bytes(4, "big")
        self._write(frame(GOAWAY, 0, 0, last + NO_ERROR.to_bytes(4, "big") + why.encode()[:64]))
        self._flush()
        self.loop.call_later(delay, self.goaway, NO_ERROR, why)

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    # -- receiving ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    self.goaway(PROTOCOL_ERROR, "bad client preface")
                return
            if bytes(buf[: len(PREFACE)]) != PREFACE:
                self.goaway(PROTOCOL_ERROR, "bad client preface")
                return
            self.preface = True
            pos = len(PREFACE)
        end = len(buf)
        self.in_receive = True
        try:
            while end - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(ftype, flags, sid, payload)
                if self.transport is None:
                    return
        except ProtocolError as err:
            self.goaway(err.code, str(err))
            return
        finally:
            self.in_receive = False
            del buf[:pos]
        self._flush()

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.hdr_sid and ftype != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block was interrupted")
        if ftype == DATA:
            self._data(sid, flags, payload)
        elif ftype == HEADERS:
            self._headers(sid, flags, payload)
        elif ftype == CONTINUATION:
            if sid == 0 or sid != self.hdr_sid:
                raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._header_part(payload)
            if flags & END_HEADERS:
                self._headers_done()
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == SETTINGS:
            if sid != 0:
                raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & ACK:
                if payload:
                    raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            else:
                self._settings(payload)
                self._write(frame(SETTINGS, ACK, 0))
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ProtocolError(PROTOCOL_ERROR, "bad RST_STREAM")
            st = self.streams.pop(sid, None)
            if st is not None:
                self._reset(st)
        elif ftype == GOAWAY:
            self.goaway_received = True
            if not self.streams:
                self.close()
        elif ftype == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 sections 5.5, 6.3).

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length")
        for i in range(0, len(payload), 6):
            ident = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if ident == 0x4:  # INITIAL_WINDOW_SIZE: moves the window of every open stream
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                if delta > 0:
                    self._wake_writers(None)
            elif ident == 0x5:  # MAX_FRAME_SIZE
                if not 16384 <= value <= 16777215:
                    raise ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == 0x2 and value > 1:  # ENABLE_PUSH
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH")
            # HEADER_TABLE_SIZE: we never index what we send. Others: not for a server.

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._wake_writers(None)
            return
        st = self.streams.get(sid)
        if st is None:
            return
        if inc == 0 or st.send_window + inc > MAX_WINDOW:
            self._stream_error(st, PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR)
            return
        st.send_window += inc
        self._wake_writers(st)

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "bad padding")
            payload = payload[1 : len(payload) - payload[0]]
        # Flow control counts the whole frame payload, padding included; it is given back as
        # soon as the data is taken in (the message is buffered whole anyway, and bounded).
        if size:
            self.recv_unacked += size
            if self.recv_unacked >= CONNECTION_WINDOW // 2:
                self._write(frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
                self.recv_unacked = 0
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_sid:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we closed or reset: its data may still be in flight
        if st.eof:
            self._stream_error(st, 0x5)  # STREAM_CLOSED
            return
        if size and not flags & END_STREAM:
            st.recv_unacked += size
            if st.recv_unacked >= STREAM_WINDOW // 2:
                self._write(frame(WINDOW_UPDATE, 0, sid, st.recv_unacked.to_bytes(4, "big")))
                st.recv_unacked = 0
        if payload:
            self._messages(st, payload)
        if flags & END_STREAM:
            st.eof = True
            st.wake()

    def _messages(self, st: _Stream, data: bytes) -> None:
        """gRPC length-prefixed messages: one may span DATA frames, a frame may hold several."""
        if st.closed:
            return
        buf = st.buf
        buf += data
        pos = 0
        limit = self.server.max_message
        while True:
            if st.need == 0:
                if len(buf) - pos < 5:
                    break
                if buf[pos] != 0:
                    self._end_stream(st, 12, "compressed messages are not supported")
                    return
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if length > limit:
                    self._end_stream(st, 8, f"message larger than server.max_message_bytes ({limit})")
                    return
                st.need = 5 + length
            if len(buf) - pos < st.need:
                break
            # Kept as bytes until the stream's task takes it (_read): a parsed message costs ~1.3 KB
            # against ~0.3 KB for a streamed chunk's bytes, and when the server falls behind
            # thousands wait (2,000 open streams, soak.py: ~12,000 at once).
            st.inbox.append(bytes(buf[pos + 5 : pos + st.need]))
            pos += st.need
            st.need = 0
            st.wake()
        if pos:
            del buf[:pos]

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise ProtocolError(PROTOCOL_ERROR, "bad padding")
            start, end = 1, end - payload[0]
        if flags & PRIO:
            start += 5
        if start > end:
            raise ProtocolError(PROTOCOL_ERROR, "bad HEADERS padding")
        self.hdr_sid = sid
        self.hdr_parts = []
        self.hdr_size = 0
        self.hdr_end_stream = bool(flags & END_STREAM)
        self._header_part(payload[start:end])
        if flags & END_HEADERS:
            self._headers_done()

    def _header_part(self, part: bytes) -> None:
        self.hdr_size += len(part)
        if self.hdr_size > MAX_HEADER_BLOCK:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        self.hdr_parts.append(part)

    def _headers_done(self) -> None:
        sid, parts, end_stream = self.hdr_sid, self.hdr_parts, self.hdr_end_stream
        self.hdr_sid, self.hdr_parts = 0, []
        try:
            # HPACK state is per connection: every block is decoded, also those we then ignore.
            headers = self.decoder.decode(parts[0] if len(parts) == 1 else b"".join(parts))
        except Exception:
            raise ProtocolError(COMPRESSION_ERROR, "HPACK") from None
        st = self.streams.get(sid)
        if st is not None:  # trailers: the end of Envoy's side
            st.eof = True
            st.wake()
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            if sid <= self.last_sid and sid % 2 == 1:
                return  # a stream we already closed or reset; its trailers may still arrive
            raise ProtocolError(PROTOCOL_ERROR, f"stream id {sid} out of order")
        self.last_sid = sid
        if self.goaway_sent or len(self.streams) >= self.server.max_streams:
            self._write(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        path = traceparent = phase = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == _PHASE:
                phase = value.decode("latin-1")
        st = _Stream(sid, self.peer_initial_window)
        if path == HEALTH_PATH and self.server.health is not None:
            st.raw = True
            self.streams[sid] = st
            st.eof = end_stream
            st.task = self.loop.create_task(self._health(st))
            return
        if path != PATH:
            st.headers_sent = True
            self._write(
                frame(HEADERS, END_HEADERS | END_STREAM, sid, _RESPONSE_HEADERS + _trailers(12, "unknown method"))
            )
            return
        self.streams[sid] = st
        self.opened += 1
        st.eof = end_stream
        st.task = self.loop.create_task(self._run(st, traceparent, phase))

    def _stream_error(self, st: _Stream, code: int) -> None:
        self._write(frame(RST_STREAM, 0, st.sid, code.to_bytes(4, "big")))
        self.streams.pop(st.sid, None)
        self._reset(st)

    # -- one stream ---------------------------------------------------------------------------------

    async def _read(self, st: _Stream) -> Any:
        while not st.inbox:
            if st.eof or st.reset:
                return None
            st.waiter = self.loop.create_future()
            await st.waiter
            st.waiter = None
        body = st.inbox.popleft()
        if st.raw:
            return body
        try:
            return _parse(body)
        except Exception:
            self._end_stream(st, 3, "not an ext_proc ProcessingRequest")
            return None

    async def _health(self, st: _Stream) -> None:
        """grpc.health.v1.Health/Check: one request, one answer from the server's readiness."""
        health = self.server.health
        assert health is not None
        try:
            body = await self._read(st)
            service = health_pb2.HealthCheckRequest.FromString(body or b"").service
        except asyncio.CancelledError:
            return
        except Exception:
            self._end_stream(st, 3, "not a HealthCheckRequest")
            return
        status = health(service)
        if status is None:
            self._end_stream(st, 5, "unknown service")
            return
        await self._send(st, health_pb2.HealthCheckResponse(status=status).SerializeToString())
        self._end_stream(st, 0)

    async def _run(self, st: _Stream, traceparent: str | None = None, phase: str | None = None) -> None:
        # _read itself, not a coroutine wrapping it: one coroutine per message on the hot path.
        read = functools.partial(self._read, st)

        async def write(resp: ep.ProcessingResponse) -> None:
            if not st.closed:
                await self._send(st, resp.SerializeToString())

        try:
            await run_stream(self.server.pipeline, read, write, traceparent, phase)
        except asyncio.CancelledError:
            return  # reset by Envoy or the connection is gone: nothing more to send
        except Exception:
            log.exception("ext_proc stream %d failed", st.sid)
            self._end_stream(st, 13, "internal error")
            return
        self._end_stream(st, 0)

    async def _send(self, st: _Stream, payload: bytes) -> None:
        data = memoryview(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        if not st.headers_sent:
            st.headers_sent = True
            self._write(frame(HEADERS, END_HEADERS, st.sid, _RESPONSE_HEADERS))
        while data:
            n = min(len(data), self.send_window, st.send_window, self.peer_max_frame)
            if n <= 0 or self.paused:
                # Wait for Envoy's window or for the socket to drain.
                st.writable = self.loop.create_future()
                await st.writable
                st.writable = None
                if st.closed or self.transport is None:
                    return
                continue
            self._write(n.to_bytes(3, "big") + b"\x00\x00" + st.sid.to_bytes(4, "big"))
            self._write(bytes(data[:n]))
            data = data[n:]
            self.send_window -= n
            st.send_window -= n

    def _wake_writers(self, st: _Stream | None) -> None:
        for s in (st,) if st is not None else tuple(self.streams.values()):
            w = s.writable
            if w is not None and not w.done():
                w.set_result(None)

    def _end_stream(self, st: _Stream, status: int, message: str = "") -> None:
        """Our side ends: trailers with the grpc-status (trailers-only when nothing was sent)."""
        if st.closed:
            return
        st.closed = True
        block = _TRAILERS_OK if status == 0 else _trailers(status, message)
        if not st.headers_sent:
            st.headers_sent = True
            block = _RESPONSE_HEADERS + block
        if self.transport is not None:
            self._write(frame(HEADERS, END_HEADERS | END_STREAM, st.sid, block))
            if not st.eof:
                # Envoy may still be sending; it need not (RFC 9113 8.1: NO_ERROR reset).
                self._write(frame(RST_STREAM, 0, st.sid, NO_ERROR.to_bytes(4, "big")))
        self.streams.pop(st.sid, None)
        if st.task is not None and not st.task.done() and st.task is not asyncio.current_task():
            st.task.cancel()
        if self.goaway_sent and not self.streams:
            self._flush()
            if self.transport is not None:
                self.transport.close()
        self.server.notify()

    def _reset(self, st: _Stream) -> None:
        """RST_STREAM from Envoy (the client left), or the connection is gone: the run task is
        cancelled; run_stream's finish still runs (shielded)."""
        st.reset = True
        st.closed = True
        st.wake()
        w = st.writable
        if w is not None and not w.done():
            w.set_result(None)
        if st.task is not None and not st.task.done():
            st.task.cancel()
        self.server.notify()


# Between a graceful shutdown's two GOAWAYs: far over a loopback round trip to Envoy.
_DRAIN_DELAY = 0.2


class NativeServer:
    """The listening side: binds at creation (so the port is known before start, like grpc.aio's
    add_insecure_port), serves on the running loop after `start`."""

    def __init__(
        self,
        pipeline: Pipeline,
        address: str,
        max_message: int,
        max_streams: int,
        health: Callable[[str], int | None] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.pipeline = pipeline
        # service name -> grpc.health.v1 ServingStatus, or None for an unknown service.
        self.health = health
        self.max_message = max_message
        self.max_streams = max_streams
        self.connections: set[H2Protocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._changed: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self.sock = _bind(address, reuse_port)
        self.port = self.sock.getsockname()[1] if self.sock.family != socket.AF_UNIX else 0

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._stopped = asyncio.Event()
        factory: Callable[[], H2Protocol] = lambda: H2Protocol(self)  # noqa: E731
        if self.sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(factory, sock=self.sock, backlog=1024)
        else:
            self._server = await loop.create_server(factory, sock=self.sock, backlog=1024)

    def open_streams(self) -> int:
        return sum(len(c.streams) for c in self.connections)

    def balance(self) -> dict[str, int]:
        """ext_proc streams opened since the previous call, and how many connections carried a
        real share of them (not the health checker's): what extproc.workers rebalances on."""
        live = [c for c in self.connections if not (c.goaway_sent or c.draining)]
        for c in live:
            c.window, c.mark = c.opened - c.mark, c.opened
        total = sum(c.window for c in live)
        active = sum(1 for c in live if c.window >= max(3, total // 10))
        return {"opened": total, "active": active}

    def shed(self) -> bool:
        """GOAWAY the connection that was busiest in the last balance() window. Envoy opens a new
        one for its next stream, which the kernel may hand to another worker (SO_REUSEPORT); the
        streams open on the old one finish there."""
        live = [c for c in self.connections if not (c.goaway_sent or c.draining)]
        if len(live) < 2:
            return False
        max(live, key=lambda c: c.window).drain("rebalancing workers")
        return True

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, GOAWAY every connection, let open streams finish for up to `grace`
        seconds, then close what is left (its streams' finish still runs)."""
        if self._server is not None:
            self._server.close()
        if grace:
            # Two-step GOAWAY: streams Envoy sent before it saw the first still run.
            for conn in list(self.connections):
                conn.drain("shutdown", _DRAIN_DELAY)
            await asyncio.sleep(_DRAIN_DELAY + 0.05)
        for conn in list(self.connections):
            conn.goaway()
        if grace and self._changed is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self.open_streams() and loop.time() < deadline:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._stopped is not None:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()


def _bind(address: str, reuse_port: bool = False) -> socket.socket:
    """host:port, [v6]:port, or unix:/path. With `reuse_port`, other worker processes bind the same
    address and the kernel spreads incoming connections among them."""
    if address.startswith("unix:"):
        path = address[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, int(port)))
        except OSError:
            sock.close()
            raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


__all__ = ["H2Protocol", "NativeServer", "frame"]
