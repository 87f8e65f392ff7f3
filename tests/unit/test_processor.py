"""The processor's replies, message by message, as Envoy would receive them."""

from __future__ import annotations

import uuid

import orjson
import pytest

from extproc.auth.credentials import load_provider_auth
from extproc.auth.keys import hash_key
from extproc.auth.service import KeyService
from extproc.config import TranslationConfig, parse_config
from extproc.pipeline import Need, Pipeline, RequestContext, ResponseChunk, Stage, new_request_id
from extproc.processor import Processor
from extproc.stages import default_stages
from extproc.wire import core_pb2
from extproc.wire import external_processor_pb2 as ep
from extproc.wire import processing_mode_pb2 as pm
from tests.memstore import CountingStore

KEY = "sk-gw-" + "k" * 32
CONFIG = parse_config(
    {
        "tenants": {"t": {}},
        "auth": {"static_keys": [{"id": "k", "name": "k", "tenant": "t", "sha256": hash_key(KEY)}]},
        "providers": {"openai": {"schema": "openai"}, "anthropic": {"schema": "anthropic"}},
        "models": [
            {"name": "gpt-5.5", "provider": "openai"},
            {"name": "fast", "provider": "openai", "upstream": "gpt-5.4-mini"},
            {"name": "claude", "provider": "anthropic"},
        ],
    }
)


def pipeline(*extra: Stage) -> Pipeline:
    keys = KeyService(CountingStore(), CONFIG)
    return Pipeline([*default_stages(CONFIG, keys, load_provider_auth(CONFIG)), *extra])


def headers_msg(path: str, method: str = "POST", eos: bool = False, **extra: str) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    hm = req.request_headers.headers
    pairs = {
        ":method": method,
        ":path": path,
        "content-type": "application/json",
        "x-request-id": "rid-1",
        "authorization": f"Bearer {KEY}",
    }
    pairs.update({k.replace("_", "-"): v for k, v in extra.items()})
    for k, v in pairs.items():
        h = hm.headers.add()
        h.key = k
        h.raw_value = v.encode()
    req.request_headers.end_of_stream = eos
    return req


def body_msg(body: bytes, eos: bool = True, response: bool = False) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    target = req.response_body if response else req.request_body
    target.body = body
    target.end_of_stream = eos
    return req


def set_headers(mutation: ep.HeaderMutation) -> dict[str, bytes]:
    for opt in mutation.set_headers:
        assert opt.append_action == core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert opt.header.value == ""  # values go in raw_value, or Envoy sees an empty header
    return {o.header.key: o.header.raw_value for o in mutation.set_headers}


