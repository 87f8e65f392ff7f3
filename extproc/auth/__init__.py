"""Virtual keys: what apps hold instead of provider keys, and where they are kept."""

from __future__ import annotations

import os

from ..config import ConfigError, GatewayConfig
from .embedded import EmbeddedStore
from .redis_store import RedisStore
from .store import KeyStore, StoreUnavailable


def open_store(config: GatewayConfig) -> KeyStore:
    """The store gateway.yaml names (not yet started)."""
    if config.store.backend == "redis":
        url = os.environ.get(config.store.redis_url_env)
        if not url:
            raise ConfigError(
                f"store.backend is redis but environment variable {config.store.redis_url_env} is not set"
            )
        return RedisStore(url, prefix=config.store.redis_prefix)
    return EmbeddedStore(config.resolve(config.store.path))


__all__ = ["EmbeddedStore", "KeyStore", "RedisStore", "StoreUnavailable", "open_store"]
