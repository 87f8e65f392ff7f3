"""Per-request state and the stage interface.

A stage is a small object with async hooks for the phases it cares about. It reads and edits the
RequestContext; it never builds protobuf messages. To refuse a request a stage raises GatewayError;
to answer it directly (e.g. /v1/models) it sets `ctx.reply`. The processor turns the context's
pending edits into one ext_proc reply per phase, so stages compose without knowing about each other.

Later issues (auth, quotas, redaction, cache, accounting) are new stages; they hook in here.
"""

from __future__ import annotations

import enum
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from .accounting.record import UsageRecord
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


class Need(enum.IntFlag):
    """What a stage needs of the response, declared with `ctx.need(...)` during the request phases.
    The processor asks Envoy for exactly the union, so a request no stage looks at after the request
    costs two gRPC messages, not one per chunk."""

    NOTHING = 0
    # Status and headers (`ctx.response_status`, `ctx.response_headers`).
    HEADERS = 1
    # A non-SSE body, complete and parsed once for all stages (`chunk.json` on the last chunk).
    JSON = 2
    # SSE events as they arrive (`chunk.events`); chunks pass to the client as they came.
    EVENTS = 4
    # The stage edits events or the JSON body: the processor then sends only whole events per chunk
    # (never half of one) and holds a JSON body until it is complete.
    EDIT = 8


class Outcome(enum.Enum):
    """How an exchange ended, as `finish` sees it."""

    # The provider's response reached its end (any status).
    COMPLETED = "completed"
    # The gateway answered itself (e.g. /v1/models).
    DIRECT = "direct"
    # The gateway refused the request (ctx.error says why).
    REFUSED = "refused"
    # The response started but never ended: the client left or the provider's stream broke.
    INCOMPLETE = "incomplete"
    # The ext_proc stream ended before any response: the client left, or Envoy gave up upstream
    # without the response passing through the filter.
    NO_RESPONSE = "no_response"


@dataclass(slots=True)
class ResponseChunk:
    data: bytes
    end_of_stream: bool
    # Complete SSE events in this chunk (Need.EVENTS on an event stream). With Need.EDIT a stage may
    # replace, drop or insert events in this list (an event with empty `raw` is encoded from its
    # fields) and then sets `events_changed`.
    events: list[SSEEvent] | None = None
    events_changed: bool = False
    # On the last chunk of a non-SSE body (Need.JSON): the whole body and its parsed JSON (None if
    # it is not JSON or too large). With Need.EDIT a stage changes `json` and sets `json_changed`.
    body: bytes | None = None
    json: Any = None
    json_changed: bool = False
    # A stage that changes `data` itself sets this so the processor sends a body mutation.
    replaced: bool = False