async def run(proc: Processor, *msgs: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    out = []
    for m in msgs:
        resp = await proc.handle(m)
        assert resp is not None
        assert resp.WhichOneof("response") is not None, "every reply must set its oneof"
        out.append(resp)
    return out


async def test_route_and_rewrite_alias() -> None:
    proc = Processor(pipeline())
    body = orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
    r1, r2 = await run(proc, headers_msg("/v1/chat/completions", x_gateway_provider="anthropic"), body_msg(body))
    assert r1.WhichOneof("response") == "request_headers"
    assert list(r1.request_headers.response.header_mutation.remove_headers) == ["x-gateway-provider", "authorization"]
    common = r2.request_body.response
    assert common.clear_route_cache
    new_body = common.body_mutation.body
    assert orjson.loads(new_body) == {**orjson.loads(body), "model": "gpt-5.4-mini"}
    assert set_headers(common.header_mutation) == {
        "x-gateway-provider": b"openai",
        "x-gateway-model": b"gpt-5.4-mini",
        "content-length": str(len(new_body)).encode(),
    }
    meta = r2.dynamic_metadata.fields["gateway"].struct_value.fields
    assert meta["provider"].string_value == "openai" and meta["model"].string_value == "fast"
    assert proc.done, "nothing needs the response: the stream ends after the request body"


async def test_no_rewrite_keeps_body_untouched() -> None:
    proc = Processor(pipeline())
    _, r2 = await run(proc, headers_msg("/v1/messages"), body_msg(b'{"model":"claude","max_tokens":5,"messages":[]}'))
    common = r2.request_body.response
    assert not common.HasField("body_mutation")
    assert "content-length" not in set_headers(common.header_mutation)


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b'{"model":"nope","messages":[]}', 404, "model_not_found"),
        ("/v1/chat/completions", b'{"model":', 400, "invalid_json"),
        ("/v1/chat/completions", b"[1,2]", 400, "invalid_json"),
        ("/v1/chat/completions", b'{"messages":[]}', 400, "missing_model"),
        ("/v1/chat/completions", b'{"model":42}', 400, "invalid_model"),
        # Translated to Anthropic, which needs at least one message: refused before leaving.
        ("/v1/chat/completions", b'{"model":"claude","messages":[]}', 400, "invalid_request"),
        (
            "/v1/chat/completions",
            b'{"model":"claude","messages":[{"role":"user","content":"x"}],"n":3}',
            400,
            "unsupported_parameter",
        ),
        ("/v1/messages", b'{"model":"nope"}', 404, "model_not_found"),
    ],
)
async def test_bad_bodies(path: str, body: bytes, status: int, code: str) -> None:
    proc = Processor(pipeline())
    _, r2 = await run(proc, headers_msg(path), body_msg(body))
    ir = r2.immediate_response
    assert ir.status.code == status
    assert ir.details == f"extproc_{code}"
    payload = orjson.loads(ir.body)
    err = payload["error"]
    assert err["code"] == code
    if path == "/v1/messages":
        assert payload["type"] == "error"
    hdrs = set_headers(ir.headers)
    assert hdrs["content-type"] == b"application/json"
    # The gateway's own id, never the client's x-request-id (records are keyed by it).
    assert len(hdrs["x-gateway-request-id"]) == 36 and hdrs["x-gateway-request-id"] != b"rid-1"
    assert proc.done


async def test_translated_request_goes_to_the_providers_path_in_its_schema() -> None:
    proc = Processor(pipeline())
    body = b'{"model":"claude","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}'
    _, r2 = await run(proc, headers_msg("/v1/chat/completions"), body_msg(body))
    common = r2.request_body.response
    hdrs = set_headers(common.header_mutation)
    assert hdrs[":path"] == b"/v1/messages"
    assert hdrs["x-gateway-provider"] == b"anthropic"
    sent = orjson.loads(common.body_mutation.body)
    assert sent == {
        "model": "claude",
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4096,
    }
    assert hdrs["content-length"] == str(len(common.body_mutation.body)).encode()
    assert not proc.done, "the response comes back through the translator"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/chat/completions", b'{"model":"claude","messages":[{"role":"user","content":"x"}]}', "schema_mismatch"),
        (
            "/v1/messages",
            b'{"model":"gpt-5.5","max_tokens":5,"messages":[{"role":"user","content":"x"}]}',
            "schema_mismatch",
        ),
    ],
)
async def test_translation_off_refuses_the_other_schema(path: str, body: bytes, code: str) -> None:
    config = CONFIG.model_copy(update={"translation": TranslationConfig(enabled=False)})
    keys = KeyService(CountingStore(), config)
    proc = Processor(Pipeline(default_stages(config, keys, load_provider_auth(config))))
    _, r2 = await run(proc, headers_msg(path), body_msg(body))
    assert r2.immediate_response.status.code == 400
    assert orjson.loads(r2.immediate_response.body)["error"]["code"] == code


async def test_count_tokens_is_not_translated() -> None:
    proc = Processor(pipeline())
    body = b'{"model":"gpt-5.5","messages":[{"role":"user","content":"x"}]}'
    _, r2 = await run(proc, headers_msg("/v1/messages/count_tokens"), body_msg(body))
    assert r2.immediate_response.status.code == 400
    assert orjson.loads(r2.immediate_response.body)["error"]["code"] == "unsupported_endpoint"


