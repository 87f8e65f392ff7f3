"""Virtual keys: what apps hold instead of provider keys, and where they are kept."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from ..config import ConfigError, GatewayConfig
from .embedded import EmbeddedStore
from .redis_store import RedisStore
from .service import KeyService
from .store import KeyStore, StoreUnavailable


def open_store(config: GatewayConfig, env: Mapping[str, str] | None = None) -> KeyStore:
    """The store gateway.yaml names (not yet started). `env` (default: this process's) holds the
    Redis URL under the name the config gives."""
    if config.store.backend == "redis":
        url = (os.environ if env is None else env).get(config.store.redis_url_env)
        if not url:
            raise ConfigError(
                f"store.backend is redis but environment variable {config.store.redis_url_env} is not set"
            )
        return RedisStore(url, prefix=config.store.redis_prefix)
    return EmbeddedStore(config.resolve(config.store.path))


@asynccontextmanager
async def key_service(config: GatewayConfig, env: Mapping[str, str] | None = None) -> AsyncIterator[KeyService]:
    """A KeyService for one-off management work (CLI, dev stack, tests): the store is opened without
    watching for changes, and closed afterwards."""
    store = open_store(config, env)
    await store.start(watch=False)
    try:
        yield KeyService(store, config)
    finally:
        await store.close()


__all__ = ["EmbeddedStore", "KeyService", "KeyStore", "RedisStore", "StoreUnavailable", "key_service", "open_store"]
