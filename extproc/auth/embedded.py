"""The zero-setup store: every key in memory, persisted to a SQLite file.

The CLI is another process, so its changes travel through the file: each server polls SQLite's
`data_version` (cheap, in a worker thread) and reloads when another connection has committed.
Lookups on the hot path are dict reads with no I/O. Meant for one server process; use Redis for
replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Literal

from ..store.embedded import EmbeddedBackend
from .keys import Tenant, VirtualKey
from .store import KeyStore, StoreUnavailable

log = logging.getLogger("extproc.auth.embedded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, record TEXT NOT NULL);
"""


class EmbeddedStore(KeyStore):
    def __init__(self, backend: EmbeddedBackend | str | Path, poll_interval: float = 0.2) -> None:
        super().__init__()
        if not isinstance(backend, EmbeddedBackend):
            backend = EmbeddedBackend(backend)
        self.path = backend.path
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._by_hash: dict[str, VirtualKey] = {}
        self._by_id: dict[str, VirtualKey] = {}
        self._tenants: dict[str, Tenant] = {}
        self._version = -1
        self._watcher: asyncio.Task[None] | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as err:
                raise StoreUnavailable(f"embedded store {self.path}: {err}") from None
            self._conn = conn
        return self._conn

    def _reload_if_changed(self) -> list[str] | Literal[False] | None:
        """False when nothing changed; else the key hashes whose records changed, or None when
        tenants changed (anything may be affected). Precise hashes let caches drop only those."""
        with self._lock:
            db = self._db()
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                return False
            keys = [VirtualKey.from_dict(json.loads(r[0])) for r in db.execute("SELECT record FROM keys")]
            tenants = [Tenant.from_dict(json.loads(r[0])) for r in db.execute("SELECT record FROM tenants")]
            by_hash = {k.key_hash: k for k in keys}
            new_tenants = {t.name: t for t in tenants}
            changed = [h for h in by_hash.keys() | self._by_hash.keys() if by_hash.get(h) != self._by_hash.get(h)]
            tenants_changed = new_tenants != self._tenants
            self._by_hash = by_hash
            self._by_id = {k.id: k for k in keys}
            self._tenants = new_tenants
            self._version = version
            return None if tenants_changed else changed

    async def start(self, watch: bool = True) -> None:
        await asyncio.to_thread(self._reload_if_changed)
        if watch:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                changed = await asyncio.to_thread(self._reload_if_changed)
                if changed is not False:
                    self._notify(changed)
            except Exception:
                log.exception("embedded store reload failed; keeping the last good state")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def find_by_hash(self, key_hash: str) -> VirtualKey | None:
        return self._by_hash.get(key_hash)

    async def get_key(self, key_id: str) -> VirtualKey | None:
        return self._by_id.get(key_id)

    async def list_keys(self, tenant: str | None = None) -> list[VirtualKey]:
        keys = sorted(self._by_id.values(), key=lambda k: k.created_at)
        return [k for k in keys if tenant is None or k.tenant == tenant]

    def _write(self, sql: str, *params: tuple[object, ...]) -> None:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for p in params:
                    db.execute(sql, p)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        # Our own commits do not bump data_version for this connection: reload explicitly.
        self._version = -1
        self._reload_if_changed()

    async def put_key(self, key: VirtualKey, replaces_hash: str | None = None) -> None:
        record = json.dumps(key.to_dict())
        await asyncio.to_thread(
            self._write,
            "INSERT INTO keys (id, key_hash, tenant, record) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET key_hash=excluded.key_hash, tenant=excluded.tenant, record=excluded.record",
            (key.id, key.key_hash, key.tenant, record),
        )
        self._notify([key.key_hash] + ([replaces_hash] if replaces_hash else []))

    async def get_tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    async def list_tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    async def put_tenant(self, tenant: Tenant) -> None:
        await asyncio.to_thread(
            self._write,
            "INSERT INTO tenants (name, record) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET record=excluded.record",
            (tenant.name, json.dumps(tenant.to_dict())),
        )
        self._notify(None)
