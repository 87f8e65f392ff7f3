"""Unit tests of the hardening pieces: JSON duplicate detection, quoting, header/query hygiene,
the upstream header allow-list, admission (load shedding) and the config rules behind them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import allocator, envoyconf
from extproc.config import ConfigError, is_credential_header, parse_config
from extproc.errors import GatewayError, quote
from extproc.pipeline import RequestContext, count_json_keys, has_lossy_integers, parse_request_json
from extproc.processor import Processor
from extproc.stages.admission import AdmissionStage
from tests.unit.test_processor import CONFIG, KEY, body_msg, headers_msg, pipeline, run, set_headers

CHAT = "/v1/chat/completions"
BASE: dict[str, Any] = {"providers": {"openai": {"schema": "openai"}}}


# -- JSON -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        (b"{}", 0),
        (b'{"a":1}', 1),
        (b'{"a" :1, "b"\t:\n2}', 2),
        (b'{"a":{"b":{"c":[{"d":1},{"d":2}]}}}', 5),
        (b'{"a\\\\":1}', 1),  # a key ending in an escaped backslash
        (b'{"\\u0022":1}', 1),
        (b'["a", {"k": "v"}, "b"]', 1),
    ],
)
def test_count_json_keys_counts_exactly_the_written_keys(body: bytes, keys: int) -> None:
    assert count_json_keys(body) == keys
    pairs: list[int] = []
    json.loads(body, object_pairs_hook=lambda p: pairs.append(len(p)) or dict(p))  # type: ignore[func-returns-value]
    assert sum(pairs) == keys, "cross-checked with the stdlib parser"


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":"x\\":y","b":1}',  # an escaped quote and a colon inside a value
        b'{"a":"\\\\\\":"}',  # value: backslash, escaped quote, colon
        b'{"a":":x"}',
        b'{"l":[":", {"k": " : "}]}',
        b'{"a":{"b":":"},"c":[":"]}',
    ],
)
def test_values_that_look_like_keys_are_over_counted_but_accepted(body: bytes) -> None:
    pairs: list[int] = []
    json.loads(body, object_pairs_hook=lambda p: pairs.append(len(p)) or dict(p))  # type: ignore[func-returns-value]
    assert count_json_keys(body) > sum(pairs), "an upper bound, never below"
    assert parse_request_json(body) == orjson.loads(body)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab:"\\ \n{}', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='ab:"\\ ', max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=_JSON, indent=st.booleans())
def test_the_key_count_is_never_below_the_real_one(value: Any, indent: bool) -> None:
    """The soundness the duplicate check rests on, for any document (also with whitespace)."""
    body = json.dumps(value, indent=1 if indent else None, separators=(",", " : ") if indent else (",", ":")).encode()
    pairs: list[int] = []
    json.loads(body, object_pairs_hook=lambda p: pairs.append(len(p)) or dict(p))  # type: ignore[func-returns-value]
    assert count_json_keys(body) >= sum(pairs)


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"model":"a","model":"b"}', "model"),
        (b'{"model":"a" , "model" : "b"}', "model"),
        (b'{"m":[{"role":"user","content":"x","content":"y"}]}', "content"),
        (b'{"a":{"b":1,"b":2}}', "b"),
        (b'{"x\\u0041":1,"xA":2}', "xA"),  # the same key spelled two ways
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(body: bytes, name: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_request_json(body)
    assert err.value.code == "invalid_json" and repr(name) in err.value.message


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"{", b'{"a":NaN}', b"\xff"])
def test_non_objects_and_invalid_json_are_refused(body: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        parse_request_json(body)
    assert err.value.code == "invalid_json"


def test_deep_bodies_that_need_the_exact_check_are_refused_not_crashed() -> None:
    depth = 1000  # orjson accepts up to 1024 levels; the stdlib's recursive parser does not
    body = b'{"a":' * depth + b'":x"' + b"}" * depth
    with pytest.raises(GatewayError) as err:
        parse_request_json(body)
    assert err.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("body", "lossy"),
    [
        (b'{"seed":18446744073709551615}', False),
        (b'{"seed":-9223372036854775808}', False),
        (b'{"seed":18446744073709551616}', True),
        (b'{"x":[1,{"y":-9223372036854775809}]}', True),
        (b'{"s":"123456789012345678901234567890"}', False),  # digits in a string
        (b'{"f":1234567890123456789012.5}', False),  # a float stays a float
        (b'{"a":1}', False),
        (b'{"x": [ 18446744073709551616 ]}', True),  # whitespace, first in an array
        (b'{"x":[1,\n  -9223372036854775809]}', True),
        (b"18446744073709551616", True),
        (b'{"s":"card, 4111111111111111111 and: 1234567890123456789012"}', False),  # in a string, after ',' / ':'
        # Large bodies: the digit-run check first, then the exact one.
        (b'{"s":"' + b"x" * 300_000 + b'","seed":18446744073709551616}', True),
        (b'{"s":"' + b"x" * 300_000 + b'","seed":18446744073709551615}', False),
        (b'{"s":"' + b"x" * 300_000 + b'","seed":1}', False),
    ],
)
def test_lossy_integers(body: bytes, lossy: bool) -> None:
    assert has_lossy_integers(body) is lossy


async def test_a_rewritten_body_with_a_huge_integer_is_refused_not_changed() -> None:
    body = b'{"model":"fast","seed":123456789012345678901234567890,"messages":[]}'
    _, r = await run(Processor(pipeline()), headers_msg(CHAT), body_msg(body))
    assert r.immediate_response.status.code == 400
    assert orjson.loads(r.immediate_response.body)["error"]["code"] == "invalid_json"
    # Not rewritten (no alias): forwarded byte for byte, so nothing to refuse.
    _, r = await run(Processor(pipeline()), headers_msg(CHAT), body_msg(body.replace(b"fast", b"gpt-5.5")))
    assert r.WhichOneof("response") == "request_body" and not r.request_body.response.body_mutation.body


def test_valid_bodies_parse_like_orjson() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": 'say "a": b'}] * 3, "n": 1})
    assert parse_request_json(body) == orjson.loads(body)


# -- quoting --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [("gpt-5", "'gpt-5'"), ("a\r\nb", "'a\\r\\nb'"), ("x" * 100, "'" + "x" * 64 + "…'"), ("\x00", "'\\x00'")],
)
def test_quote_is_short_and_printable(value: str, shown: str) -> None:
    assert quote(value) == shown


# -- hygiene through the processor ----------------------------------------------------------------


async def test_query_is_filtered_per_endpoint() -> None:
    [r] = await run(Processor(pipeline()), headers_msg(CHAT + "?trace=1&x=2"))
    assert set_headers(r.request_headers.response.header_mutation)[":path"] == CHAT.encode()
    [r] = await run(Processor(pipeline()), headers_msg("/v1/messages?beta=true&x=1"))
    assert set_headers(r.request_headers.response.header_mutation)[":path"] == b"/v1/messages?beta=true"
    [r] = await run(Processor(pipeline()), headers_msg(CHAT))
    assert ":path" not in set_headers(r.request_headers.response.header_mutation)


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        (CHAT + "?key=" + KEY, {}),
        (CHAT + "?k=sk%2Dgw%2D" + "k" * 32, {}),
        (CHAT, {"cookie": "a=" + KEY}),
        (CHAT, {"proxy_authorization": "Bearer " + KEY}),
        (CHAT, {"x_other": "SK-GW-" + "k" * 10}),
    ],
)
async def test_keys_outside_auth_headers_are_refused(path: str, extra: dict[str, str]) -> None:
    [r] = await run(Processor(pipeline()), headers_msg(path, "POST", False, **extra))
    ir = r.immediate_response
    assert ir.status.code == 400
    assert orjson.loads(ir.body)["error"]["code"] == "misplaced_api_key"
    assert KEY not in ir.body.decode()


@pytest.mark.parametrize(("count", "size", "refused"), [(10, 10, False), (80, 10, True), (5, 20_000, True)])
async def test_header_limits(count: int, size: int, refused: bool) -> None:
    extra = {f"x_h{i}": "v" * size for i in range(count)}
    [r] = await run(Processor(pipeline()), headers_msg(CHAT, "POST", False, **extra))
    if refused:
        assert r.immediate_response.status.code == 431
        assert orjson.loads(r.immediate_response.body)["error"]["code"] == "request_headers_too_large"
    else:
        assert r.WhichOneof("response") == "request_headers"


async def test_only_allow_listed_headers_go_upstream() -> None:
    extra = {
        "openai_organization": "org-client",
        "cookie": "a=b",
        "x_stainless_lang": "python",
        "x_custom": "1",
        "user_agent": "sdk",
        "x_envoy_original_path": "/x",
    }
    body = orjson.dumps({"model": "gpt-5.5", "messages": []})
    _, r = await run(Processor(pipeline()), headers_msg(CHAT, "POST", False, **extra), body_msg(body))
    removed = set(r.request_body.response.header_mutation.remove_headers)
    assert {"openai-organization", "cookie", "x-custom"} <= removed
    assert not removed & {"x-stainless-lang", "user-agent", "content-type", "x-request-id", "x-envoy-original-path"}
    assert "x-gateway-provider" in set_headers(r.request_body.response.header_mutation)


async def test_anthropic_version_is_the_configured_one_when_the_clients_is_not_forwarded() -> None:
    config = parse_config(
        {
            "providers": {"anthropic": {"schema": "anthropic", "forward_headers": ["content-type"]}},
            "models": [{"name": "claude", "provider": "anthropic"}],
            "tenants": {"t": {}},
            "auth": CONFIG.auth.model_dump(),
        }
    )
    from extproc.auth.credentials import load_provider_auth
    from extproc.auth.service import KeyService
    from extproc.pipeline import Pipeline
    from extproc.stages import default_stages
    from tests.memstore import CountingStore

    p = Pipeline(default_stages(config, KeyService(CountingStore(), config), load_provider_auth(config)))
    body = orjson.dumps({"model": "claude", "max_tokens": 1, "messages": []})
    _, r = await run(Processor(p), headers_msg("/v1/messages", anthropic_version="2099-01-01"), body_msg(body))
    mutation = r.request_body.response.header_mutation
    assert set_headers(mutation)["anthropic-version"] == b"2023-06-01"
    assert "anthropic-version" not in mutation.remove_headers


# -- admission ------------------------------------------------------------------------------------


def ctx_with(content_length: int | None = None) -> RequestContext:
    ctx = RequestContext()
    if content_length is not None:
        ctx.headers["content-length"] = str(content_length)
    return ctx


async def test_admission_bounds_streams_and_bytes_and_releases_everything() -> None:
    stage = AdmissionStage(max_streams=2, max_body_bytes=100)
    a, b, c = ctx_with(60), ctx_with(30), ctx_with()
    await stage.request_headers(a)
    await stage.request_headers(b)
    with pytest.raises(GatewayError) as err:
        await stage.request_headers(c)
    assert err.value.code == "gateway_overloaded" and err.value.headers == {"retry-after": "1"}
    await stage.finish(c)  # a refused exchange still finishes: nothing was taken for it
    assert (stage.counters.streams, stage.counters.body_bytes) == (2, 90)
    await stage.response_headers(a)  # request phases over: bytes back, stream still open
    assert (stage.counters.streams, stage.counters.body_bytes) == (2, 30)
    for ctx in (a, b, a):  # finish twice is harmless
        await stage.finish(ctx)
    assert (stage.counters.streams, stage.counters.body_bytes) == (0, 0)
    big = ctx_with(101)  # larger than the whole budget: can never fit, so 413 and not a retriable 503
    with pytest.raises(GatewayError) as too_large:
        await stage.request_headers(big)
    assert (too_large.value.status, too_large.value.code) == (413, "request_too_large")
    await stage.finish(big)
    chunked = ctx_with()
    await stage.request_headers(chunked)
    chunked.body = b"x" * 150
    with pytest.raises(GatewayError):
        await stage.request_body(chunked)
    await stage.finish(chunked)
    assert (stage.counters.streams, stage.counters.body_bytes) == (0, 0)
    assert (stage.counters.refused_streams, stage.counters.refused_bytes) == (1, 1)


async def test_peaks_of_streams_and_bytes_are_taken_and_restart_from_now() -> None:
    stage = AdmissionStage(max_streams=10, max_body_bytes=1000)
    ctxs = [ctx_with(100) for _ in range(4)]
    for ctx in ctxs:
        await stage.request_headers(ctx)
    for ctx in ctxs[1:]:
        await stage.finish(ctx)
    assert stage.counters.take_peak() == (400, 4)
    assert stage.counters.take_peak() == (100, 1)  # what is still in flight
    await stage.finish(ctxs[0])
    assert stage.counters.take_peak() == (100, 1) and stage.counters.take_peak() == (0, 0)


@pytest.mark.parametrize(
    ("peaks", "trims"),
    [
        ([(0, 0), (0, 999), (8 * 2**20 - 1, 0)], 0),  # below both thresholds: never
        ([(0, 1000)], 1),  # a burst of streams has passed
        ([(8 * 2**20, 3)], 1),  # large bodies have passed
        ([(0, 5000), (0, 0), (2**30, 5000)], 2),
    ],
)
async def test_the_heap_is_trimmed_after_a_peak(
    monkeypatch: pytest.MonkeyPatch, peaks: list[tuple[int, int]], trims: int
) -> None:
    """The soak's burst of 5,000 small requests left ~70 MB in glibc's arenas: peaks of streams
    trigger the trim too, not only peaks of body bytes."""
    done: list[int] = []

    def trim() -> bool:
        done.append(1)
        return True

    monkeypatch.setattr(allocator, "trim", trim)
    pending = iter(peaks)

    def take() -> tuple[int, int]:
        try:
            return next(pending)
        except StopIteration:
            raise asyncio.CancelledError from None

    with pytest.raises(asyncio.CancelledError):
        await allocator.trim_after_peaks(take, interval=0)
    assert len(done) == trims


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "error"),
    [
        ({"schema": "openai", "forward_headers": ["cookie"]}, "never forwarded"),
        ({"schema": "openai", "forward_headers": ["x-*"]}, "never forwarded"),
        ({"schema": "openai", "forward_headers": ["X-Upper"]}, "bad header name"),
        ({"schema": "anthropic", "organization": "org-1"}, "openai-schema providers only"),
        ({"schema": "openai", "organization": "org 1"}, "providers.p.organization"),
    ],
)
def test_provider_header_config_is_validated_with_its_path(provider: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"providers": {"p": provider}})
    assert error in str(err.value) and "providers.p" in str(err.value)


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("authorization", True),
        ("proxy-authorization", True),
        ("cookie", True),
        ("x-goog-api-key", True),
        ("x-amz-security-token", True),
        ("x-gateway-provider", True),
        ("anthropic-beta", False),
        ("x-stainless-lang", False),
        ("x-mock-output-tokens", False),
    ],
)
def test_credential_headers(name: str, credential: bool) -> None:
    assert is_credential_header(name) is credential


def test_check_requires_room_for_the_gateways_headers() -> None:
    cfg = envoyconf.load(Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml")
    ok = parse_config(BASE)
    assert not [p for p in envoyconf.check(ok, cfg) if "max_request" in p or "max_message" in p]
    tight = parse_config({**BASE, "server": {"max_request_headers": 90, "max_request_headers_kb": 60}})
    problems = envoyconf.check(tight, cfg)
    assert any("max_request_headers (90)" in p for p in problems)
    assert any("max_request_headers_kb (60)" in p for p in problems)
    few = parse_config({**BASE, "server": {"max_concurrent_streams": 100}})
    assert any("circuit breaker max_requests (5000)" in p for p in envoyconf.check(few, cfg))
    small = parse_config({**BASE, "server": {"max_message_bytes": 8 * 1024 * 1024}})
    assert any("max_message_bytes" in p for p in envoyconf.check(small, cfg))
    assert not [p for p in envoyconf.check(ok, cfg) if "http2_protocol_options" in p]
    many = parse_config({**BASE, "server": {"max_concurrent_streams": 6000}})
    assert sum("max_concurrent_streams (5000) must be at least" in p for p in envoyconf.check(many, cfg)) == 1
    assert sum("circuit breaker max_requests (5000)" in p for p in envoyconf.check(few, cfg)) == 1
    del envoyconf.http2_options(envoyconf.clusters(cfg)["extproc"])["max_concurrent_streams"]
    assert sum("max_concurrent_streams (unset)" in p for p in envoyconf.check(ok, cfg)) == 1
