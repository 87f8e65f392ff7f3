"""Per-request state and the stage interface.

A stage is a small object with async hooks for the phases it cares about. It reads and edits the
RequestContext; it never builds protobuf messages. To refuse a request a stage raises GatewayError;
to answer it directly (e.g. /v1/models) it sets `ctx.reply`. The processor turns the context's
pending edits into one ext_proc reply per phase, so stages compose without knowing about each other.

Later issues (auth, quotas, redaction, cache, accounting) are new stages; they hook in here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from .auth.keys import Identity
from .errors import ErrorKind, GatewayError, quote
from .providers import Endpoint, ProviderAdapter
from .routing import Route
from .sse import SSEEvent


@dataclass(slots=True)
class DirectReply:
    """A response the gateway answers itself instead of forwarding."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(slots=True)
class ResponseChunk:
    data: bytes
    end_of_stream: bool
    # Complete SSE events in this chunk, when the response is an event stream and a stage asked for them.
    events: list[SSEEvent] | None = None
    # A stage that changes `data` sets this so the processor sends a body mutation.
    replaced: bool = False


class RequestContext:
    """Everything known about one HTTP exchange, filled in phase by phase."""

    __slots__ = (
        "_json",
        "adapter",
        "body",
        "body_dirty",
        "clear_route_cache",
        "endpoint",
        "header_bytes",
        "header_count",
        "headers",
        "identity",
        "metadata",
        "method",
        "path",
        "query",
        "remove_headers",
        "reply",
        "request_id",
        "response_content_type",
        "response_status",
        "route",
        "set_headers",
        "state",
        "streaming",
        "wants_response_body",
        "wants_response_events",
        "wants_response_headers",
    )

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.method = ""
        self.path = ""
        # The raw query string (without "?"), if any. Never logged: it may hold anything.
        self.query = ""
        # Header lines as the client sent them (before merging repeats), and their size in bytes.
        self.header_count = 0
        self.header_bytes = 0
        self.request_id = ""
        # Per-request state of each stage, by stage name: nothing per-request lives on a stage.
        self.state: dict[str, Any] = {}
        self.endpoint: Endpoint | None = None
        # Adapter of the schema the *client* speaks (from the path), used to render errors.
        self.adapter: ProviderAdapter | None = None
        self.body: bytes | None = None
        self._json: dict[str, Any] | None = None
        self.body_dirty = False
        self.route: Route | None = None
        # Who is calling (set by the auth stage); None only when auth failed open.
        self.identity: Identity | None = None
        self.streaming = False
        self.reply: DirectReply | None = None
        # Pending edits for the current phase; the processor drains them into the reply.
        self.set_headers: dict[str, str] = {}
        self.remove_headers: list[str] = []
        self.clear_route_cache = False
        # Values for Envoy's dynamic metadata (namespace "gateway"): access logs, rate limit filters.
        self.metadata: dict[str, Any] = {}
        self.wants_response_headers = False
        self.wants_response_body = False
        self.wants_response_events = False
        self.response_status = 0
        self.response_content_type = ""

    @property
    def json(self) -> dict[str, Any]:
        """The request body as a JSON object, parsed once on first use."""
        if self._json is None:
            if not self.body:
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST, "Request body is empty; expected a JSON object.", "empty_body"
                )
            self._json = parse_request_json(self.body)
        return self._json

    def release_body(self) -> None:
        self.body = None
        self._json = None

    def mark_body_changed(self) -> None:
        """Stages edit `ctx.json` in place and call this; the processor serializes once."""
        self.body_dirty = True


