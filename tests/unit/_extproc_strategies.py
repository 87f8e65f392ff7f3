"""Hypothesis strategies for whole ext_proc exchanges, and a driver that plays Envoy's side.

Used by test_processor_properties.py. An `Exchange` is everything Envoy could send for one HTTP
request: request headers, an optional (possibly chunked) request body, the upstream's response
headers and its response body chunks. `drive` feeds it to a Processor the way Envoy would: it stops
as soon as the processor answers with an immediate response or says it is done, sends the response
body only when the processor asked for it (STREAMED mode override), and always calls `finish()`.

Two flavours of input:
- `wild=False`: what Envoy can actually deliver (lowercase token header names, values without CR, LF
  or NUL, exactly one :method and :path, a numeric content-length and :status);
- `wild=True`: anything the protobuf messages can carry (arbitrary names, bytes, repeated or missing
  pseudo-headers), for the "nothing crashes" property.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from itertools import pairwise
from unittest import mock

import orjson
from hypothesis import strategies as st

from extproc.auth.credentials import load_provider_auth
from extproc.auth.keys import VirtualKey, display_prefix, hash_key
from extproc.auth.service import KeyService
from extproc.config import parse_config
from extproc.errors import ErrorKind, GatewayError
from extproc.pipeline import Need, Pipeline, RequestContext, ResponseChunk, Stage
from extproc.processor import Processor
from extproc.stages import default_stages
from extproc.wire import external_processor_pb2 as ep
from extproc.wire import processing_mode_pb2 as pm
from tests.memstore import CountingStore

# -- the gateway under test -----------------------------------------------------------------------

FULL_KEY = "sk-gw-" + "F" * 32  # tenant "acme", every model
LIMITED_KEY = "sk-gw-" + "L" * 32  # tenant "limited", its own allow-list
EXPIRED_KEY = "sk-gw-" + "E" * 32
REVOKED_KEY = "sk-gw-" + "R" * 32
UNKNOWN_KEY = "sk-gw-" + "U" * 32  # well-formed, not in the store

# Tight limits on purpose: a stream or body reservation leaked by one exchange shows up as a 503 in
# the next one, and the header limits are reachable with a handful of generated headers.
CONFIG = parse_config(
    {
        "server": {
            "max_concurrent_streams": 1,
            "max_body_bytes_in_flight": 1024 * 1024,
            "max_request_headers": 20,
            "max_request_headers_kb": 8,
        },
        "tenants": {"acme": {}, "limited": {"models": ["gpt-*", "claude"]}},
        "providers": {
            "openai": {"schema": "openai", "api_key_env": "PROPTEST_OPENAI_KEY", "organization": "org-proptest"},
            "anthropic": {"schema": "anthropic", "api_key_env": "PROPTEST_ANTHROPIC_KEY"},
            "local": {"schema": "openai", "forward_headers": ["accept", "x-trace-*"]},
        },
        "models": [
            {"name": "gpt-5.5", "provider": "openai"},
            {"name": "fast", "provider": "openai", "upstream": "gpt-5.4-mini", "aliases": ["quick"]},
            {"name": "claude", "provider": "anthropic"},
            {"name": "openai/*", "provider": "openai"},
            {"name": "anthropic/*", "provider": "anthropic"},
            {"name": "local/*", "provider": "local"},
        ],
    }
)
with mock.patch.dict(
    os.environ, {"PROPTEST_OPENAI_KEY": "sk-provider-openai-0123456789", "PROPTEST_ANTHROPIC_KEY": "sk-ant-0123456789"}
):
    PROVIDER_AUTH = load_provider_auth(CONFIG)


def _key(
    n: int,
    secret: str,
    tenant: str,
    models: tuple[str, ...] | None = None,
    expires_at: float | None = None,
    revoked_at: float | None = None,
) -> VirtualKey:
    return VirtualKey(
        id=f"key_{n:016x}",
        name=f"proptest-{n}",
        tenant=tenant,
        key_hash=hash_key(secret),
        prefix=display_prefix(secret),
        created_at=1.0,
        expires_at=expires_at,
        revoked_at=revoked_at,
        models=models,
    )


STORE_KEYS = (
    _key(1, FULL_KEY, "acme"),
    _key(2, LIMITED_KEY, "limited", models=("gpt-5.5", "claude", "openai/gpt-*")),
    _key(3, EXPIRED_KEY, "acme", expires_at=2.0),
    _key(4, REVOKED_KEY, "acme", revoked_at=2.0),
)

PROBE_HEADER = "x-proptest-probe"
FAULT_HEADER = "x-proptest-fault"


class Probe(Stage):
    """Asks for the response phases, as accounting and redaction stages will. What it asks for is
    steered by a request header (letters h: response headers, b: response body, e: SSE events,
    r: replace the last chunk), so the exchange alone decides; it keeps nothing per request."""

    name = "proptest-probe"

    def __init__(self) -> None:
        self.finished = 0

    async def request_headers(self, ctx: RequestContext) -> None:
        flags = ctx.headers.get(PROBE_HEADER, "")
        for letter, need in (("h", Need.HEADERS), ("b", Need.JSON), ("e", Need.EVENTS), ("r", Need.EDIT)):
            if letter in flags:
                ctx.need(need)

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        if chunk.end_of_stream and "r" in ctx.headers.get(PROBE_HEADER, ""):
            chunk.data += b": proptest\n\n"
            chunk.replaced = True

    async def finish(self, ctx: RequestContext) -> None:
        self.finished += 1


class Fault(Stage):
    """Fails in the hook a request header names: `<hook>:<gateway|crash|cancel>`."""

    name = "proptest-fault"

    def _maybe_fail(self, ctx: RequestContext, hook: str) -> None:
        want_hook, _, kind = ctx.headers.get(FAULT_HEADER, "").partition(":")
        if want_hook != hook:
            return
        if kind == "gateway":
            raise GatewayError(ErrorKind.FORBIDDEN, "Refused by the proptest fault stage.", "proptest_refused")
        if kind == "crash":
            raise RuntimeError("proptest crash")
        if kind == "cancel":
            raise asyncio.CancelledError

    async def request_headers(self, ctx: RequestContext) -> None:
        self._maybe_fail(ctx, "request_headers")

    async def request_body(self, ctx: RequestContext) -> None:
        self._maybe_fail(ctx, "request_body")

    async def response_headers(self, ctx: RequestContext) -> None:
        self._maybe_fail(ctx, "response_headers")

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        self._maybe_fail(ctx, "response_body")

    async def finish(self, ctx: RequestContext) -> None:
        self._maybe_fail(ctx, "finish")


class FinishRecorder(Stage):
    name = "proptest-finish-recorder"

    def __init__(self) -> None:
        self.calls = 0

    async def finish(self, ctx: RequestContext) -> None:
        self.calls += 1


async def new_store() -> CountingStore:
    store = CountingStore()
    for key in STORE_KEYS:
        await store.put_key(key)
    return store


async def default_pipeline(*extra: Stage, before: Sequence[Stage] = ()) -> Pipeline:
    """The real default stages (as build_runtime assembles them) over a fresh in-memory store."""
    keys = KeyService(await new_store(), CONFIG)
    return Pipeline([*before, *default_stages(CONFIG, keys, PROVIDER_AUTH), *extra])


# -- exchanges ------------------------------------------------------------------------------------


def _short(data: bytes | str) -> str:
    return repr(data) if len(data) <= 120 else f"{data[:60]!r}…<{len(data)} long>"


@dataclass(frozen=True)
class Header:
    key: str
    raw: bytes | None  # None: the value travels in the `value` string field instead
    text: str = ""

    def __repr__(self) -> str:
        return f"Header({self.key[:80]!r}, {_short(self.raw) if self.raw is not None else _short(self.text)})"


@dataclass(frozen=True)
class Exchange:
    headers: tuple[Header, ...]
    body: tuple[bytes, ...] | None  # None: the request headers end the stream
    response_headers: tuple[Header, ...]
    response_eos: bool
    response_body: tuple[bytes, ...]

    def __repr__(self) -> str:
        body = None if self.body is None else [_short(c) for c in self.body]
        return (
            f"Exchange(headers={list(self.headers)}, body={body}, response_headers={list(self.response_headers)}, "
            f"response_eos={self.response_eos}, response_body={[_short(c) for c in self.response_body]})"
        )


def _fill_headers(target: ep.HttpHeaders, headers: Sequence[Header], eos: bool) -> None:
    for h in headers:
        hv = target.headers.headers.add()
        hv.key = h.key
        if h.raw is not None:
            hv.raw_value = h.raw
        else:
            hv.value = h.text
    target.end_of_stream = eos


def request_headers_msg(ex: Exchange) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    _fill_headers(req.request_headers, ex.headers, ex.body is None)
    return req


def response_headers_msg(ex: Exchange) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    _fill_headers(req.response_headers, ex.response_headers, ex.response_eos)
    return req


def body_msg(data: bytes, eos: bool, response: bool) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    target = req.response_body if response else req.request_body
    target.body = data
    target.end_of_stream = eos
    return req


def envoy_messages(ex: Exchange) -> list[ep.ProcessingRequest]:
    """Every message Envoy would send for this exchange if nothing short-circuited it."""
    out = [request_headers_msg(ex)]
    if ex.body is not None:
        out += [body_msg(c, i == len(ex.body) - 1, False) for i, c in enumerate(ex.body)]
    out.append(response_headers_msg(ex))
    if not ex.response_eos:
        out += [body_msg(c, i == len(ex.response_body) - 1, True) for i, c in enumerate(ex.response_body)]
    return out


@dataclass
class Step:
    phase: str  # which request message this answers
    reply: ep.ProcessingResponse | None
    done_after: bool


def _stops(reply: ep.ProcessingResponse | None, done: bool) -> bool:
    return done or (reply is not None and reply.WhichOneof("response") == "immediate_response")


async def drive(pipeline: Pipeline, ex: Exchange, stop_after: int | None = None) -> list[Step]:
    """Play Envoy's side of one ext_proc stream on a fresh Processor. `stop_after`: the client goes
    away after that many messages. Exceptions from handle() propagate (after finish())."""
    proc = Processor(pipeline)
    steps: list[Step] = []

    async def send(req: ep.ProcessingRequest) -> bool:
        if stop_after is not None and len(steps) >= stop_after:
            return False
        reply = await proc.handle(req)
        steps.append(Step(str(req.WhichOneof("request")), reply, proc.done))
        return not _stops(reply, proc.done)

    try:
        if not await send(request_headers_msg(ex)):
            return steps
        if ex.body is not None:
            for i, chunk in enumerate(ex.body):
                if not await send(body_msg(chunk, i == len(ex.body) - 1, False)):
                    return steps
        if not await send(response_headers_msg(ex)):
            return steps
        last = steps[-1].reply
        if ex.response_eos or last is None or last.mode_override.response_body_mode != pm.ProcessingMode.STREAMED:
            return steps  # Envoy sends no response body unless the processor switched it to STREAMED
        for i, chunk in enumerate(ex.response_body):
            if not await send(body_msg(chunk, i == len(ex.response_body) - 1, True)):
                return steps
        return steps
    finally:
        await proc.finish()


# -- strategies: header values and names ----------------------------------------------------------

# What Envoy's codecs let through in a header value: HTAB, visible ASCII, space and obs-text.
ENVOY_VALUE_CHARS = "\t" + "".join(map(chr, range(0x20, 0x7F))) + "".join(map(chr, range(0x80, 0x100)))
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))

KNOWN_HEADERS = (
    "content-type",
    "authorization",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "x-request-id",
    "user-agent",
    "accept",
    "cookie",
    "proxy-authorization",
    "api-key",
    "x-gateway-provider",
    "x-gateway-model",
    "x-gateway-",
    "x-envoy-upstream-rq-timeout-ms",
    "openai-organization",
    "openai-project",
    "x-stainless-lang",
    "x-trace-id",
    "x-goog-api-key",
    "host",
    "te",
    "transfer-encoding",
)

HUGE_SIZES = (300, 9_000, 70_000)


@cache  # built once: constructing strategies per draw dominates the run time
def huge(piece: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda s, n: ((s or "x") * n)[:n], piece, st.sampled_from(HUGE_SIZES))


@cache
def huge_bytes(piece: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda s, n: ((s or b"x") * n)[:n], piece, st.sampled_from(HUGE_SIZES))


_envoy_text = st.text(ENVOY_VALUE_CHARS, max_size=24)
INTERESTING_VALUES = (
    "",
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "2023-06-01",
    "0",
    "a,b",
    "%00%0d%0a",
    "Bearer " + FULL_KEY,
    FULL_KEY,
    "sk-gw-abcdefgh",
    "SK-GW-ABCDEFGH1234",
    "session=sk-gw-0123456789abcdef",
    "caf\xe9",
)


@cache
def envoy_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(INTERESTING_VALUES), _envoy_text, _envoy_text, _envoy_text, huge(_envoy_text))


_TOKEN = st.text(TOKEN_CHARS, min_size=1, max_size=20)


@cache
def header_names(wild: bool) -> st.SearchStrategy[str]:
    token = _TOKEN
    names = st.one_of(
        st.sampled_from(KNOWN_HEADERS),
        token,
        token.map(lambda t: "x-gateway-" + t),
        token.map(lambda t: "x-envoy-" + t),
    )
    if wild:
        return st.one_of(names, st.text(max_size=20), st.sampled_from([":method", ":path", ":status", ":", ""]))
    return names


@cache
def header_values(wild: bool) -> st.SearchStrategy[tuple[bytes | None, str]]:
    realistic = envoy_values().map(lambda v: (v.encode("latin-1"), ""))
    if not wild:
        return realistic
    return st.one_of(
        realistic,
        st.binary(max_size=40).map(lambda b: (b, "")),
        huge_bytes(st.binary(max_size=8)).map(lambda b: (b, "")),
        st.text(max_size=30).map(lambda t: (None, t)),  # the `value` field, any Unicode
    )


@cache
def headers(wild: bool, max_size: int) -> st.SearchStrategy[list[Header]]:
    return st.lists(
        st.builds(lambda k, v: Header(k, v[0], v[1]), header_names(wild), header_values(wild)), max_size=max_size
    )


# -- strategies: request line ---------------------------------------------------------------------

BASE_PATHS = (
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/models",
    "/v1/models/gpt-5.5",
    "/v1/models/fast",
    "/v1/models/openai/gpt-x",
    "/v1/models/%66ast",
    "/v1/models/nope",
    "/v1/models/",
    "/v1/completions",
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/V1/CHAT/COMPLETIONS",
    "/",
    "",
    "*",
)
QUERIES = (
    "",
    "?",
    "?beta=true",
    "?beta=true&beta=false&x=1",
    "?stream=true",
    "?key=sk-gw-abcdefgh12345",
    "?%zz=%",
    "?a=%0d%0a&beta=%0d%0a",
    "?beta=" + "b" * 5000,
    "??#frag",
)
METHODS = ("POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "post", "")


@cache
def paths(wild: bool) -> st.SearchStrategy[str]:
    chars: str | st.SearchStrategy[str] = PRINTABLE if not wild else st.characters(codec="utf-8")
    base = st.one_of(st.sampled_from(BASE_PATHS), st.text(chars, max_size=30).map(lambda t: "/" + t))
    query = st.one_of(st.sampled_from(QUERIES), st.text(chars, max_size=30).map(lambda t: "?" + t))
    return st.builds(lambda b, q: b + q, base, query)


@cache
def methods(wild: bool) -> st.SearchStrategy[str]:
    chars: str | st.SearchStrategy[str] = TOKEN_CHARS.upper() if not wild else st.characters(codec="utf-8")
    return st.one_of(st.sampled_from(METHODS), st.text(chars, max_size=10))


@cache
def credentials(wild: bool) -> st.SearchStrategy[list[Header]]:
    def h(k: str, v: str) -> Header:
        return Header(k, v.encode("latin-1"))

    fixed = st.sampled_from(
        [
            [],
            [h("authorization", "Bearer " + FULL_KEY)],
            [h("x-api-key", FULL_KEY)],
            [h("authorization", "Bearer " + LIMITED_KEY)],
            [h("x-api-key", LIMITED_KEY)],
            [h("authorization", "Bearer " + EXPIRED_KEY)],
            [h("authorization", "Bearer " + REVOKED_KEY)],
            [h("authorization", "Bearer " + UNKNOWN_KEY)],
            [h("authorization", "Bearer " + FULL_KEY), h("x-api-key", LIMITED_KEY)],
            [h("authorization", "Bearer " + FULL_KEY), h("x-api-key", FULL_KEY)],
            [h("authorization", "Bearer " + FULL_KEY), h("authorization", "Bearer " + FULL_KEY)],
            [h("authorization", "Basic dXNlcjpwYXNz")],
            [h("authorization", "Bearer")],
            [h("authorization", "bearer  " + FULL_KEY + " ")],
        ]
    )
    garbage = st.builds(
        lambda k, v: [Header(k, v[0], v[1])], st.sampled_from(["authorization", "x-api-key"]), header_values(wild)
    )
    # Valid keys half of the time, so the deeper stages see plenty of traffic.
    return st.one_of(VALID_CREDENTIALS, VALID_CREDENTIALS, fixed, garbage)


FULL_KEY_ONLY = st.just([Header("authorization", ("Bearer " + FULL_KEY).encode())])
VALID_CREDENTIALS = st.sampled_from(
    [
        [Header("authorization", ("Bearer " + FULL_KEY).encode())],
        [Header("x-api-key", FULL_KEY.encode())],
        [Header("authorization", ("Bearer " + LIMITED_KEY).encode())],
        [Header("x-api-key", LIMITED_KEY.encode())],
    ]
)


# -- strategies: request bodies -------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_ANY = st.recursive(
    JSON_LEAVES, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
MODEL_NAMES = (
    "gpt-5.5",
    "fast",
    "quick",
    "claude",
    "openai/gpt-4o",
    "openai/gpt-x",
    "openai/o1",
    "anthropic/claude-3",
    "local/llama",
    "openai/",
    "nope",
    "",
    " gpt-5.5",
    "GPT-5.5",
    "gpt-5.5\r\nx-evil: 1",
)
WILDCARD_PREFIXES = ("openai/", "anthropic/", "local/", "openai/gpt-")


@cache
def model_values() -> st.SearchStrategy[object]:
    return st.one_of(
        st.sampled_from(MODEL_NAMES),
        st.sampled_from(MODEL_NAMES),
        st.builds(lambda p, s: p + s, st.sampled_from(WILDCARD_PREFIXES), st.text(max_size=30)),
        st.builds(lambda p, s: p + s, st.sampled_from(WILDCARD_PREFIXES), huge(st.text(PRINTABLE, max_size=4))),
        st.text(max_size=20),
        JSON_ANY,
    )


MESSAGES = st.one_of(
    st.just([{"role": "user", "content": "hi"}]),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", ""]), "content": st.one_of(st.text(), JSON_ANY)}
        ),
        max_size=3,
    ),
    JSON_ANY,
)


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, object]:
    obj: dict[str, object] = {}
    if draw(st.integers(0, 5)) > 0:
        obj["model"] = draw(model_values())
    if draw(st.booleans()):
        obj["messages"] = draw(MESSAGES)
    if draw(st.booleans()):
        obj["stream"] = draw(st.one_of(st.booleans(), JSON_ANY))
    if draw(st.integers(0, 3)) == 0:
        obj["max_tokens"] = draw(st.one_of(st.integers(0, 10**6), JSON_ANY))
    if draw(st.integers(0, 3)) == 0:
        obj["stream_options"] = draw(st.one_of(st.just({"include_usage": True}), JSON_ANY))
    obj.update(draw(st.dictionaries(st.text(max_size=8), JSON_ANY, max_size=3)))
    return obj


def _insert_field(body: bytes, field: bytes) -> bytes:
    """Add `"k": v` as the first member of a serialized object (keeps a duplicate if `k` exists)."""
    if body == b"{}":
        return b"{" + field + b"}"
    if body.startswith(b"{"):
        return b"{" + field + b"," + body[1:]
    return body


# Nesting depths: a band around orjson's documented 1024-level limit, anything shallow, and boundaries.
DEPTHS = st.one_of(
    st.integers(1000, 1030), st.integers(0, 64), st.sampled_from([255, 256, 512, 960, 1022, 1023, 1024, 1025])
)


def deep_value(draw: st.DrawFn) -> bytes:
    """A JSON value nested `depth` levels deep (arrays or objects), maybe with a duplicate key inside."""
    depth = draw(DEPTHS)
    inner = draw(st.sampled_from([b"1", b'{"k":1,"k":2}']))
    if draw(st.booleans()):
        return b"[" * depth + inner + b"]" * depth
    return b'{"a":' * depth + inner + b"}" * depth


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    """A routable request object with one deeply nested member (and maybe a duplicate key)."""
    obj = orjson.dumps({"model": draw(st.sampled_from(MODEL_NAMES)), "messages": []})
    return _insert_field(obj, draw(st.sampled_from([b'"metadata":', b'"messages":', b'"tools":'])) + deep_value(draw))


MUTATIONS = (
    "duplicate-model",
    "duplicate-nested",
    "deep",
    "big-int",
    "huge-string",
    "truncate",
    "bad-utf8",
    "bom",
    "trailing",
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    return mutate(draw, orjson.dumps(draw(request_objects())))


def mutate(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` through up to four textual mutations: what a JSON encoder would never write."""
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        if mutation == "duplicate-model":
            body = _insert_field(body, b'"model":' + orjson.dumps(draw(st.sampled_from(MODEL_NAMES))))
        elif mutation == "duplicate-nested":
            body = _insert_field(body, b'"metadata":{"k":1,"k":2}')
        elif mutation == "deep":
            body = _insert_field(body, b'"deep":' + deep_value(draw))
        elif mutation == "big-int":
            body = _insert_field(body, b'"n":123456789012345678901234567890')
        elif mutation == "huge-string":
            body = _insert_field(body, b'"pad":"' + b"a" * draw(st.sampled_from([10_000, 300_000])) + b'"')
        elif mutation == "truncate":
            body = body[: draw(st.integers(0, len(body)))]
        elif mutation == "bad-utf8":
            at = draw(st.integers(0, len(body)))
            body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00"])) + body[at:]
        elif mutation == "bom":
            body = b"\xef\xbb\xbf" + body
        elif mutation == "trailing":
            body += draw(st.sampled_from([b" ", b"\n", b"x", b"{}", b"\x00"]))
    return body


