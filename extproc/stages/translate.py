"""Any SDK to any model: when the route's provider speaks another schema than the client, the
request is rewritten into the provider's schema (body and path) and the response back into the
client's (JSON, SSE events, errors).

Sits after redaction and before limits and accounting: redaction reads the client's schema, and
limits, credentials and accounting see the request as the provider will; on the way back (the
onion) accounting reads the provider's own usage first, then this stage turns the response into
the client's schema, and redaction restores placeholders in what the client will read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ErrorKind, GatewayError, quote
from ..pipeline import Need, RequestContext, ResponseChunk, Stage
from ..sse import SSEEvent
from ..translate import Exchange, StreamTranslator, Translator, exchange_of


@dataclass(slots=True)
class _Translating:
    # None for a model with targets until the answer names the target (response_headers).
    translator: Translator | None
    ex: Exchange
    stream: StreamTranslator | None = None


class TranslationStage(Stage):
    name = "translation"

    def __init__(self, translators: dict[tuple[str, str], Translator]) -> None:
        self.translators = translators

    async def request_body(self, ctx: RequestContext) -> None:
        route, adapter = ctx.route, ctx.adapter
        if route is None or adapter is None:
            return
        if route.targets:
            # Each attempt is translated for its target (stages/attempt.py); the answer is
            # translated here once the response names the target that gave it.
            if any(t.schema != adapter.schema for t in route.targets):
                ctx.state[self.name] = _Translating(None, exchange_of(ctx.json))
                ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS | Need.EDIT)
            return
        if route.schema == adapter.schema:
            return
        translator = self.translators.get((adapter.schema, route.schema))
        if translator is None:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"The model {quote(route.public_model)} is served through the {route.schema} API; "
                f"call it with the {route.schema} SDK (translation between schemas is not enabled).",
                "schema_mismatch",
                "model",
            )
        path = translator.paths.get(ctx.path)
        if path is None:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"{quote(ctx.path)} is not available for {quote(route.public_model)}, which is served through "
                f"the {route.schema} API.",
                "unsupported_endpoint",
                "model",
            )
        body, ex = translator.request(ctx.json)
        ctx.replace_json(body)
        ctx.body_schema = route.schema
        ctx.set_headers[":path"] = path
        ctx.state[self.name] = _Translating(translator, ex)
        ctx.notes[self.name] = f"{adapter.schema}->{route.schema}"
        ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS | Need.EDIT)

    async def response_headers(self, ctx: RequestContext) -> None:
        t: _Translating | None = ctx.state.get(self.name)
        if t is None:
            return
        if ctx.notes.get("targets") == "refused":
            # The per-attempt filter refused in the client's schema already.
            del ctx.state[self.name]
            return
        if t.translator is None:
            route = ctx.route
            pair = (ctx.client_schema, route.schema) if route is not None else None
            t.translator = self.translators.get(pair) if pair is not None else None
            if t.translator is None:  # answered in the client's own schema: nothing to do
                del ctx.state[self.name]
                return
            ctx.notes[self.name] = f"{t.translator.client}->{t.translator.provider}"
        if ctx.response_status >= 400:
            # The error body becomes the client's schema's JSON, whatever the provider sent.
            ctx.set_headers["content-type"] = "application/json"

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        t: _Translating | None = ctx.state.get(self.name)
        if t is None or t.translator is None:
            return
        if chunk.events is not None:
            if t.stream is None:
                t.stream = t.translator.stream(t.ex)
            out: list[SSEEvent] = []
            for event in chunk.events:
                out += t.stream.on_event(event)
            if chunk.end_of_stream:
                out += t.stream.close()
            chunk.events[:] = out
            chunk.events_changed = True
        elif chunk.end_of_stream and chunk.body is not None:
            status = ctx.response_status
            if status >= 400 or status == 0:
                chunk.json = t.translator.error(status, chunk.json)
            elif isinstance(chunk.json, dict):
                chunk.json = t.translator.response(chunk.json, t.ex)
            else:
                return
            chunk.json_changed = True

    async def finish(self, ctx: RequestContext) -> None:
        ctx.state.pop(self.name, None)
