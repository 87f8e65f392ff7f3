"""Prompts and answers for trace spans, only with `tracing.capture_content: true`.

Placed right after the PII stage: what it takes of the request is what the provider is sent (the
tenant's redaction applied), and its response hooks run before PII's (the onion order), so it reads
the provider's answer before any restore puts original values back. The answer is then passed
through the tenant's detectors once more (`scrub`): entities the model wrote itself become [TYPE].
Exchanges Envoy chose not to trace (trace flags 00) are skipped without reading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ..observability.otlp_env import caller_sampled
from ..pipeline import Need, RequestContext, ResponseChunk, Stage
from ..providers import ADAPTERS, StreamReader

# A span attribute holds at most this many characters of each.
MAX_CHARS = 16 * 1024


@dataclass
class _Capture:
    schema: str
    reader: StreamReader | None = None
    json_text: str = ""


class ContentCaptureStage(Stage):
    name = "content-capture"

    def __init__(self, scrub: Callable[[str, str], str] | None = None, max_chars: int = MAX_CHARS) -> None:
        self.scrub = scrub
        self.max_chars = max_chars

    async def request_body(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None or not caller_sampled(ctx.traceparent):
            return
        body = ctx.json
        prompt = {k: body[k] for k in ("system", "messages") if k in body}
        ctx.captured["input"] = orjson.dumps(prompt).decode()[: self.max_chars]
        ctx.state[self.name] = _Capture(ctx.client_schema)
        ctx.need(Need.JSON | Need.EVENTS)

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        cap: _Capture | None = ctx.state.get(self.name)
        if cap is None:
            return
        if chunk.events is not None:
            if cap.reader is None:
                cap.reader = ADAPTERS[cap.schema].stream_reader()
            for ev in chunk.events:
                cap.reader.on_event(ev)
        elif chunk.end_of_stream and isinstance(chunk.json, dict) and ctx.response_status < 400:
            cap.json_text = ADAPTERS[cap.schema].output_text_from_json(chunk.json)

    async def finish(self, ctx: RequestContext) -> None:
        cap: _Capture | None = ctx.state.pop(self.name, None)
        if cap is None:
            return
        text = cap.reader.text if cap.reader is not None else cap.json_text
        if text:
            if self.scrub is not None:
                tenant = ctx.identity.tenant if ctx.identity is not None else ""
                text = self.scrub(tenant, text)
            answer = [{"role": "assistant", "parts": [{"type": "text", "content": text[: self.max_chars]}]}]
            ctx.captured["output"] = orjson.dumps(answer).decode()