BODY_KINDS: dict[str, st.SearchStrategy[bytes]] = {
    "json of random structure": json_bodies(),
    "deeply nested json": deep_bodies(),
    "random bytes": st.binary(max_size=200),
    "any json value": JSON_ANY.map(orjson.dumps),
}


@st.composite
def hostile_bodies(draw: st.DrawFn, kind: str, routable: bytes) -> bytes:
    """A body of one of the BODY_KINDS; deeply nested ones are built into `routable` (the JSON body of
    a request the gateway would route), so the request is otherwise one the gateway serves."""
    if kind == "deeply nested json":
        return _insert_field(routable, draw(st.sampled_from([b'"metadata":', b'"tools":'])) + deep_value(draw))
    return draw(BODY_KINDS[kind])


@cache
def request_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(
        json_bodies(), json_bodies(), deep_bodies(), deep_bodies(), st.binary(max_size=200), JSON_ANY.map(orjson.dumps)
    )


def split(data: bytes, cuts: list[int]) -> tuple[bytes, ...]:
    """`data` cut at the given offsets; repeated offsets give empty chunks, as Envoy may send."""
    points = [0, *sorted(cuts), len(data)]
    return tuple(data[a:b] for a, b in pairwise(points))


def cut(draw: st.DrawFn, data: bytes, max_cuts: int) -> tuple[bytes, ...]:
    """`data` split at up to `max_cuts` arbitrary offsets (mid-line, between CR and LF, ...)."""
    return split(data, [c % (len(data) + 1) for c in draw(st.lists(st.integers(0, 2**20), max_size=max_cuts))])


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes], max_cuts: int) -> tuple[bytes, ...]:
    return cut(draw, draw(data), max_cuts)


