"""The response cache (exact mode): a repeated request is answered by the gateway itself.

Sits after redaction (the key and the entry hold only what the provider was sent and answered,
never raw PII the policy redacts) and before translation, limits and accounting: a hit is answered
in the client's schema without a provider call and counts against no limit or budget; its usage
record has `cache_hit: true`, the original tokens, cost 0 and what it saved. On a miss its
response hooks run after translation's (the onion), so it stores the answer in the client's schema,
and before the PII stage restores or masks anything: requests whose answers the PII stage rewrites
are neither served from nor stored in the cache (their answers differ per request).

A miss is stored only when it completed with status 200, is not an error, was not cut by
max_tokens (unless `cache_truncated`), and fits `max_entry_bytes`; a streamed miss is stored as
the equivalent JSON answer and streamed again from it on a hit (with the usage chunk only when the
client asks for it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import orjson

from ..accounting.sink import cost_pusd
from ..cache import semantic
from ..cache.key import cache_key, temperature_of
from ..cache.render import StreamAccumulator, accumulator, render_stream
from ..cache.store import CacheStore, Entry
from ..config import CacheSpec, GatewayConfig
from ..pipeline import DirectReply, Need, RequestContext, ResponseChunk, Stage
from ..throttle import LogThrottle
from ..translate import exchange_of

log = logging.getLogger("extproc.cache")
_warn = LogThrottle(10.0)

CACHE_HEADER = "x-gateway-cache"
# Stores in flight (kept so they are not collected before they finish).
_STORING: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class CacheSettings:
    mode: str = "off"
    ttl_seconds: int = 3600
    max_entry_bytes: int = 1024 * 1024
    cache_nonzero_temperature: bool = False
    cache_truncated: bool = False
    similarity_threshold: float = 0.95
    embedding: str = "local"
    embedding_key_env: str | None = None
    embedding_timeout_seconds: float = 2.0
    search_timeout_seconds: float = semantic.SEARCH_TIMEOUT
    count_hits: bool = False


def resolve(default: CacheSettings, *specs: CacheSpec | None) -> CacheSettings:
    """Each spec's set fields override the ones before (default, tenant, model)."""
    values = asdict(default)
    for spec in specs:
        if spec is not None:
            values.update(spec.model_dump(exclude_none=True))
    return CacheSettings(**values)


@dataclass(frozen=True, slots=True)
class Hit:
    """A request answered from the cache (ctx.cache_hit), for the usage record."""

    entry: Entry
    # Counted against limits and token budgets (cache.count_hits).
    counted: bool = False


@dataclass(slots=True)
class _Miss:
    key: str
    model: str
    tenant: str
    settings: CacheSettings
    acc: StreamAccumulator | None = None
    body: dict[str, Any] | None = None
    # Semantic mode: where this answer's vector goes once it is stored.
    bucket: str | None = None
    vector: semantic.Vector | None = None


# finish_reason / stop_reason of an answer cut by max_tokens.
_TRUNCATED = frozenset({"length", "max_tokens", "model_context_window_exceeded"})