def parse_request_json(body: bytes) -> dict[str, Any]:
    """Parse a request body, refusing duplicate keys at any depth.

    With `{"model": "allowed", "model": "forbidden"}` the gateway would check one value and a
    provider whose parser keeps the first key would act on the other; refusing duplicates makes
    the provider see exactly what the gateway checked. orjson parses (fast, strict, no copy of the
    bytes). `count_json_keys` never counts fewer keys than were written, so when it equals the keys
    orjson kept there is no duplicate (the common case, ~10 µs for a chat body); otherwise the
    stdlib parser looks for one exactly (and names it).
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise GatewayError(
            ErrorKind.INVALID_REQUEST, f"Request body is not valid JSON (at byte {err.pos}).", "invalid_json"
        ) from None
    if not isinstance(parsed, dict):
        raise GatewayError(ErrorKind.INVALID_REQUEST, "Request body must be a JSON object.", "invalid_json")
    if _kept_keys(parsed) != count_json_keys(body):
        name = _first_duplicate(body)
        if name is not None:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"Request body has a duplicate key {quote(name)}; each key may appear once per object.",
                "invalid_json",
            )
    return parsed


# In valid JSON every object key ends with an unescaped '"' followed by optional whitespace and ':'
# (inside strings every '"' is escaped). Other matches (an escaped quote before ':' inside a
# string, a string value starting with ':') only add to the count: an upper bound, exact in practice.
_KEY_END = re.compile(rb'"[ \t\r\n]*:')


def count_json_keys(body: bytes) -> int:
    """An upper bound of the object keys written in a valid JSON document, duplicates included,
    never below the true count (see parse_request_json). Escaped quotes followed by ':' inside
    strings are counted too: that only raises the bound, and keeps the count in C (~2 µs for a
    3 KB body; a Python loop over the matches cost ~15 µs)."""
    return len(_KEY_END.findall(body))


# A run of 19+ digits may be an integer orjson cannot hold (it reads those as floats); confirmed
# exactly with the stdlib before a body is refused.
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def has_lossy_integers(body: bytes) -> bool:
    """Whether re-serializing this body would change a number: integers outside orjson's 64-bit
    range come back as rounded floats. Only bodies the gateway rewrites need the check."""
    if _LONG_DIGITS.search(body) is None:
        return False
    lossy: list[str] = []

    def check(text: str) -> int:
        value = int(text)
        if not _INT_MIN <= value <= _INT_MAX:
            lossy.append(text)
        return value

    try:
        json.loads(body, parse_int=check)
    except (ValueError, RecursionError):
        return True  # unsure: the caller refuses rather than forward a changed body
    return bool(lossy)


def _kept_keys(obj: Any) -> int:
    n = 0
    todo = [obj]
    while todo:
        x = todo.pop()
        if type(x) is dict:
            n += len(x)
            todo.extend(x.values())
        elif type(x) is list:
            todo.extend(x)
    return n


def _first_duplicate(body: bytes) -> str | None:
    found: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen and not found:
                found.append(k)
            seen.add(k)
        return {}

    try:
        json.loads(body, object_pairs_hook=pairs_hook)
    except RecursionError:
        # The stdlib parser recurses; orjson accepted the depth. Unsure means refuse (fail safe).
        raise GatewayError(
            ErrorKind.INVALID_REQUEST, "Request body is nested too deeply to be checked.", "invalid_json"
        ) from None
    except ValueError:
        pass
    return found[0] if found else None


class Stage:
    """Base class with no-op hooks. Only overridden hooks are called (see Pipeline)."""

    name: ClassVar[str] = "stage"

    async def request_headers(self, ctx: RequestContext) -> None:
        return None

    async def request_body(self, ctx: RequestContext) -> None:
        return None

    async def response_headers(self, ctx: RequestContext) -> None:
        return None

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        return None

    async def finish(self, ctx: RequestContext) -> None:
        """Called once when the exchange ends, however it ends (completed, refused, client gone).
        Stages that hold state for a request (reservations, partial records) release it here."""
        return None


_HOOKS = ("request_headers", "request_body", "response_headers", "response_body", "finish")


class Pipeline:
    """Ordered stages, pre-sorted per hook so the hot path never awaits a no-op."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = tuple(stages)
        by_hook = {h: tuple(s for s in stages if getattr(type(s), h) is not getattr(Stage, h)) for h in _HOOKS}
        self.on_request_headers = by_hook["request_headers"]
        self.on_request_body = by_hook["request_body"]
        self.on_response_headers = by_hook["response_headers"]
        self.on_response_body = by_hook["response_body"]
        self.on_finish = by_hook["finish"]
