"""Provider API keys: read once at start from env vars or secret files named in gateway.yaml.

They only ever leave this process as request headers towards the provider; the object holding
them never prints them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, GatewayConfig
from ..providers import ADAPTERS

_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))


@dataclass(frozen=True)
class ProviderAuth:
    provider: str
    headers: tuple[tuple[str, str], ...]

    def __repr__(self) -> str:
        return f"ProviderAuth({self.provider}, headers={[k for k, _ in self.headers]}, secret=***)"

    __str__ = __repr__


def _read_secret(provider: str, env: str | None, file: str | None, config: GatewayConfig) -> str | None:
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"provider {provider!r}: environment variable {env} is not set")
    elif file:
        path = config.resolve(file)
        try:
            value = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"provider {provider!r}: cannot read api_key_file {path}: {err.strerror}") from None
    else:
        return None
    value = value.strip()
    if not value or not set(value) <= _PRINTABLE:
        # A stray newline or space in a secret would become a header-injection or a confusing 401.
        raise ConfigError(f"provider {provider!r}: the API key is empty or contains whitespace/control characters")
    return value


def load_provider_auth(config: GatewayConfig) -> dict[str, ProviderAuth]:
    out: dict[str, ProviderAuth] = {}
    for name, p in config.providers.items():
        secret = _read_secret(name, p.api_key_env, p.api_key_file, config)
        adapter = ADAPTERS[p.schema_]
        headers = adapter.credential_headers(secret) if secret is not None else ()
        out[name] = ProviderAuth(name, headers + adapter.account_headers(p.organization, p.project))
    return out