# -- strategies: responses ------------------------------------------------------------------------

LINE_ENDS = (b"\n", b"\r\n", b"\r")
CANNED_DATA = (
    b'data: {"id":"c1","choices":[{"delta":{"content":"hi"}}],"usage":null}',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}',
    b"data: [DONE]",
    b"event: message_start",
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":3}}}',
    b"event: error",
    b'data: {"type":"error","error":{"type":"overloaded_error"}}',
    b": keep-alive",
    b"data",
    b"data:",
    b"id: 7",
    b"id: a\x00b",
    b"retry: 1000",
    b"retry: x",
    b"unknown: field",
)
_line_bytes = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
SSE_LINES = st.one_of(
    st.sampled_from(CANNED_DATA),
    st.sampled_from(CANNED_DATA),
    st.sampled_from(CANNED_DATA),
    st.text(max_size=30).map(lambda t: b"data: " + t.replace("\r", "").replace("\n", "").encode()),
    _line_bytes.map(lambda b: b"data: " + b),  # non-UTF-8 payloads
    # Huge lines, now and then one past the parser's 4 MiB event limit.
    st.sampled_from([5_000, 70_000, 5_000, 70_000, 5_000, 4 * 1024 * 1024 + 16]).map(lambda n: b"data: " + b"x" * n),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        for line in draw(st.lists(SSE_LINES, min_size=1, max_size=4)):
            parts += (line, draw(st.sampled_from(LINE_ENDS)))
        parts.append(draw(st.sampled_from(LINE_ENDS)))
    dropped = draw(st.sampled_from([0, 0, 1, 2]))  # no final blank line, or not even a final line end
    if dropped:
        del parts[-dropped:]
    return b"".join(parts)


@cache
def response_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(sse_streams(), sse_streams(), st.binary(max_size=300), JSON_ANY.map(orjson.dumps))


RESPONSE_CONTENT_TYPES = ("text/event-stream", "text/event-stream; charset=utf-8", "application/json", "", "text/plain")


_STATUS = st.one_of(st.sampled_from(["200", "200", "400", "429", "500", "503", "204"]), st.integers(100, 599).map(str))
_WILD_STATUS = st.one_of(st.integers(0, 10**6).map(str), st.text(max_size=6), st.sampled_from(["\xb2", "99" * 2500]))
_RESPONSE_CONTENT_TYPE = st.one_of(st.sampled_from(RESPONSE_CONTENT_TYPES), _envoy_text)


@cache
def response_header_lists(wild: bool) -> st.SearchStrategy[list[Header]]:
    return _response_header_lists(wild)


@st.composite
def _response_header_lists(draw: st.DrawFn, wild: bool) -> list[Header]:
    status = draw(_WILD_STATUS if wild else _STATUS)
    out = [Header(":status", status.encode("utf-8" if wild else "latin-1"))]
    ctype = draw(_RESPONSE_CONTENT_TYPE)
    if draw(st.integers(0, 5)) > 0:
        out.append(Header("content-type", ctype.encode("latin-1")))
    if draw(st.booleans()):
        out.append(Header("content-length", str(draw(st.integers(0, 10**9))).encode()))
    out += draw(headers(wild, 3))
    return out


_REQUEST_LINES = st.tuples(
    st.sampled_from(
        [
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
            ("GET", "/v1/models"),
            ("GET", "/v1/models/fast"),
            ("GET", "/v1/models/openai/gpt-x"),
        ]
    ),
    st.one_of(st.just(""), st.sampled_from(QUERIES)),
).map(lambda t: (t[0][0], t[0][1] + t[1]))
_REQUEST_BODY_CHUNKS = chunked(request_bodies(), 3)
_RESPONSE_BODY_CHUNKS = chunked(response_bodies(), 6)


# -- whole exchanges ------------------------------------------------------------------------------


SCHEMA_PATHS = {
    "openai": ("/v1/chat/completions",),
    "anthropic": ("/v1/messages", "/v1/messages/count_tokens"),
}
# Models each schema's endpoints serve; first the ones whose body the gateway rewrites (alias or
# wildcard: the upstream name differs), so the simplest routed request takes the path doing the most.
SERVED_MODELS = {
    "openai": ("fast", "gpt-5.5", "quick", "openai/gpt-4o", "openai/o1", "local/llama"),
    "anthropic": ("anthropic/claude-3", "claude"),
}
_BENIGN_HEADERS = st.lists(
    st.builds(
        Header,
        st.one_of(
            st.sampled_from(["user-agent", "accept", "x-stainless-lang", "x-trace-id", "anthropic-beta"]),
            _TOKEN,
        ),
        _envoy_text.filter(lambda v: "sk-gw-" not in v.lower()).map(lambda v: v.encode("latin-1")),
    ),
    max_size=4,
)


@st.composite
def _well_formed_request(draw: st.DrawFn, hostile: str | None = None) -> tuple[list[Header], tuple[bytes, ...] | None]:
    """A request the gateway should route: served endpoint, valid key, JSON body naming a model of
    the endpoint's schema; some of the time the body is mutated, or replaced by a hostile one."""
    schema = draw(st.sampled_from(("openai", "anthropic")))
    path = draw(st.sampled_from(SCHEMA_PATHS[schema])) + draw(st.sampled_from(["", "", "?beta=true"]))
    obj: dict[str, object] = {
        "model": draw(st.sampled_from(SERVED_MODELS[schema])),
        "messages": draw(MESSAGES),
    }
    if draw(st.booleans()):
        obj["stream"] = draw(st.booleans())
    if schema == "anthropic":
        obj["max_tokens"] = draw(st.integers(1, 4096))
    body = orjson.dumps(obj)
    kind = draw(
        st.sampled_from(["as is", "as is", "as is", "mutated", "hostile"]) if hostile is None else st.just(hostile)
    )
    if kind == "mutated":
        body = mutate(draw, body)
    elif kind == "hostile":
        body = draw(request_bodies())
    chunks = cut(draw, body, 2)
    hdrs = [Header(":method", b"POST"), Header(":path", path.encode()), Header(":authority", b"gateway.test")]
    hdrs += draw(st.one_of(VALID_CREDENTIALS, FULL_KEY_ONLY))
    hdrs.append(Header("content-type", b"application/json"))
    if schema == "anthropic" and draw(st.booleans()):
        hdrs.append(Header("anthropic-version", b"2023-06-01"))
    if draw(st.booleans()):
        hdrs.append(Header("content-length", str(len(body)).encode()))
    hdrs += draw(_BENIGN_HEADERS)
    return hdrs, chunks


@st.composite
def _arbitrary_request(draw: st.DrawFn, wild: bool) -> tuple[list[Header], tuple[bytes, ...] | None]:
    # Mostly the endpoints the gateway serves (else nearly every example stops at 404/405).
    method, path = draw(st.one_of(_REQUEST_LINES, _REQUEST_LINES, st.tuples(methods(wild), paths(wild))))
    pseudo = [Header(":method", method.encode("utf-8")), Header(":path", path.encode("utf-8"))]
    if wild:  # missing or repeated pseudo-headers, `value` instead of `raw_value`
        pseudo = [p for p in pseudo for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2])))]
        if draw(st.booleans()):
            pseudo = [Header(p.key, None, p.raw.decode("utf-8", "replace") if p.raw else "") for p in pseudo]
    hdrs = [*pseudo, Header(":authority", b"gateway.test"), Header(":scheme", b"https")]
    hdrs += draw(credentials(wild))
    ctype = draw(
        st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8", None, "text/plain"])
    )
    if ctype is not None:
        hdrs.append(Header("content-type", ctype.encode()))
    hdrs += draw(headers(wild, 20 if wild else 6))
    body: tuple[bytes, ...] | None = None
    if draw(st.integers(0, 5)) > 0:
        body = draw(_REQUEST_BODY_CHUNKS)
    declared = draw(st.sampled_from(["none", "actual", "other"]))
    if declared == "actual" and body is not None:
        hdrs.append(Header("content-length", str(sum(map(len, body))).encode()))
    elif declared == "other":
        n = draw(st.sampled_from([0, 1, 1024 * 1024, 1024 * 1024 + 1, 10**12, 2**64]))
        hdrs.append(Header("content-length", str(n).encode()))
    return hdrs, body


