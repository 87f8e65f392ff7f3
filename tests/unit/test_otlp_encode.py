"""The hand-written OTLP span encoder against the SDK's, which is the oracle: the same request,
byte for byte once both are serialized deterministically, on random spans of every shape the SDK
accepts, and the SDK's own result where the hand encoder falls back."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extproc.observability import otlp_encode, tracing


def _value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "long", "unicode", "empty", "bool", "int", "neg", "big", "float", "bytes", "none"]
    if depth < 2:
        kinds += ["list", "tuple", "dict"]
    kind = rng.choice(kinds)
    makers: dict[str, Callable[[], Any]] = {
        "str": lambda: rng.choice(["chat", "gpt-5.4-mini", "acme", "completed", "k_1a2b"]),
        "long": lambda: "x" * rng.choice([123, 124, 125, 127, 128, 300, 20000]),
        "unicode": lambda: "é漢😀" * rng.randint(1, 60),
        "empty": lambda: "",
        "bool": lambda: rng.random() < 0.5,
        "int": lambda: rng.randint(0, 300),
        "neg": lambda: -rng.randint(1, 1 << 40),
        "big": lambda: rng.choice([(1 << 63) - 1, -(1 << 63), 1 << 62]),
        "float": lambda: rng.choice([0.0, -1.5, 12.25, 1e300, float("inf")]),
        "bytes": lambda: bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))),
        "none": lambda: None,
        "list": lambda: [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
        "tuple": lambda: tuple(rng.choice(["stop", "length", ""]) for _ in range(rng.randint(0, 3))),
        "dict": lambda: {f"k{i}": _value(rng, depth + 1) for i in range(rng.randint(0, 3))},
    }
    return makers[kind]()


def _attributes(rng: random.Random, n: int) -> dict[str, Any]:
    keys = ["gen_ai.request.model", "gateway.tenant", "http.response.status_code", "a" * 130, "ключ"]
    return {rng.choice(keys) + str(i): _value(rng) for i in range(n)}


def _spans(seed: int) -> list[ReadableSpan]:
    rng = random.Random(seed)
    resources = [
        Resource.create({"service.name": "extproc", "service.version": "1"}),
        Resource({"a": 1, "b": [1, 2]}, schema_url=rng.choice(["", "https://opentelemetry.io/schemas/1.21.0"])),
        Resource({}),
    ]
    scopes: list[InstrumentationScope | None] = [
        InstrumentationScope("extproc", "0.1"),
        InstrumentationScope("other", None, "https://example.invalid/schema", {"scope.attr": "v"}),
        None,
    ]
    spans = []
    for _ in range(rng.randint(1, 40)):
        parent = None
        if rng.random() < 0.7:
            parent = SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, is_remote=rng.random() < 0.5)
        state = TraceState([("vendor", "abc"), ("other", "1")]) if rng.random() < 0.2 else TraceState()
        context = SpanContext(
            rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, False, TraceFlags(1), trace_state=state
        )
        status = rng.choice(
            [Status(StatusCode.UNSET), Status(StatusCode.OK), Status(StatusCode.ERROR, "upstream_error")]
        )
        start = rng.choice([rng.getrandbits(63), 0, None])
        attributes: Any = _attributes(rng, rng.randint(0, 25))
        if rng.random() < 0.2:  # as the SDK's own spans hold them, some over the limit (dropped count)
            plain = {k: v for k, v in attributes.items() if isinstance(v, (str, int, float, bool))}
            attributes = BoundedAttributes(maxlen=rng.randint(0, 5), attributes=plain, immutable=False)
        spans.append(
            ReadableSpan(
                name=rng.choice(["chat gpt-5.4-mini", "", "ext_proc POST", "é" * 200]),
                context=context,
                parent=parent,
                resource=rng.choice(resources),
                attributes=attributes,
                kind=rng.choice(list(SpanKind)),
                status=status,
                start_time=start,
                end_time=None if start is None else start + rng.randint(0, 10**9),
                instrumentation_scope=rng.choice(scopes),
            )
        )
    return spans


def _same(spans: list[ReadableSpan]) -> None:
    ours = otlp_encode.encode_spans(spans)
    theirs = sdk_encode_spans(spans)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert ours == theirs


@pytest.mark.parametrize("seed", range(60))
def test_random_batches_encode_as_the_sdk_does(seed: int) -> None:
    spans = _spans(seed)
    otlp_encode._request(spans)  # the hand path itself, not a fallback
    _same(spans)


def _context() -> SpanContext:
    return SpanContext(7, 9, False, TraceFlags(1))


@pytest.mark.parametrize(
    "span_kwargs",
    [
        {"events": [Event("retry", {"attempt": 2}, timestamp=5)]},
        {"links": [Link(SpanContext(3, 4, True), {"why": "fallback"})]},
        {"attributes": {"too.big": 1 << 64}},
        {"attributes": {"surrogate": "\ud800"}},
        {"attributes": {"a.set": frozenset([1])}},
        {"attributes": {"str.subclass": type("S", (str,), {})("x")}},
    ],
    ids=["events", "links", "int-out-of-range", "surrogate", "unsupported-type", "str-subclass"],
)
def test_what_the_hand_encoder_does_not_write_goes_to_the_sdk(span_kwargs: dict[str, Any]) -> None:
    span = ReadableSpan(name="s", context=_context(), resource=Resource({}), **span_kwargs)
    with pytest.raises((otlp_encode._Unsupported, UnicodeEncodeError)):
        otlp_encode._request([span])
    _same([span])


def test_the_server_span_with_every_attribute_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A span as the observability stage builds it, through `Tracing.export`."""
    captured: list[ReadableSpan] = []

    class Capture:
        def export(self, spans: list[ReadableSpan]) -> Any:
            captured.extend(spans)

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 0) -> bool:
            return True

    from extproc.config import TracingConfig

    t = tracing.Tracing(TracingConfig(), "1.2.3", exporter=Capture())
    attrs: dict[str, tracing.AttributeValue] = {
        "gateway.request_id": "0" * 32,
        "gen_ai.operation.name": "chat",
        "gen_ai.response.finish_reasons": ["stop", "tool_calls"],
        "http.response.status_code": 502,
        "gen_ai.usage.input_tokens": 12,
        "gateway.estimated": True,
        "gateway.cost_usd": "0.000123",
        "gateway.ttft_ms": 12.5,
    }
    t.export(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracing.SpanData("chat gpt-5.4-mini", 10, 20, attrs, "upstream_error"),
    )
    t.export(None, tracing.SpanData("ext_proc POST", 10, 20, {}))
    t.shutdown()
    assert len(captured) == 2
    _same(captured)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_the_exporters_encode_with_it(monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    """Both hooks exist in the installed SDK: an upgrade that removes one fails here, instead of
    making every sampled span ~4x dearer without a word."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporter = tracing._exporter()
    try:
        if protocol == "grpc":
            ours, sdk = vars(type(exporter)), vars(type(exporter).__mro__[1])
            assert "_translate_data" in ours and "_translate_data" in sdk
            spans = _spans(1)
            assert exporter._translate_data(spans) == sdk_encode_spans(spans)
        else:
            from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_module

            assert vars(http_module)["encode_spans"] is otlp_encode.encode_spans
    finally:
        exporter.shutdown()


def test_the_pair_cache_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for a few pairs the cache fills and is cleared many times within a batch; every
    span still encodes as the SDK's does (a stale or misplaced pair would show)."""
    monkeypatch.setattr(otlp_encode, "_PAIRS_MAX", 5)
    monkeypatch.setattr(otlp_encode, "_pairs", {})
    for seed in range(100, 110):
        spans = _spans(seed)
        _same(spans)
        _same(spans)  # the second time from the cache where it still holds them
        assert len(otlp_encode._pairs) <= 5
