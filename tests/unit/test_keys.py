from __future__ import annotations

import hashlib

import pytest

from extproc.auth.keys import (
    Identity,
    ModelMatcher,
    Tenant,
    VirtualKey,
    display_prefix,
    hash_key,
    looks_like_key,
    mint,
    parse_duration,
)


def test_hash_is_sha256_hex() -> None:
    assert hash_key("sk-gw-abc") == hashlib.sha256(b"sk-gw-abc").hexdigest()
    assert len(hash_key("x")) == 64


def test_minted_keys_have_the_format_and_enough_entropy() -> None:
    secrets_ = set()
    for _ in range(200):
        secret, key = mint("t", "n")
        assert looks_like_key(secret)
        assert len(secret) == len("sk-gw-") + 32  # 32 url-safe chars = 192 bits
        assert key.key_hash == hash_key(secret)
        assert secret not in repr(key) and secret not in str(key.to_dict())
        assert key.prefix == display_prefix(secret) and key.prefix.endswith("…") and len(key.prefix) == 11
        secrets_.add(secret)
    assert len(secrets_) == 200


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sk-gw-",
        "sk-gw-" + "a" * 31,
        "sk-gw-" + "a" * 33,
        "sk-gw-" + "a" * 31 + "!",
        "sk-gw-" + "a" * 31 + "\n",
        "sk-gw-" + "a" * 30 + "\r\n",
        "Bearer sk-gw-" + "a" * 32,
        "sk-proj-" + "a" * 32,
        "sk-gw-" + "é" * 32,
        "sk-gw-" + "a" * 32 + "\x00",
    ],
)
def test_rejects_malformed_keys(value: str) -> None:
    assert not looks_like_key(value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "10", "d", "1y", "-1d", "1.5h", "10 d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_model_matcher() -> None:
    m = ModelMatcher(("gpt-5.5", "claude-*", "openai/*"))
    assert m.allows("gpt-5.5") and m.allows("claude-haiku-5-5") and m.allows("openai/x")
    assert not m.allows("gpt-5.4-mini") and not m.allows("xclaude-1") and not m.allows("gpt-5.5x")
    assert ModelMatcher(None).allows("anything")
    assert not ModelMatcher(()).allows("anything")


def test_key_settings_override_tenant_defaults() -> None:
    tenant = Tenant("acme", models=("gpt-*",), policy={"rpm": 10, "pii": "redact"})
    _, key = mint("acme", "k")
    inherits = Identity.of(key, tenant)
    assert inherits.models.allows("gpt-5.5") and not inherits.models.allows("claude-x")
    assert inherits.policy == {"rpm": 10, "pii": "redact"}
    own = Identity.of(key.with_changes(models=("claude-*",), policy={"rpm": 99}), tenant)
    assert own.models.allows("claude-x") and not own.models.allows("gpt-5.5")
    assert own.policy == {"rpm": 99, "pii": "redact"}
    assert Identity.of(key, None).models.allows("anything")


def test_status_and_round_trip() -> None:
    _, key = mint("t", "n", ttl=60)
    assert key.status() == "active"
    assert key.status(now=key.created_at + 61) == "expired"
    assert key.with_changes(revoked_at=1.0).status() == "revoked"
    assert VirtualKey.from_dict(key.to_dict()) == key
    tenant = Tenant("t", ("a",), {"x": 1}, 5.0)
    assert Tenant.from_dict(tenant.to_dict()) == tenant