@st.composite
def exchanges(
    draw: st.DrawFn, wild: bool = False, well_formed: bool | None = None, hostile: str | None = None
) -> Exchange:
    """One exchange; `well_formed`: only requests the gateway should route (True), only arbitrary
    ones (False), or half and half (None). `hostile`: for well-formed requests, force the body kind
    ("as is", "mutated", "hostile")."""
    if well_formed is None:
        well_formed = draw(st.booleans())
    hdrs, body = draw(_well_formed_request(hostile) if well_formed else _arbitrary_request(wild))
    flags = draw(st.sets(st.sampled_from("hber")))
    if well_formed and draw(st.integers(0, 3)) < 3:
        flags |= {"h", "b"}  # most routed requests (and the simplest) go on to the response phases
    hdrs.append(Header(PROBE_HEADER, "".join(sorted(flags)).encode()))
    if wild and draw(st.booleans()):
        hdrs = draw(st.permutations(hdrs))
    # The response only matters when a stage asks for it: skip drawing it (the costly part) otherwise.
    response: tuple[Header, ...] = (Header(":status", b"200"),)
    response_eos, response_body = True, tuple[bytes, ...]()
    if "h" in flags or draw(st.integers(0, 4)) == 0:
        response = tuple(draw(response_header_lists(wild)))
        response_eos = draw(st.integers(0, 7)) == 7
        response_body = draw(_RESPONSE_BODY_CHUNKS) if "b" in flags or draw(st.booleans()) else (b"",)
    return Exchange(tuple(hdrs), body, response, response_eos, response_body)