async def test_headers_phase_refusals() -> None:
    cases = [
        (headers_msg("/v1/unknown", "GET", eos=True), 404, "unknown_endpoint"),
        (headers_msg("/v1/chat/completions", "GET", eos=True), 405, "method_not_allowed"),
        (headers_msg("/v1/chat/completions", content_type="text/plain"), 415, "unsupported_media_type"),
        (headers_msg("/v1/chat/completions", eos=True), 400, "empty_body"),
    ]
    for msg, status, code in cases:
        proc = Processor(pipeline())
        [resp] = await run(proc, msg)
        assert resp.immediate_response.status.code == status, code
        assert orjson.loads(resp.immediate_response.body)["error"]["code"] == code


async def test_models_list_in_callers_schema() -> None:
    [r] = await run(Processor(pipeline()), headers_msg("/v1/models", "GET", eos=True))
    assert [m["id"] for m in orjson.loads(r.immediate_response.body)["data"]] == ["gpt-5.5", "fast", "claude"]
    [r] = await run(Processor(pipeline()), headers_msg("/v1/models", "GET", eos=True, anthropic_version="2023-06-01"))
    assert orjson.loads(r.immediate_response.body)["first_id"] == "gpt-5.5"
    [r] = await run(Processor(pipeline()), headers_msg("/v1/models/fast", "GET", eos=True))
    assert orjson.loads(r.immediate_response.body)["id"] == "fast"
    [r] = await run(Processor(pipeline()), headers_msg("/v1/models/none", "GET", eos=True))
    assert r.immediate_response.status.code == 404


class Recorder(Stage):
    """A stage that asks for the response and its SSE events, as accounting will."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[str | None] = []
        self.finished = 0

    async def request_body(self, ctx: RequestContext) -> None:
        ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS)

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        self.events += [e.data for e in chunk.events or []]
        if chunk.end_of_stream:
            chunk.data += b": tail\n\n"
            chunk.replaced = True

    async def finish(self, ctx: RequestContext) -> None:
        self.finished += 1


async def test_response_phases_when_a_stage_asks() -> None:
    rec = Recorder()
    proc = Processor(pipeline(rec))
    await run(proc, headers_msg("/v1/chat/completions"), body_msg(b'{"model":"gpt-5.5","stream":true}'))
    assert not proc.done
    rh = ep.ProcessingRequest()
    for k, v in ((":status", "200"), ("content-type", "text/event-stream"), ("content-length", "99")):
        h = rh.response_headers.headers.headers.add()
        h.key, h.raw_value = k, v.encode()
    [r] = await run(proc, rh)
    assert r.mode_override.response_body_mode == pm.ProcessingMode.STREAMED
    assert "content-length" in r.response_headers.response.header_mutation.remove_headers
    stream = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    replies = await run(
        proc, body_msg(stream[:5], False, True), body_msg(stream[5:20], False, True), body_msg(stream[20:], True, True)
    )
    assert [r.WhichOneof("response") for r in replies] == ["response_body"] * 3
    assert not replies[0].response_body.response.HasField("body_mutation")
    assert replies[-1].response_body.response.body_mutation.body.endswith(b": tail\n\n")
    assert rec.events == ['{"a":1}', "[DONE]"]
    assert proc.done
    await proc.finish()
    assert rec.finished == 1


async def test_stage_crash_is_a_500_without_details() -> None:
    class Boom(Stage):
        async def request_body(self, ctx: RequestContext) -> None:
            raise RuntimeError("secret prompt text")

    proc = Processor(pipeline(Boom()))
    _, r = await run(proc, headers_msg("/v1/chat/completions"), body_msg(b'{"model":"gpt-5.5"}'))
    assert r.immediate_response.status.code == 500
    assert b"secret" not in r.immediate_response.body


def test_request_ids_are_canonical_random_uuids() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122
