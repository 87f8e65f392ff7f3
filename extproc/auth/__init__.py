"""Virtual keys: what apps hold instead of provider keys, and where they are kept."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from ..config import GatewayConfig
from ..store import Backend, EmbeddedBackend, StoreUnavailable, open_backend
from .embedded import EmbeddedStore
from .redis_store import RedisStore
from .service import KeyService
from .store import KeyStore


def open_store(backend: Backend) -> KeyStore:
    """The key store on the process's backend (not started yet)."""
    if isinstance(backend, EmbeddedBackend):
        return EmbeddedStore(backend)
    return RedisStore(backend)


@asynccontextmanager
async def key_service(config: GatewayConfig, env: Mapping[str, str] | None = None) -> AsyncIterator[KeyService]:
    """A KeyService for one-off management work (CLI, dev stack, tests): the store is opened without
    watching for changes, and closed afterwards."""
    backend = open_backend(config, env)
    store = open_store(backend)
    try:
        await store.start(watch=False)
        yield KeyService(store, config)
    finally:
        await store.close()
        await backend.close()


__all__ = ["EmbeddedStore", "KeyService", "KeyStore", "RedisStore", "StoreUnavailable", "key_service", "open_store"]