HOOKS = ("request_headers", "request_body", "response_headers", "response_body", "finish")


def with_fault(ex: Exchange, hook: str, kind: str) -> Exchange:
    """`ex` with a directive for the Fault stage: fail in `hook` with `kind` (gateway, crash, cancel)."""
    return replace(ex, headers=(*ex.headers, Header(FAULT_HEADER, f"{hook}:{kind}".encode())))


def with_body(ex: Exchange, body: bytes) -> Exchange:
    """`ex` with another request body (and no content-length: Envoy would not let a wrong one through)."""
    return replace(ex, headers=tuple(h for h in ex.headers if h.key != "content-length"), body=(body,))


# -- long client values (error bodies must not echo them) -----------------------------------------

URL_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
LONG_LOCATIONS = (
    "model",
    "model (openai/ wildcard)",
    "model (anthropic/ wildcard)",
    ":path",
    ":path /v1/models/{id}",
    ":path query",
    ":method",
    "content-type",
    "authorization",
    "x-api-key",
    "anthropic-version",
    "x-request-id",
    "other header value",
    "header name",
)


@dataclass(frozen=True)
class LongValueCase:
    location: str
    value: str
    exchange: Exchange

    def __repr__(self) -> str:
        return f"LongValueCase({self.location!r}, value={_short(self.value)}, exchange={self.exchange!r})"


