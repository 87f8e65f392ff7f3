"""Semantic mode: a new prompt close enough to a cached one is answered with its answer.

Only the last user turn is embedded; everything else (parameters, system prompt, earlier turns)
is hashed into the bucket the search runs in (`bucket_key`), so a conversation with a different
history never matches. The embedding is `local`: a hashed bag of words computed in the server,
without a network call or a model. It matches near-duplicates (case, punctuation, spacing, a word
added or changed in a long prompt), not paraphrases in other words; the threshold is the cosine
similarity of the two turns' word counts. Vectors are sparse ({feature: weight}), so a search is a
few dot products over at most MAX_CANDIDATES vectors of one bucket.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

from .key import cache_key

# Vectors kept per bucket (the most recent); a full bucket takes no more until entries expire.
MAX_CANDIDATES = 256
# A search slower than this is a miss (the request goes to the provider).
SEARCH_TIMEOUT = 0.05
_WORD = re.compile(r"\w+")
_DIMS = 1 << 20

Vector = dict[int, float]


def embed(text: str) -> Vector:
    """Word counts (lower-cased, sub-linear: 1 + log n) hashed into 2^20 features, L2-normalized."""
    counts: dict[int, int] = {}
    for word in _WORD.findall(text.lower()):
        h = zlib.crc32(word.encode()) % _DIMS
        counts[h] = counts.get(h, 0) + 1
    weights = {h: 1.0 + math.log(n) for h, n in counts.items()}
    norm = math.sqrt(sum(w * w for w in weights.values()))
    return {h: w / norm for h, w in weights.items()} if norm else {}


def cosine(a: Vector, b: Vector) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(w * b.get(h, 0.0) for h, w in a.items())


def pack(v: Vector) -> str:
    """A vector as compact text (JSON pairs, 6 digits): what the stores keep."""
    return "[" + ",".join(f"[{h},{w:.6f}]" for h, w in v.items()) + "]"


def unpack(text: str | bytes) -> Vector:
    import orjson

    try:
        pairs = orjson.loads(text)
        return {int(h): float(w) for h, w in pairs}
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return {}


def last_user_text(body: dict[str, Any]) -> str | None:
    """The text of the final message when it is the user's (either schema), else None: a turn
    ending in tool results or an assistant prefill is cached exactly or not at all."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None  # images, tool results: not something a word vector describes
            parts.append(part["text"])
        return "\n".join(parts)
    return None


def bucket_key(tenant: str, schema: str, model: str, body: dict[str, Any]) -> str:
    """Everything but the last user turn, hashed: requests that may share answers."""
    messages = body.get("messages")
    rest = {**body, "messages": messages[:-1] if isinstance(messages, list) else messages}
    return cache_key(tenant, schema, model, rest)


def best_match(query: Vector, candidates: dict[str, Vector], threshold: float) -> tuple[str, float] | None:
    best: tuple[str, float] | None = None
    for key, vec in candidates.items():
        sim = cosine(query, vec)
        if sim >= threshold and (best is None or sim > best[1]):
            best = (key, sim)
    return best
