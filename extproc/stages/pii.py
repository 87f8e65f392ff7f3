"""PII and secret redaction: on the request before it leaves, and on the response the user gets.

The request's text (see extproc.pii.walk) is scanned with the tenant's policy: values are masked,
hashed, replaced by placeholders to be restored later, or the request is refused (`block`: 400
`pii_blocked`, nothing forwarded). If scanning fails or takes longer than the policy allows, the
request is refused (`on_error: block`, 503 `pii_redaction_failed`) or, only when configured,
forwarded as the client wrote it (`on_error: allow`). Values are never logged.

On the response, placeholders are put back (`restore`) and, with `responses: mask`, entities the
model wrote are masked; JSON and SSE, message text and tool-call arguments, both schemas.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import GatewayConfig
from ..errors import ErrorKind, GatewayError
from ..pii.policy import PiiSpec, Policy, resolve
from ..pii.redact import PiiBlocked, Redaction, is_documentation_value
from ..pii.stream import Rewriter, StreamRewriter, rewrite_json
from ..pii.walk import embedding_tokens, request_slots
from ..pipeline import Need, RequestContext, ResponseChunk, Stage

log = logging.getLogger("extproc.pii")

# Text above this size is scanned in a worker thread, under the policy's timeout.
_THREAD_SCAN_CHARS = 32 * 1024


@dataclass
class PiiCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    requests_scanned: int = 0
    redacted: dict[str, int] = field(default_factory=dict)
    masked_in_responses: dict[str, int] = field(default_factory=dict)
    blocked: int = 0
    failures: int = 0
    forwarded_unscanned: int = 0


@dataclass
class _Exchange:
    policy: Policy
    rewriter: Rewriter
    stream: StreamRewriter | None = None


class PiiStage(Stage):
    name = "pii"

    def __init__(self, config: GatewayConfig, hash_key: bytes | None = None) -> None:
        self.default: PiiSpec | None = config.pii
        self.tenants: dict[str, PiiSpec | None] = {n: t.pii for n, t in config.tenants.items()}
        self.hash_key = hash_key
        self.counters = PiiCounters()
        self._policies: dict[str, Policy | None] = {}

    def policy_for(self, tenant: str) -> Policy | None:
        if tenant not in self._policies:
            self._policies[tenant] = resolve(self.default, self.tenants.get(tenant))
        return self._policies[tenant]

    # -- request --------------------------------------------------------------------------------

    async def request_body(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None:
            return
        tenant = ctx.identity.tenant if ctx.identity is not None else ""
        policy = self.policy_for(tenant)
        if policy is None:
            return
        if ctx.path == "/v1/embeddings" and embedding_tokens(ctx.json):
            # Token ids cannot be scanned: refused rather than sent unchecked (fail safe).
            ctx.notes["pii"] = "blocked"
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                "Embeddings input as token ids cannot be checked for personal data under this API key's policy; "
                "send text.",
                "pii_unscannable",
                "input",
            )
        redaction = Redaction(policy, tenant, self.hash_key)
        try:
            slots = request_slots(ctx.client_schema, ctx.json)
            size = sum(len(owner[key]) for owner, key, _ in slots)
            if size > _THREAD_SCAN_CHARS:
                new = await asyncio.wait_for(asyncio.to_thread(_scan, redaction, slots), policy.timeout_seconds)
            else:
                new = _scan(redaction, slots)
            redaction.check()
        except PiiBlocked as blocked:
            self.counters.blocked += 1
            ctx.notes["pii"] = "blocked"
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                "The request contains data this API key may not send: "
                + ", ".join(blocked.types)
                + ". Remove it and retry.",
                "pii_blocked",
            ) from None
        except GatewayError:
            raise
        except Exception as err:
            self.counters.failures += 1
            ctx.notes["pii"] = "failed"
            log.error("pii: scanning request %s failed: %s", ctx.request_id, type(err).__name__)
            if policy.on_error == "block":
                raise GatewayError(
                    ErrorKind.UNAVAILABLE,
                    "The gateway could not check this request for personal data; it was not sent. Retry shortly.",
                    "pii_redaction_failed",
                    headers={"retry-after": "1"},
                ) from None
            self.counters.forwarded_unscanned += 1
            return
        self.counters.requests_scanned += 1
        ctx.notes["pii"] = "redacted" if redaction.counts else "clean"
        if redaction.counts:
            ctx.pii = dict(redaction.counts)
            for kind, n in redaction.counts.items():
                self.counters.redacted[kind] = self.counters.redacted.get(kind, 0) + n
        if redaction.changed:
            for (owner, key, _), text in zip(slots, new, strict=True):
                owner[key] = text
            ctx.mark_body_changed()
        mask = self._masker(policy) if policy.responses == "mask" else None
        restore = redaction.originals if policy.responses != "off" else {}
        if mask is not None or restore:
            ctx.state[self.name] = _Exchange(policy, Rewriter(restore, mask))
            ctx.need(Need.JSON | Need.EVENTS | Need.EDIT)

    def _masker(self, policy: Policy) -> Any:
        counts = self.counters.masked_in_responses

        detector = policy.response_detector
        assert detector is not None

        def mask(text: str, start_at: int) -> str:
            out: list[str] = []
            pos = start_at
            for f in detector.find(text):
                if f.start < start_at:
                    continue
                if policy.ignore_documentation_values and is_documentation_value(f.type, text[f.start : f.end]):
                    continue
                out.append(text[pos : f.start])
                out.append(f"[{f.type}]")
                pos = f.end
                counts[f.type] = counts.get(f.type, 0) + 1
            out.append(text[pos:])
            return "".join(out)

        return mask

    def scrub(self, tenant: str, text: str) -> str:
        """`text` for a trace span: every entity the tenant's policy does not allow becomes [TYPE]
        (never a value, never a reversible placeholder)."""
        policy = self.policy_for(tenant)
        if policy is None:
            return text
        out: list[str] = []
        pos = 0
        for f in policy.detector.find(text):
            if policy.action(f.type) == "allow" or f.start < pos:
                continue
            out.append(text[pos : f.start])
            out.append(f"[{f.type}]")
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    # -- response -------------------------------------------------------------------------------

    async def response_body(self, ctx: RequestContext, chunk: ResponseChunk) -> None:
        ex: _Exchange | None = ctx.state.get(self.name)
        if ex is None or ctx.route is None:
            return
        schema = ctx.client_schema
        if chunk.events is not None:
            if ex.stream is None:
                ex.stream = StreamRewriter(schema, ex.rewriter)
            events, changed = ex.stream.events(chunk.events, chunk.end_of_stream)
            if changed:
                chunk.events[:] = events
                chunk.events_changed = True
        elif (
            chunk.end_of_stream
            and chunk.json is not None
            and ctx.response_status < 400
            and rewrite_json(schema, chunk.json, ex.rewriter)
        ):
            chunk.json_changed = True

    async def finish(self, ctx: RequestContext) -> None:
        ctx.state.pop(self.name, None)


def _scan(redaction: Redaction, slots: list[Any]) -> list[str]:
    return redaction.redact_all([owner[key] for owner, key, _ in slots], [json_text for _, _, json_text in slots])


def hash_key_from_env(config: GatewayConfig) -> bytes | None:
    """The secret for `hash` (from the env var gateway.yaml names); None when no policy hashes."""
    spec = config.pii
    uses_hash = any(
        s is not None and (s.action == "hash" or "hash" in s.entities.values())
        for s in (spec, *(t.pii for t in config.tenants.values()))
    )
    if not uses_hash:
        return None
    name = spec.hash_key_env if spec is not None and spec.hash_key_env else "PII_HASH_KEY"
    value = os.environ.get(name)
    if not value or len(value) < 16:
        from ..config import ConfigError

        raise ConfigError(f"pii: the hash action needs a secret of at least 16 characters in ${name}")
    return value.encode()


def pii_wanted(config: GatewayConfig) -> bool:
    return config.pii is not None or any(t.pii is not None for t in config.tenants.values())
