"""Where cached answers live: Redis (shared by replicas) or a SQLite file (the embedded backend).

An entry is one answer in its client's schema, as JSON (a streamed answer is stored accumulated,
and streamed again from it on a hit), with the usage the provider reported and who answered, all
compressed. Entries expire (TTL) and are bounded in size; on Redis they are ordinary keys with a
TTL, so `maxmemory` eviction (volatile-* or allkeys-*) simply turns some hits into misses. The
embedded store is an LRU bounded in bytes in its own SQLite file next to the rest of the embedded
state. Lookups never raise: an unreachable store is a miss (the request goes to the provider).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
import threading
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from ..config import GatewayConfig
from ..store import Backend
from ..store.redis import RedisBackend, tenant_tag
from ..throttle import LogThrottle
from .semantic import MAX_CANDIDATES

log = logging.getLogger("extproc.cache")
_warn = LogThrottle(10.0)

# Pico-USD per USD: saved amounts are summed as integers (like the usage aggregates, cost_pusd).
PUSD = 10**12
ENTRY_VERSION = 1


@dataclass(slots=True)
class Entry:
    schema: str
    model: str
    upstream_model: str
    provider: str
    # The whole JSON response in the client's schema.
    body: dict[str, Any]
    # The provider's usage, normalized (the usage record's meaning).
    usage: dict[str, int] = field(default_factory=dict)
    stored_at: float = 0.0

    def encode(self) -> bytes:
        return zlib.compress(orjson.dumps({"v": ENTRY_VERSION, **asdict(self)}), 3)

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """None for anything that is not a current entry (corrupt, older format): a miss."""
        try:
            obj = orjson.loads(zlib.decompress(data))
            if obj.pop("v", None) != ENTRY_VERSION or not isinstance(obj.get("body"), dict):
                return None
            return cls(**obj)
        except (zlib.error, orjson.JSONDecodeError, TypeError, ValueError):
            return None


@dataclass(slots=True)
class TenantStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    saved_usd: str = "0"


class CacheStore(ABC):
    @abstractmethod
    async def get(self, tenant: str, model: str, key: str) -> Entry | None: ...

    @abstractmethod
    async def put(self, tenant: str, model: str, key: str, data: bytes, ttl: int) -> None: ...

    @abstractmethod
    async def candidates(self, tenant: str, model: str, bucket: str) -> dict[str, str]:
        """Semantic mode: the packed vectors of one bucket, by entry key ({} when unreachable)."""

    @abstractmethod
    async def add_vector(self, tenant: str, model: str, bucket: str, key: str, packed: str, ttl: int) -> None:
        """Semantic mode: index an entry's vector in its bucket (at most MAX_CANDIDATES)."""

    @abstractmethod
    async def count(self, tenant: str, hits: int = 0, misses: int = 0, saved_pusd: int = 0) -> None:
        """Add to the tenant's hit / miss / saved figures (`extproc cache stats`)."""

    @abstractmethod
    async def stats(self, tenant: str | None = None) -> dict[str, TenantStats]: ...

    @abstractmethod
    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        """Delete entries (of one tenant, of one model); how many."""

    async def close(self) -> None:
        return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheStore(CacheStore):
    """Entries at `<prefix>{t:<tenant>}:cache:e:<model>:<key>` (hash-tagged by tenant like every
    per-tenant key), stats in `<prefix>{t:<tenant>}:cache:stats`, tenants in `<prefix>cache:tenants`."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.client = backend.client
        self.prefix = backend.prefix

    def _entry_key(self, tenant: str, model: str, key: str) -> str:
        return f"{self.prefix}{tenant_tag(tenant)}:cache:e:{model}:{key}"

    def _stats_key(self, tenant: str) -> str:
        return f"{self.prefix}{tenant_tag(tenant)}:cache:stats"

    def _bucket_key(self, tenant: str, model: str, bucket: str) -> str:
        return f"{self.prefix}{tenant_tag(tenant)}:cache:s:{model}:{bucket}"

    async def candidates(self, tenant: str, model: str, bucket: str) -> dict[str, str]:
        try:
            flat = await self.backend.fast.call("HGETALL", self._bucket_key(tenant, model, bucket))
        except Exception as err:
            if _warn.allow("search"):
                log.warning("cache: semantic search failed (%s); answering from the provider", type(err).__name__)
            return {}
        if not isinstance(flat, list):
            return {}
        return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}

    async def add_vector(self, tenant: str, model: str, bucket: str, key: str, packed: str, ttl: int) -> None:
        name = self._bucket_key(tenant, model, bucket)
        try:
            if int(await self.backend.fast.call("HLEN", name)) >= MAX_CANDIDATES:
                return
            await asyncio.gather(
                self.backend.fast.call("HSET", name, key, packed), self.backend.fast.call("EXPIRE", name, ttl)
            )
        except Exception as err:
            if _warn.allow("index"):
                log.warning("cache: indexing an answer failed (%s)", type(err).__name__)

    async def get(self, tenant: str, model: str, key: str) -> Entry | None:
        try:
            data = await self.backend.fast.call("GET", self._entry_key(tenant, model, key))
        except Exception as err:
            if _warn.allow("get"):
                log.warning("cache: lookup failed (%s); answering from the provider", type(err).__name__)
            return None
        if not isinstance(data, str | bytes):
            return None
        try:
            return Entry.decode(base64.b64decode(data, validate=True))
        except ValueError:
            return None

    async def put(self, tenant: str, model: str, key: str, data: bytes, ttl: int) -> None:
        try:
            await asyncio.gather(
                # Base64: both Redis connections decode replies as UTF-8 text.
                self.backend.fast.call("SET", self._entry_key(tenant, model, key), base64.b64encode(data), "EX", ttl),
                self.backend.fast.call("SADD", f"{self.prefix}cache:tenants", tenant),
            )
        except Exception as err:
            if _warn.allow("put"):
                log.warning("cache: storing an answer failed (%s)", type(err).__name__)

    async def count(self, tenant: str, hits: int = 0, misses: int = 0, saved_pusd: int = 0) -> None:
        key = self._stats_key(tenant)
        calls = [
            self.backend.fast.call("HINCRBY", key, name, v)
            for name, v in (("hits", hits), ("misses", misses), ("saved_pusd", saved_pusd))
            if v
        ]
        calls.append(self.backend.fast.call("SADD", f"{self.prefix}cache:tenants", tenant))
        try:
            await asyncio.gather(*calls)
        except Exception as err:
            if _warn.allow("count"):
                log.warning("cache: counting failed (%s)", type(err).__name__)

    async def _tenants(self, tenant: str | None) -> list[str]:
        if tenant is not None:
            return [tenant]
        members = await self.backend.call(self.client.smembers(f"{self.prefix}cache:tenants"))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def stats(self, tenant: str | None = None) -> dict[str, TenantStats]:
        out: dict[str, TenantStats] = {}
        for t in await self._tenants(tenant):
            st = TenantStats()
            pattern = f"{self.prefix}{_glob_escape(tenant_tag(t))}:cache:e:*"
            async for k in self.client.scan_iter(match=pattern, count=500):
                st.entries += 1
                st.bytes += int(await self.client.strlen(k)) * 3 // 4
            raw = await self.backend.call(self.client.hgetall(self._stats_key(t)))
            figures = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
            st.hits, st.misses = figures.get("hits", 0), figures.get("misses", 0)
            st.saved_usd = str(Decimal(figures.get("saved_pusd", 0)) / PUSD)
            out[t] = st
        return out

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        n = 0
        for t in await self._tenants(tenant):
            model_part = _glob_escape(model) + ":" if model is not None else ""
            # Entries (e) and semantic buckets (s).
            pattern = f"{self.prefix}{_glob_escape(tenant_tag(t))}:cache:[es]:{model_part}*"
            batch: list[Any] = []
            async for k in self.client.scan_iter(match=pattern, count=500):
                batch.append(k)
                if len(batch) >= 500:
                    n += int(await self.client.delete(*batch))
                    batch = []
            if batch:
                n += int(await self.client.delete(*batch))
        return n


class EmbeddedCacheStore(CacheStore):
    """One SQLite file (`cache.db` next to the embedded state), an LRU bounded in bytes. Every call
    runs in a worker thread on one connection (a lock serializes them): nothing blocks the loop."""

    def __init__(self, path: str | Path, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (tenant TEXT NOT NULL, model TEXT NOT NULL, key TEXT NOT NULL, "
                "data BLOB NOT NULL, size INTEGER NOT NULL, expires_at REAL NOT NULL, used_at REAL NOT NULL, "
                "PRIMARY KEY (tenant, key))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS entries_used ON entries (used_at)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (tenant TEXT NOT NULL, model TEXT NOT NULL, bucket TEXT NOT NULL, "
                "key TEXT NOT NULL, vec TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (tenant, bucket, key))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS stats (tenant TEXT PRIMARY KEY, hits INTEGER NOT NULL DEFAULT 0, "
                "misses INTEGER NOT NULL DEFAULT 0, saved_pusd INTEGER NOT NULL DEFAULT 0)"
            )
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._conn(), *args)

        return await asyncio.to_thread(locked)

    async def get(self, tenant: str, model: str, key: str) -> Entry | None:
        def get(db: sqlite3.Connection) -> bytes | None:
            now = time.time()
            row = db.execute(
                "SELECT data, expires_at FROM entries WHERE tenant = ? AND key = ?", (tenant, key)
            ).fetchone()
            if row is None:
                return None
            if row[1] <= now:
                db.execute("DELETE FROM entries WHERE tenant = ? AND key = ?", (tenant, key))
                return None
            db.execute("UPDATE entries SET used_at = ? WHERE tenant = ? AND key = ?", (now, tenant, key))
            return bytes(row[0])

        try:
            data = await self._run(get)
        except sqlite3.Error as err:
            if _warn.allow("get"):
                log.warning("cache: lookup failed (%s); answering from the provider", err)
            return None
        return Entry.decode(data) if data is not None else None

    async def put(self, tenant: str, model: str, key: str, data: bytes, ttl: int) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tenant, model, key, data, len(data), now + ttl, now),
                )
                db.execute("DELETE FROM entries WHERE expires_at <= ?", (now,))
                total = db.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()[0]
                while total > self.max_bytes:
                    row = db.execute("SELECT tenant, key, size FROM entries ORDER BY used_at LIMIT 1").fetchone()
                    if row is None:
                        break
                    db.execute("DELETE FROM entries WHERE tenant = ? AND key = ?", (row[0], row[1]))
                    total -= row[2]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        try:
            await self._run(put)
        except sqlite3.Error as err:
            if _warn.allow("put"):
                log.warning("cache: storing an answer failed (%s)", err)

    async def candidates(self, tenant: str, model: str, bucket: str) -> dict[str, str]:
        def candidates(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT key, vec FROM vectors WHERE tenant = ? AND bucket = ? AND expires_at > ? LIMIT ?",
                (tenant, bucket, time.time(), MAX_CANDIDATES),
            )
            return {k: v for k, v in rows}

        try:
            return dict(await self._run(candidates))
        except sqlite3.Error as err:
            if _warn.allow("search"):
                log.warning("cache: semantic search failed (%s)", err)
            return {}

    async def add_vector(self, tenant: str, model: str, bucket: str, key: str, packed: str, ttl: int) -> None:
        def add(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("DELETE FROM vectors WHERE expires_at <= ?", (now,))
            (n,) = db.execute(
                "SELECT count(*) FROM vectors WHERE tenant = ? AND bucket = ?", (tenant, bucket)
            ).fetchone()
            if n < MAX_CANDIDATES:
                db.execute(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?)",
                    (tenant, model, bucket, key, packed, now + ttl),
                )

        try:
            await self._run(add)
        except sqlite3.Error as err:
            if _warn.allow("index"):
                log.warning("cache: indexing an answer failed (%s)", err)

    async def count(self, tenant: str, hits: int = 0, misses: int = 0, saved_pusd: int = 0) -> None:
        def count(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO stats (tenant, hits, misses, saved_pusd) VALUES (?, ?, ?, ?) ON CONFLICT (tenant) DO "
                "UPDATE SET hits = hits + excluded.hits, misses = misses + excluded.misses, "
                "saved_pusd = saved_pusd + excluded.saved_pusd",
                (tenant, hits, misses, saved_pusd),
            )

        try:
            await self._run(count)
        except sqlite3.Error as err:
            if _warn.allow("count"):
                log.warning("cache: counting failed (%s)", err)

    async def stats(self, tenant: str | None = None) -> dict[str, TenantStats]:
        def stats(db: sqlite3.Connection) -> dict[str, TenantStats]:
            now = time.time()
            out: dict[str, TenantStats] = {}
            where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
            for t, n, size in db.execute(
                f"SELECT tenant, count(*), coalesce(sum(size), 0) FROM entries {where} "
                f"{'AND' if where else 'WHERE'} expires_at > ? GROUP BY tenant",
                (*args, now),
            ):
                out[t] = TenantStats(entries=n, bytes=size)
            for t, hits, misses, pusd in db.execute(
                f"SELECT tenant, hits, misses, saved_pusd FROM stats {where}", args
            ):
                st = out.setdefault(t, TenantStats())
                st.hits, st.misses, st.saved_usd = hits, misses, str(Decimal(pusd) / PUSD)
            return out

        return dict(await self._run(stats))

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        def clear(db: sqlite3.Connection) -> int:
            clauses, args = [], []
            if tenant is not None:
                clauses.append("tenant = ?")
                args.append(tenant)
            if model is not None:
                clauses.append("model = ?")
                args.append(model)
            where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
            db.execute(f"DELETE FROM vectors {where}", args)
            return int(db.execute(f"DELETE FROM entries {where}", args).rowcount)

        return int(await self._run(clear))

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)


def open_cache_store(config: GatewayConfig, backend: Backend) -> CacheStore:
    """Redis entries when the store is Redis; else a SQLite LRU next to the embedded state."""
    if isinstance(backend, RedisBackend):
        return RedisCacheStore(backend)
    return EmbeddedCacheStore(config.state_dir / "cache.db")
