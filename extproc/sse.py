"""The one Server-Sent Events parser, incremental over arbitrary byte chunks.

Envoy hands the ext_proc server response bodies as arbitrary byte ranges: events arrive split
mid-line, mid-UTF-8 character or between the CR and LF of a line ending, and several arrive in one
chunk. The parser works on bytes, decodes only complete lines, and keeps each event's exact raw
bytes so later stages (redaction, usage accounting) can hold back or pass through whole events.
Follows the WHATWG algorithm: CRLF, LF or CR line endings; "data" lines joined with LF; one space
after the colon stripped; lines starting with ':' are comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SSEError(ValueError):
    """The stream cannot be SSE (an event grew past the size limit). `events` holds the complete
    events parsed from the chunk before the overflow, so a caller that holds bytes back loses none."""

    def __init__(self, message: str, events: list[SSEEvent] | None = None) -> None:
        super().__init__(message)
        self.events = events or []


@dataclass(slots=True)
class SSEEvent:
    # None when the block had no data line: per the spec such a block dispatches no event
    # (keep-alive comments, a bare "event:" line). Consumers skip them; `raw` still carries the bytes.
    data: str | None
    event: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""

    @property
    def type(self) -> str:
        return self.event or "message"

    def encode(self) -> bytes:
        """The bytes to send: the original ones when the event is unchanged (so a stream no stage
        edits is byte-identical), else serialized from the fields."""
        if self.raw:
            return self.raw
        if self.data is None:
            return "".join(f":{c}\n" for c in self.comments).encode() + b"\n"
        return encode_event(self.data, self.event or None, self.id)

    @classmethod
    def make(cls, data: str, event: str = "") -> SSEEvent:
        """A new event for a stage to insert (raw empty: the processor serializes it)."""
        return cls(data=data, event=event)


class SSEParser:
    __slots__ = ("_buf", "_comments", "_data", "_event", "_event_start", "_id", "_max", "_retry", "_scan")

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._buf = b""
        self._event_start = 0  # offset in _buf where the event being parsed began
        self._scan = 0  # offset in _buf of the next unparsed line
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []

    @property
    def pending(self) -> bytes:
        """Bytes received that do not yet form a complete event."""
        return self._buf[self._event_start :]

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if chunk:
            self._buf = self._buf[self._event_start :] + chunk if self._event_start else self._buf + chunk
            self._scan -= self._event_start
            self._event_start = 0
        events = self._parse(final=False)
        if len(self._buf) - self._event_start > self._max:
            raise SSEError(f"SSE event larger than {self._max} bytes", events)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: a trailing event without its blank line is dispatched as the spec's
        'incomplete event' would not be; we dispatch it because providers that end a body without the
        final blank line still mean it (and dropping it would lose data)."""
        events = self._parse(final=True)
        if self._scan < len(self._buf):
            self._field(self._buf[self._scan :])
            self._scan = len(self._buf)
        if self._event_start < len(self._buf):
            events.append(self._dispatch(len(self._buf)))
        self._buf = b""
        self._event_start = self._scan = 0
        return events

    def _parse(self, final: bool) -> list[SSEEvent]:
        buf = self._buf
        n = len(buf)
        pos = self._scan
        events: list[SSEEvent] = []
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                elif final:
                    nxt = cr + 1
                else:
                    break  # a CR at the end of the chunk may be the first half of CRLF
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            if end == pos:
                events.append(self._dispatch(nxt))
            else:
                self._field(buf[pos:end])
            pos = nxt
        self._scan = pos
        return events

    def _field(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "":
            self._comments.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, end: int) -> SSEEvent:
        ev = SSEEvent(
            data="\n".join(self._data) if self._data else None,
            event=self._event,
            id=self._id,
            retry=self._retry,
            comments=self._comments,
            raw=self._buf[self._event_start : end],
        )
        self._event_start = end
        self._reset_fields()
        return ev


def encode_event(data: str | bytes, event: str | None = None, id: str | None = None) -> bytes:
    """Serialize one event with LF endings (what both providers send)."""
    payload = data.decode() if isinstance(data, bytes) else data
    head = f"event: {event}\n" if event else ""
    if id is not None:
        head += f"id: {id}\n"
    body = "".join(f"data: {line}\n" for line in payload.split("\n"))
    return (head + body + "\n").encode()