class CacheStage(Stage):
    name = "cache"

    def __init__(self, config: GatewayConfig, store: CacheStore) -> None:
        self.store = store
        self.default = resolve(CacheSettings(), config.cache)
        self.tenants = {name: t.cache for name, t in config.tenants.items() if t.cache is not None}
        self.models: dict[str, CacheSpec] = {}
        for m in config.models:
            if m.cache is not None:
                for public in (m.name, *m.aliases):
                    self.models[public] = m.cache
        self._resolved: dict[tuple[str, str], CacheSettings] = {}
        self.hits = self.misses = self.stored = 0
        self.envoy_url = config.server.envoy_url
        self._http: httpx.AsyncClient | None = None

    def settings_for(self, tenant: str, model: str) -> CacheSettings:
        """Resolved once per (tenant, model with its own cache section): this runs on every
        request, and the keys are bounded by gateway.yaml (other models share the "" entry)."""
        key = (tenant if tenant in self.tenants else "", model if model in self.models else "")
        settings = self._resolved.get(key)
        if settings is None:
            settings = self._resolved[key] = resolve(self.default, self.tenants.get(key[0]), self.models.get(key[1]))
        return settings

    async def request_body(self, ctx: RequestContext) -> None:
        route, identity, adapter = ctx.route, ctx.identity, ctx.adapter
        if route is None or identity is None or adapter is None or ctx.endpoint is None:
            return
        settings = self.settings_for(identity.tenant, route.public_model)
        if settings.mode == "off" or ctx.path not in ("/v1/chat/completions", "/v1/messages"):
            return
        body = ctx.json
        directive = _directive(ctx.headers)
        if (
            directive == "bypass"
            or "pii" in ctx.state  # the answer is rewritten for this request (restore / mask)
            or (temperature_of(body) > 0 and not settings.cache_nonzero_temperature)
            or body.get("n") not in (None, 1)
        ):
            ctx.notes[self.name] = "bypass"
            ctx.need(Need.HEADERS)
            return
        # A model with targets shares entries whichever target answered.
        model = route.public_model if route.targets else route.upstream_model
        key = cache_key(identity.tenant, adapter.schema, model, body)
        bucket: str | None = None
        vector: semantic.Vector | None = None
        if settings.mode == "semantic":
            text = semantic.last_user_text(body)
            if text is not None:
                source = settings.embedding
                bucket = semantic.bucket_key(identity.tenant, adapter.schema, model, body, source)
                vector = semantic.embed(text) if source == "local" else await self._embed_remote(text, settings)
        if directive != "refresh":
            entry = await self.store.get(identity.tenant, model, key)
            if entry is None and bucket is not None and vector is not None:
                entry = await self._similar(identity.tenant, model, bucket, vector, settings)
            if entry is not None and entry.schema == adapter.schema:
                self.hits += 1
                if settings.count_hits:
                    # Answered after the limits stage has counted it (CacheReplyStage).
                    ctx.cache_hit = Hit(entry, counted=True)
                    ctx.notes[self.name] = "hit"
                    return
                self._answer(ctx, Hit(entry))
                return
        self.misses += 1
        _spawn(self.store.count(identity.tenant, misses=1))
        ctx.notes[self.name] = "miss"
        miss = _Miss(key, model, identity.tenant, settings, bucket=bucket, vector=vector)
        if ctx.streaming:
            miss.acc = accumulator(adapter.schema)
        ctx.state[self.name] = miss
        ctx.need(Need.HEADERS | Need.JSON | Need.EVENTS)

    async def _embed_remote(self, text: str, settings: CacheSettings) -> list[float] | None:
        """The embeddings model's vector for `text`, asked through Envoy's listener with the
        gateway's own virtual key (recorded and limited like any client's); None on any failure
        or past the timeout: then this request is looked up exactly only."""
        key = os.environ.get(settings.embedding_key_env or "")
        if not key:
            if _warn.allow("key"):
                log.warning("cache: $%s is not set; semantic lookups are off", settings.embedding_key_env)
            return None
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.envoy_url)
        try:
            resp = await self._http.post(
                "/v1/embeddings",
                json={"model": settings.embedding, "input": text},
                headers={"authorization": f"Bearer {key}"},
                timeout=settings.embedding_timeout_seconds,
            )
            data = resp.json()["data"][0]["embedding"] if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:
            if _warn.allow("embed"):
                log.warning("cache: embedding failed (%s); exact lookup only", type(err).__name__)
            return None
        if not isinstance(data, list) or not all(isinstance(x, int | float) for x in data):
            if _warn.allow("embed"):
                log.warning("cache: the embeddings model answered %d; exact lookup only", resp.status_code)
            return None
        return [float(x) for x in data]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self.store.close()

    async def _similar(
        self, tenant: str, model: str, bucket: str, vector: semantic.Vector, settings: CacheSettings
    ) -> Entry | None:
        """The entry of the closest earlier turn in the bucket, if close enough; a search slower
        than `search_timeout_seconds` is a miss."""
        threshold = settings.similarity_threshold
        try:
            packed = await asyncio.wait_for(
                self.store.candidates(tenant, model, bucket), settings.search_timeout_seconds
            )
        except TimeoutError:
            return None
        if len(packed) > 16 and isinstance(vector, list):
            # Hundreds of ~1,500-dimension vectors: parsed and scored off the event loop.
            found = await asyncio.to_thread(semantic.search, vector, packed, threshold)
        else:
            found = semantic.search(vector, packed, threshold)
        if found is None:
            return None
        return await self.store.get(tenant, model, found[0])

    def _answer(self, ctx: RequestContext, hit: Hit) -> None:
        entry = hit.entry
        ctx.cache_hit = hit
        ctx.notes[self.name] = "hit"
        headers = {CACHE_HEADER: "hit", "age": str(max(0, int(time.time() - entry.stored_at)))}
        if ctx.streaming:
            ex = exchange_of(ctx.json)
            data = render_stream(entry.schema, entry.body, include_usage=ex.include_usage)
            ctx.reply = DirectReply(200, data, {**headers, "cache-control": "no-cache"}, "text/event-stream")
        else:
            ctx.reply = DirectReply(200, orjson.dumps(entry.body), headers)

    async def response_headers(self, ctx: RequestContext) -> None:
        note = ctx.notes.get(self.name)
        if note in ("miss", "bypass"):
            ctx.set_headers[CACHE_HEADER] = note

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        miss: _Miss | None = ctx.state.get(self.name)
        if miss is None:
            return
        if ctx.response_status != 200:
            del ctx.state[self.name]
            return
        if chunk.events is not None and miss.acc is not None:
            for ev in chunk.events:
                miss.acc.on_event(ev)
        elif chunk.end_of_stream and isinstance(chunk.json, dict):
            miss.body = chunk.json
        if not chunk.end_of_stream:
            return
        del ctx.state[self.name]
        body = miss.acc.result() if miss.acc is not None else miss.body
        if body is None or (_finish_reason(body) in _TRUNCATED and not miss.settings.cache_truncated):
            return
        route = ctx.route
        usage = ctx.usage
        entry = Entry(
            schema=ctx.client_schema,
            model=route.public_model if route else "",
            upstream_model=route.upstream_model if route else "",
            provider=route.provider if route else "",
            body=body,
            usage={
                "input_tokens": usage.input_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "output_tokens": usage.output_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
            }
            if usage is not None
            else {},
            stored_at=time.time(),
        )
        data = entry.encode()
        if len(data) > miss.settings.max_entry_bytes:
            return
        self.stored += 1
        ttl = miss.settings.ttl_seconds
        _spawn(self.store.put(miss.tenant, miss.model, miss.key, data, ttl))
        if miss.bucket is not None and miss.vector:
            packed = semantic.pack(miss.vector)
            _spawn(self.store.add_vector(miss.tenant, miss.model, miss.bucket, miss.key, packed, ttl))

    async def finish(self, ctx: RequestContext) -> None:
        """After accounting's (the onion): a hit's record has what it saved."""
        ctx.state.pop(self.name, None)
        if ctx.cache_hit is not None and ctx.identity is not None:
            rec = ctx.usage
            saved = cost_pusd(rec.saved_usd) if rec is not None and rec.saved_usd is not None else 0
            _spawn(self.store.count(ctx.identity.tenant, hits=1, saved_pusd=saved or 0))