def new_request_id() -> str:
    """A random (version 4) UUID in its canonical text form, as str(uuid.uuid4()) gives it, at less
    than half its cost (uuid.UUID's constructor validates and converts in Python): one per exchange,
    on the path of every request. From os.urandom, not the random module, whose state worker
    processes would share after a fork (records are idempotent by this id)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class RequestContext:
    """Everything known about one HTTP exchange, filled in phase by phase."""

    __slots__ = (
        "_json",
        "_needs",
        "adapter",
        "attempts",
        "body",
        "body_dirty",
        "body_schema",
        "cache_hit",
        "captured",
        "clear_route_cache",
        "endpoint",
        "error",
        "finish_reasons",
        "header_bytes",
        "header_count",
        "headers",
        "identity",
        "metadata",
        "method",
        "notes",
        "outcome",
        "path",
        "pii",
        "query",
        "remove_headers",
        "reply",
        "request_id",
        "response_content_type",
        "response_ended_at",
        "response_headers",
        "response_model",
        "response_status",
        "route",
        "set_headers",
        "stage",
        "started_at",
        "state",
        "streaming",
        "timings",
        "traceparent",
        "ts",
        "usage",
        "usage_release",
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
        # The gateway's own id for this exchange (x-gateway-request-id, the usage record's key). Never
        # taken from the client: records are idempotent by it, so a chosen id could skip a charge.
        self.request_id = new_request_id()
        self.ts = time.time()
        self.started_at = time.monotonic()
        # Per-request state of each stage, by stage name: nothing per-request lives on a stage.
        self.state: dict[str, Any] = {}
        self.endpoint: Endpoint | None = None
        # Adapter of the schema the *client* speaks (from the path), used to render errors.
        self.adapter: ProviderAdapter | None = None
        self.body: bytes | None = None
        self._json: dict[str, Any] | None = None
        self.body_dirty = False
        # The schema `json` is in now: the client's, or the provider's once translated.
        self.body_schema = ""
        self.route: Route | None = None
        # Attempts Envoy made for a model with targets (from the answer; 0: not known).
        self.attempts = 0
        # The cache hit a request is answered from (stages.cache.Hit), for the usage record.
        self.cache_hit: Any = None
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
        self._needs = Need.NOTHING
        self.response_status = 0
        self.response_content_type = ""
        self.response_headers: dict[str, str] = {}
        # monotonic time of the end of the response.
        self.response_ended_at: float | None = None
        # Set by the processor: how the exchange ended, and the refusal if the gateway refused.
        self.outcome: Outcome | None = None
        self.error: GatewayError | None = None
        # The exchange's usage record, set by the accounting stage with the last chunk when the
        # provider's final figures are known, else in its finish (which runs before the finish of
        # every stage ahead of it in the pipeline, e.g. limits settling on it).
        self.usage: UsageRecord | None = None
        # Entities the PII stage redacted from the request, per type (for the usage record).
        self.pii: dict[str, int] | None = None
        # The W3C trace context Envoy passed with this ext_proc stream (gRPC metadata), if any.
        self.traceparent: str | None = None
        # The stage whose hook runs now (set by the processor): a refusal is attributed to it.
        self.stage = ""
        # Seconds each stage spent on this exchange, all hooks together (by stage name).
        self.timings: dict[str, float] = {}
        # Short outcome labels stages leave for metrics and traces ({"limits": "refused:tokens"}):
        # bounded values only, never request content.
        self.notes: dict[str, str] = {}
        # What the provider's response said of itself (set by accounting): model and finish reasons.
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        # Budget reservations the usage record releases as it is stored (set by the limits stage;
        # opaque to accounting): the spend arrives and the reservation goes in one step.
        self.usage_release: tuple[str, ...] = ()
        # Prompt and answer for the trace span (tracing.capture_content), already redacted.
        self.captured: dict[str, str] = {}

    @property
    def client_schema(self) -> str:
        """The schema the client speaks (its request and the response it reads); the route's
        schema is the provider's, which differs when the request is translated."""
        if self.adapter is not None:
            return self.adapter.schema
        return self.route.schema if self.route is not None else "openai"

    def need(self, what: Need) -> None:
        """Declare what this request's response must show the stages (during the request phases)."""
        self._needs |= what

    @property
    def needs(self) -> Need:
        return self._needs

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

    def replace_json(self, body: dict[str, Any]) -> None:
        """A stage that rewrites the whole request (schema translation) swaps the parsed body; the
        processor serializes it once like any edit."""
        self._json = body
        self.body_dirty = True

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


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Above this, a body without a run of 19+ digits is passed without parsing it again (the parse's
# objects would take several times the body's size in memory).
_PARSE_AT_ONCE = 256 * 1024
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")


def has_lossy_integers(body: bytes) -> bool:
    """Whether re-serializing this body would change a number: integers outside orjson's 64-bit
    range come back as rounded floats. Only bodies the gateway rewrites need the check."""
    # The stdlib's C parser calls `check` for integers only: ~2 µs per KB, less than a regex looking
    # for long digit runs costs on a prompt full of numbers (every digit starts an attempt: 0.16 ms
    # for a 10 KB prompt with an entity per KB).
    if len(body) > _PARSE_AT_ONCE and _LONG_DIGITS.search(body) is None:
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
    """Ordered stages, pre-sorted per hook so the hot path never awaits a no-op.

    Response hooks and finish run in reverse order (an onion): the stage that changed the request
    first sees the response last, so e.g. a translator's view of the response wraps a redactor's."""

    def __init__(self, stages: list[Stage], attempt: Stage | None = None) -> None:
        self.stages = tuple(stages)
        # What runs once per attempt of a model with targets (Envoy's upstream ext_proc filter).
        self.attempt = attempt
        by_hook = {h: tuple(s for s in stages if getattr(type(s), h) is not getattr(Stage, h)) for h in _HOOKS}
        self.on_request_headers = by_hook["request_headers"]
        self.on_request_body = by_hook["request_body"]
        self.on_response_headers = by_hook["response_headers"][::-1]
        self.on_response_body = by_hook["response_body"][::-1]
        self.on_finish = by_hook["finish"][::-1]
