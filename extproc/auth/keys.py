"""Virtual key format, hashing and the policy a key carries.

Keys are `sk-gw-` + 32 URL-safe characters from `secrets` (192 bits). They are stored only as a
SHA-256 hex digest: for high-entropy random tokens a fast hash is as safe as a slow password hash
(there is nothing to brute-force), and it costs ~1 µs per request instead of ~100 ms.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from fnmatch import translate
from typing import Any

from ..limits.spec import Limits

KEY_PREFIX = "sk-gw-"
_BODY_LEN = 32  # token_urlsafe(24) -> 32 chars, 192 bits
KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{{_BODY_LEN}}}$")
DISPLAY_CHARS = 4  # random characters shown in listings; 24 bits, useless to an attacker
_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_key(secret: str) -> str:
    """The one key-hashing function: every store, cache and static key uses it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def looks_like_key(value: str) -> bool:
    return KEY_RE.match(value) is not None


# Anything that could be a gateway key (or most of one) inside a longer text: a key pasted into a
# query string or a cookie is refused before it can be forwarded or logged.
_KEY_INSIDE = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{8}}", re.IGNORECASE)


def contains_key(text: str) -> bool:
    return _KEY_INSIDE.search(text) is not None


def display_prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + DISPLAY_CHARS] + "…"


def is_key_id(value: str) -> bool:
    return _ID_RE.match(value) is not None


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '30d', '2w' -> seconds."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"bad duration {text!r}: use a number and one of s, m, h, d, w (e.g. 30d)")
    return int(m.group(1)) * _UNIT[m.group(2)]


@dataclass(frozen=True)
class Tenant:
    name: str
    # Models keys of this tenant may use unless the key says otherwise; None = every model.
    models: tuple[str, ...] | None = None
    # Opaque policy defaults (limits, budgets, PII) that later stages define; keys override per field.
    policy: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Tenant:
        models = d.get("models")
        return Tenant(
            name=d["name"],
            models=tuple(models) if models is not None else None,
            policy=dict(d.get("policy") or {}),
            created_at=float(d.get("created_at") or 0.0),
        )


@dataclass(frozen=True)
class VirtualKey:
    id: str
    name: str
    tenant: str
    key_hash: str
    prefix: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    models: tuple[str, ...] | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    # Keys from gateway.yaml: managed by editing the file, not by the CLI.
    static: bool = False

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VirtualKey:
        models = d.get("models")
        return VirtualKey(
            id=d["id"],
            name=d["name"],
            tenant=d["tenant"],
            key_hash=d["key_hash"],
            prefix=d["prefix"],
            created_at=float(d["created_at"]),
            expires_at=None if d.get("expires_at") is None else float(d["expires_at"]),
            revoked_at=None if d.get("revoked_at") is None else float(d["revoked_at"]),
            models=tuple(models) if models is not None else None,
            policy=dict(d.get("policy") or {}),
            static=bool(d.get("static", False)),
        )

    def with_changes(self, **changes: Any) -> VirtualKey:
        return replace(self, **changes)


def mint(
    tenant: str, name: str, models: tuple[str, ...] | None = None, ttl: float | None = None
) -> tuple[str, VirtualKey]:
    """A new key: (the secret, shown once; the record that is stored)."""
    secret = new_secret()
    now = time.time()
    key = VirtualKey(
        id=new_key_id(),
        name=name,
        tenant=tenant,
        key_hash=hash_key(secret),
        prefix=display_prefix(secret),
        created_at=now,
        expires_at=now + ttl if ttl else None,
        models=models,
    )
    return secret, key


class ModelMatcher:
    """Allowed-model patterns (exact names or shell-style globs such as 'gpt-*', 'openai/*')."""

    __slots__ = ("_exact", "_re", "patterns")

    def __init__(self, patterns: tuple[str, ...] | None) -> None:
        self.patterns = patterns
        if patterns is None:
            self._exact: frozenset[str] = frozenset()
            self._re: re.Pattern[str] | None = None
            return
        globs = [p for p in patterns if any(c in p for c in "*?[")]
        self._exact = frozenset(p for p in patterns if p not in globs)
        self._re = re.compile("|".join(translate(g) for g in globs)) if globs else None

    def allows(self, model: str) -> bool:
        if self.patterns is None:
            return True
        return model in self._exact or (self._re is not None and self._re.match(model) is not None)


@dataclass(frozen=True)
class Identity:
    """Who is calling, resolved once per request: the key's own settings over its tenant's."""

    key_id: str
    key_name: str
    tenant: str
    models: ModelMatcher
    policy: dict[str, Any]
    # The tenant's and the key's rate limits and budgets (both apply).
    limits: Limits = field(default_factory=Limits)

    @staticmethod
    def of(key: VirtualKey, tenant: Tenant | None) -> Identity:
        models = key.models if key.models is not None else (tenant.models if tenant else None)
        tenant_policy = tenant.policy if tenant else {}
        policy = {**tenant_policy, **key.policy}
        limits = Limits.of(key.tenant, tenant_policy, key.id, key.policy)
        return Identity(key.id, key.name, key.tenant, ModelMatcher(models), policy, limits)