class CacheReplyStage(Stage):
    """Answers the hits that count against limits (cache.count_hits), right after the limits
    stage admitted them: a hit over a limit gets the limit's 429 like any request."""

    name = "cache-reply"

    def __init__(self, cache: CacheStage) -> None:
        self.cache = cache

    async def request_body(self, ctx: RequestContext) -> None:
        hit = ctx.cache_hit
        if isinstance(hit, Hit) and hit.counted and ctx.reply is None:
            self.cache._answer(ctx, hit)


def _directive(headers: dict[str, str]) -> str:
    """bypass (neither read nor store), refresh (store a fresh answer without reading) or ""."""
    own = headers.get(CACHE_HEADER, "").strip().lower()
    if own in ("bypass", "refresh"):
        return own
    control = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    if "no-cache" in control:
        return "bypass"
    if "no-store" in control:
        return "refresh"
    return ""


def _finish_reason(body: dict[str, Any]) -> str | None:
    reason = body.get("stop_reason")
    if isinstance(reason, str):
        return reason
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        r = choices[0].get("finish_reason")
        return r if isinstance(r, str) else None
    return None


def _spawn(coro: Any) -> None:
    """Off the response path: the client never waits for the cache store."""
    task = asyncio.ensure_future(coro)
    _STORING.add(task)
    task.add_done_callback(_STORING.discard)