@st.composite
def long_value_cases(draw: st.DrawFn, location: str) -> LongValueCase:
    """A client value of 200..10,000 characters placed where the gateway might quote it back."""
    # Lengths from the echo threshold up to and past MAX_MODEL_CHARS (256), and 10,000 characters.
    length = draw(st.one_of(st.integers(200, 260), st.just(10_000)))
    if location == "header name":
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-"
    elif location == ":method":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    elif location.startswith(":path"):
        alphabet = URL_SAFE
    elif location.startswith("model"):
        alphabet = draw(st.sampled_from([URL_SAFE, PRINTABLE, PRINTABLE + " \u00e9\u4e2d\U0001f600"]))
    else:
        alphabet = draw(st.sampled_from([URL_SAFE, PRINTABLE, ENVOY_VALUE_CHARS.replace("\t", "")]))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    value = "".join(rnd.choices(alphabet, k=length))

    method, path = "POST", draw(st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"]))
    body = b'{"model":"gpt-5.5","messages":[]}' if path == "/v1/chat/completions" else b'{"model":"claude"}'
    extra: list[Header] = []
    if location.startswith("model"):
        wildcard = {"model (openai/ wildcard)": "openai/", "model (anthropic/ wildcard)": "anthropic/"}.get(location)
        prefix = wildcard or draw(st.sampled_from(["", "local/", "openai/gpt-", "gpt-"]))
        value = prefix + value[len(prefix) :]
        body = orjson.dumps({"model": value, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        if wildcard:  # the endpoint of the wildcard's schema, so the name gets past routing
            path = "/v1/messages" if wildcard == "anthropic/" else "/v1/chat/completions"
    elif location == ":path":
        path = draw(st.sampled_from(["/", "/v1/", "/v1/chat/completions/"])) + value
    elif location == ":path /v1/models/{id}":
        method, path = "GET", "/v1/models/" + value
    elif location == ":path query":
        path += "?" + draw(st.sampled_from(["beta=", "", "q="])) + value
    elif location == ":method":
        method = value
    elif location == "header name":
        extra.append(Header(value, b"1"))
    elif location == "other header value":
        extra.append(
            Header(
                draw(st.sampled_from(["x-custom", "user-agent", "cookie", "anthropic-beta"])), value.encode("latin-1")
            )
        )
    else:
        shown = {"authorization": draw(st.sampled_from(["Bearer ", "Basic ", ""])) + value}.get(location, value)
        extra.append(Header(location, shown.encode("latin-1")))
    # The key with an allow-list first: it takes the request through one more check.
    creds = draw(st.sampled_from([("x-api-key", LIMITED_KEY), ("authorization", "Bearer " + FULL_KEY)]))
    hdrs = [
        Header(":method", method.encode()),
        Header(":path", path.encode()),
        Header(":authority", b"gateway.test"),
        *([] if location in ("authorization", "x-api-key") else [Header(creds[0], creds[1].encode())]),
        *([] if location == "content-type" else [Header("content-type", b"application/json")]),
        *extra,
    ]
    eos = method == "GET"
    ex = Exchange(tuple(hdrs), None if eos else (body,), (Header(":status", b"200"),), True, ())
    return LongValueCase(location, value, ex)
