"""The key store interface. Two implementations: `embedded` (SQLite file + memory, zero setup,
one server process) and `redis` (shared by every replica)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from ..store.errors import StoreUnavailable
from .keys import Tenant, VirtualKey

__all__ = ["Invalidate", "KeyStore", "StoreUnavailable"]

# Called with the key hashes whose records changed, or None when anything may have changed.
Invalidate = Callable[[list[str] | None], None]


class KeyStore(ABC):
    def __init__(self) -> None:
        self._listeners: list[Invalidate] = []

    def on_invalidate(self, listener: Invalidate) -> None:
        self._listeners.append(listener)

    def _notify(self, hashes: list[str] | None) -> None:
        for listener in self._listeners:
            listener(hashes)

    @property
    def live(self) -> bool:
        """True while this process is guaranteed to hear about every change (so caching is safe)."""
        return True

    # lifecycle: `start` also begins watching for changes made by other processes
    async def start(self, watch: bool = True) -> None:  # noqa: B027
        pass

    async def close(self) -> None:  # noqa: B027
        pass

    @abstractmethod
    async def find_by_hash(self, key_hash: str) -> VirtualKey | None: ...

    @abstractmethod
    async def get_key(self, key_id: str) -> VirtualKey | None: ...

    @abstractmethod
    async def list_keys(self, tenant: str | None = None) -> list[VirtualKey]: ...

    @abstractmethod
    async def put_key(self, key: VirtualKey, replaces_hash: str | None = None) -> None:
        """Create or update a key. `replaces_hash` (rotation) stops the old secret at once."""

    @abstractmethod
    async def get_tenant(self, name: str) -> Tenant | None: ...

    @abstractmethod
    async def list_tenants(self) -> list[Tenant]: ...

    @abstractmethod
    async def put_tenant(self, tenant: Tenant) -> None: ...
