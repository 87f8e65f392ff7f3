"""The exact cache's key: tenant, client schema, model and a canonical form of everything in the
request that can change the answer.

Computed from the body the provider will be asked (after redaction, in the client's schema) with
the model replaced by the resolved name, so aliases share entries and raw PII never enters a key.
Everything except the fields below is part of the key: an unknown field may change the answer, so
it must split entries rather than merge them."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

# Fields that do not change the answer: how it is delivered (stream, stream_options: a streamed
# and a JSON request share an entry), who asked (user, metadata), and storage or routing hints.
IGNORED = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    }
)


def cache_key(tenant: str, schema: str, model: str, body: dict[str, Any]) -> str:
    """A hex digest naming the answer. orjson with sorted keys is the canonical form (numbers and
    strings as JSON writes them; key order does not matter, list order does)."""
    canonical = {k: v for k, v in body.items() if k not in IGNORED}
    digest = hashlib.sha256()
    for part in (tenant, schema, model):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def temperature_of(body: dict[str, Any]) -> float:
    """The sampling temperature the provider will use: the request's, else 1 (both APIs' default)."""
    t = body.get("temperature")
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 1.0
