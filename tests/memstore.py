"""An in-memory KeyStore for unit tests: counts lookups and can pretend to be down or not live."""

from __future__ import annotations

from extproc.auth.keys import Tenant, VirtualKey
from extproc.auth.store import KeyStore, StoreUnavailable


class CountingStore(KeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, VirtualKey] = {}
        self.tenants: dict[str, Tenant] = {}
        self.lookups = 0
        self.is_live = True
        self.down = False

    @property
    def live(self) -> bool:
        return self.is_live

    async def find_by_hash(self, key_hash: str) -> VirtualKey | None:
        self.lookups += 1
        if self.down:
            raise StoreUnavailable("test: store is down")
        return self.keys.get(key_hash)

    async def get_key(self, key_id: str) -> VirtualKey | None:
        return next((k for k in self.keys.values() if k.id == key_id), None)

    async def list_keys(self, tenant: str | None = None) -> list[VirtualKey]:
        return [k for k in self.keys.values() if tenant is None or k.tenant == tenant]

    async def put_key(self, key: VirtualKey, replaces_hash: str | None = None) -> None:
        if replaces_hash:
            self.keys.pop(replaces_hash, None)
        self.keys[key.key_hash] = key
        self._notify([key.key_hash, *([replaces_hash] if replaces_hash else [])])

    async def get_tenant(self, name: str) -> Tenant | None:
        return self.tenants.get(name)

    async def list_tenants(self) -> list[Tenant]:
        return list(self.tenants.values())

    async def put_tenant(self, tenant: Tenant) -> None:
        self.tenants[tenant.name] = tenant
        self._notify(None)
