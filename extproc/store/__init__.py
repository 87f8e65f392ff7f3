"""Storage shared by every stage: one Redis client (replicas) or one embedded state directory
(one process). Keys, usage, limits and the cache each build their own layout on top of a backend;
none of them opens its own connection."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import ConfigError, GatewayConfig
from .embedded import EmbeddedBackend
from .errors import StoreUnavailable
from .redis import RedisBackend

Backend = RedisBackend | EmbeddedBackend


def open_backend(config: GatewayConfig, env: Mapping[str, str] | None = None) -> Backend:
    """The backend gateway.yaml names (not connected yet). `env` (default: this process's) holds
    the Redis URL under the name the config gives."""
    if config.store.backend == "redis":
        url = (os.environ if env is None else env).get(config.store.redis_url_env)
        if not url:
            raise ConfigError(
                f"store.backend is redis but environment variable {config.store.redis_url_env} is not set"
            )
        return RedisBackend(url, prefix=config.store.redis_prefix, state_dir=config.resolve(config.store.path).parent)
    return EmbeddedBackend(config.resolve(config.store.path))


__all__ = ["Backend", "EmbeddedBackend", "RedisBackend", "StoreUnavailable", "open_backend"]
