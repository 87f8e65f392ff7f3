"""Semantic mode: a new prompt close enough to a cached one is answered with its answer.

Only the last user turn is embedded; everything else (parameters, system prompt, earlier turns,
and the embedding source) is hashed into the bucket the search runs in (`bucket_key`), so a
conversation with a different history never matches.

Two embedding sources. `local`: a hashed bag of words computed in the server, without a network
call or a model; it matches near-duplicates (case, punctuation, spacing, a word added or changed in
a long prompt), not paraphrases in other words. Its vectors are sparse ({feature: weight}). Or an
embeddings model (the stage calls it through Envoy): dense vectors, compared with numpy. A search
is one cosine per vector of the bucket, at most MAX_CANDIDATES of them.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import numpy as np
import orjson

from .key import cache_key

# Vectors kept per bucket (the most recent); a full bucket takes no more until entries expire.
MAX_CANDIDATES = 256
# A search slower than this is a miss (the request goes to the provider).
SEARCH_TIMEOUT = 0.05
_WORD = re.compile(r"\w+")
_DIMS = 1 << 20

Vector = dict[int, float] | list[float]


def embed(text: str) -> dict[int, float]:
    """Word counts (lower-cased, sub-linear: 1 + log n) hashed into 2^20 features, L2-normalized."""
    counts: dict[int, int] = {}
    for word in _WORD.findall(text.lower()):
        h = zlib.crc32(word.encode()) % _DIMS
        counts[h] = counts.get(h, 0) + 1
    weights = {h: 1.0 + math.log(n) for h, n in counts.items()}
    norm = math.sqrt(sum(w * w for w in weights.values()))
    return {h: w / norm for h, w in weights.items()} if norm else {}


def cosine(a: Vector, b: Vector) -> float:
    """Both sparse (local) or both dense (a model's); 0 for a mix or an empty vector."""
    if isinstance(a, dict) and isinstance(b, dict):
        if len(a) > len(b):
            a, b = b, a
        return sum(w * b.get(h, 0.0) for h, w in a.items())
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a:
        va, vb = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        return float(va @ vb) / norm if norm else 0.0
    return 0.0


def pack(v: Vector) -> str:
    """A vector as compact text (JSON, 6 digits): what the stores keep. Sparse: [[feature,
    weight], ...]; dense: [x, ...]."""
    if isinstance(v, dict):
        return "[" + ",".join(f"[{h},{w:.6f}]" for h, w in v.items()) + "]"
    return "[" + ",".join(f"{x:.6f}" for x in v) + "]"


def unpack(text: str | bytes) -> Vector:
    try:
        items = orjson.loads(text)
        if items and isinstance(items[0], list):
            return {int(h): float(w) for h, w in items}
        return [float(x) for x in items]
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError):
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


def bucket_key(tenant: str, schema: str, model: str, body: dict[str, Any], source: str = "local") -> str:
    """Everything but the last user turn, and the embedding source, hashed: requests that may
    share answers (vectors of two sources are never compared)."""
    messages = body.get("messages")
    rest = {**body, "messages": messages[:-1] if isinstance(messages, list) else messages}
    return cache_key(tenant, schema, f"{model}#{source}", rest)


def best_match(query: Vector, candidates: dict[str, Vector], threshold: float) -> tuple[str, float] | None:
    """The most similar candidate at or over the threshold. Dense candidates are scored in one
    matrix product (a model's vectors have ~1,500 dimensions)."""
    if isinstance(query, list):
        keys = [k for k, v in candidates.items() if isinstance(v, list) and len(v) == len(query)]
        if not keys or not query:
            return None
        matrix = np.asarray([candidates[k] for k in keys], dtype=np.float32)
        q = np.asarray(query, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(q))
        sims = (matrix @ q) / np.where(norms == 0, 1.0, norms)
        i = int(np.argmax(sims))
        return (keys[i], float(sims[i])) if sims[i] >= threshold else None
    best: tuple[str, float] | None = None
    for key, vec in candidates.items():
        sim = cosine(query, vec)
        if sim >= threshold and (best is None or sim > best[1]):
            best = (key, sim)
    return best


def search(query: Vector, packed: dict[str, str], threshold: float) -> tuple[str, float] | None:
    """best_match over packed candidates (what the stores return)."""
    return best_match(query, {k: unpack(v) for k, v in packed.items()}, threshold)
