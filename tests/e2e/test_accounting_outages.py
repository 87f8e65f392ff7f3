"""Usage records through outages, end to end: real Envoy, the real server (`extproc serve`), a
Redis of this module's own (so it can be killed) and PostgreSQL behind a TCP proxy of this
module's own (so the database can vanish), under concurrent load of OpenAI and Anthropic requests,
streamed and not.

The promise checked: every response a client got (served or refused) is in the ledger exactly
once, the Redis aggregates count each of them once, nothing is left in the spool, the streams or
the consumer group's pending lists. The whole module shares one stack, and keeps one list of every
request id its clients ever received: after each outage the ledger must hold exactly that list."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import yaml
from redis import Redis, RedisError

from extproc.accounting.sink import PUSD_PER_USD, RedisUsageSink, Scope
from extproc.accounting.spool import Spool
from extproc.config import load_config
from extproc.devstack import Stack, free_port, free_ports_run, tcp_open, wait_until
from extproc.store import RedisBackend
from extproc.store.redis import tenant_tag
from tests.e2e.conftest import Admin, free_ports, make_stack
from tests.e2e.test_accounting import MSGS

pytestmark = pytest.mark.e2e

T = TypeVar("T")
TENANT = "outage"
THREADS = 16


def stable_port() -> int:
    """A free port below the kernel's ephemeral range: a server that is stopped and started again
    on it cannot find it taken by some process's outgoing connection in between (free_port picks
    from there)."""
    return free_port()


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """`check`'s first truthy answer, or a failure after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(interval)


class RedisServer:
    """redis-server on a fixed port, durable across a SIGKILL: appendfsync always writes and
    fsyncs every command before answering it, so what the gateway was told is kept (this module
    tests the gateway, not Redis's durability)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (bash scripts/test installs it)")
        self.binary = binary
        self.workdir = workdir
        self.port = stable_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115  # the child holds it
        try:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        wait_until("redis-server", lambda: tcp_open(self.port) and self._pong(), [self.proc], 15)

    def _pong(self) -> bool:
        try:
            with Redis(port=self.port, socket_timeout=1) as r:
                return bool(r.ping())
        except RedisError:
            return False  # refused, or still loading the append-only file

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class TcpProxy:
    """A TCP forwarder on a fixed port. `stop` closes the listener and every connection (the
    database vanishes for whoever is behind it); `start` listens on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = stable_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.accepted = 0

    @property
    def listening(self) -> bool:
        with self._lock:
            return self._listener is not None

    def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.1)
        with self._lock:
            self._listener = s
        self._spawn(self._accept_loop, s)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
                self.accepted += 1
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._conns.discard(s)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            listener.close()
        self._close(*conns)
        for t in self._threads:
            t.join(5)
        self._threads = []


@dataclass
class Result:
    index: int
    kind: str
    status: int | None = None
    request_id: str | None = None
    complete: bool = False
    error: str | None = None
    sent_at: float = 0.0


KINDS = ("openai-json", "openai-sse", "anthropic-json", "anthropic-sse")


def one_request(c: httpx.Client, key: str, i: int) -> Result:
    kind = KINDS[i % len(KINDS)]
    res = Result(i, kind, sent_at=time.monotonic())
    stream = kind.endswith("sse")
    headers = {"x-mock-latency-ms": str(10 + (i * 7) % 40), "x-mock-tag": f"outage-{i}"}
    if stream:
        headers["x-mock-chunk-delay-ms"] = "10"
    if kind.startswith("anthropic"):
        path = "/v1/messages"
        body: dict[str, Any] = {"model": "sonnet", "max_tokens": 200, "messages": MSGS}
        headers |= {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        path = "/v1/chat/completions"
        body = {"model": "gpt-5.5" if i % 3 else "fast", "messages": MSGS}
        headers["authorization"] = f"Bearer {key}"
    if stream:
        body["stream"] = True
    try:
        with c.stream("POST", path, json=body, headers=headers) as r:
            res.status = r.status_code
            res.request_id = r.headers.get("x-gateway-request-id")
            data = r.read()
    except httpx.HTTPError as err:
        res.error = f"{type(err).__name__}: {err}"
        return res
    if res.status == 200:
        if not stream:
            res.complete = b'"usage"' in data
        elif kind == "openai-sse":
            res.complete = data.rstrip().endswith(b"data: [DONE]")
        else:
            res.complete = b"message_stop" in data
    return res


class Load:
    """Requests from THREADS threads at about `rate` per second in all, until `stop` (or `limit`
    requests): a steady load that keeps going while the test breaks something underneath it.
    Each thread keeps its own pace, so a slow phase is not followed by a burst."""

    def __init__(self, base_url: str, key: str, rate: float, limit: int = 1000) -> None:
        self.base_url = base_url
        self.key = key
        self.rate = rate
        self.limit = limit
        self.results: list[Result] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(n,), daemon=True) for n in range(THREADS)]

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def sent_since(self, t: float) -> int:
        with self._lock:
            return sum(1 for r in self.results if r.sent_at >= t)

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _worker(self, n: int) -> None:
        period = THREADS / self.rate
        due = time.monotonic() + n / self.rate
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                with self._lock:
                    i = self._next
                    if i >= self.limit:
                        return
                    self._next += 1
                try:
                    res = one_request(c, self.key, i)
                except Exception as err:  # a bug here must show up as a failed request, not hang
                    res = Result(i, KINDS[i % len(KINDS)], error=repr(err))
                with self._lock:
                    self.results.append(res)
                due = max(due + period, time.monotonic())

    def stop(self, timeout: float) -> list[Result]:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"load still running {timeout}s after stop"
        return sorted(self.results, key=lambda r: r.index)


@dataclass
class Outages:
    stack: Stack
    admin: Admin
    redis: RedisServer
    proxy: TcpProxy
    # The ledger's database directly (this module's reads), not through the proxy.
    direct_url: str
    # Every request id a client of this module received, with the status it got.
    sent: dict[str, int] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.admin.config.store.redis_prefix

    def key(self, name: str) -> tuple[str, str]:
        secret, key = self.admin.key(TENANT, name)
        return secret, key.id

    def take(self, results: list[Result]) -> None:
        for r in results:
            assert r.error is None, f"request {r.index} ({r.kind}) failed on the client: {r.error}"
            assert r.request_id, f"request {r.index} ({r.kind}) got status {r.status} without x-gateway-request-id"
            assert r.request_id not in self.sent, f"request id {r.request_id} handed out twice"
            assert r.status is not None
            self.sent[r.request_id] = r.status

    # -- the ledger -----------------------------------------------------------------------------

    def ledger_rows(self) -> list[tuple[Any, ...]]:
        """(request_id, tenant, key_id, model, UTC day, status, input, output, cost_usd)."""
        with psycopg.connect(self.direct_url, autocommit=True) as conn:
            cur = conn.execute(
                "SELECT request_id, tenant, key_id, model, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD'),"
                " status, input_tokens, output_tokens, cost_usd FROM usage_records"
            )
            return list(cur.fetchall())

    def duplicated_ids(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.direct_url, autocommit=True) as conn:
            cur = conn.execute("SELECT request_id, count(*) FROM usage_records GROUP BY request_id HAVING count(*) > 1")
            return list(cur.fetchall())

    def wait_for_ledger(self, timeout: float) -> list[tuple[Any, ...]]:
        def complete() -> list[tuple[Any, ...]] | None:
            rows = self.ledger_rows()
            return rows if self.sent.keys() <= {r[0] for r in rows} else None

        try:
            return poll("every request id in the ledger", complete, timeout, 0.2)
        except pytest.fail.Exception:
            got = {r[0] for r in self.ledger_rows()}
            missing = [(rid, self.sent[rid]) for rid in self.sent if rid not in got]
            pytest.fail(f"{len(missing)} of {len(self.sent)} request ids never reached the ledger: {missing[:10]}")

    # -- Redis ----------------------------------------------------------------------------------

    def redis_client(self) -> Redis:
        return Redis.from_url(self.redis.url, decode_responses=True, socket_timeout=5)

    def stream_state(self) -> dict[str, tuple[int, int]]:
        """Per tenant stream: (XLEN, entries pending in group "ledger")."""
        with self.redis_client() as r:
            out: dict[str, tuple[int, int]] = {}
            for stream in sorted(r.smembers(f"{self.prefix}usage:streams")):
                pending = r.xpending(stream, "ledger")
                out[stream] = (int(r.xlen(stream)), int(pending["pending"]))
            return out

    def wait_streams_empty(self, timeout: float) -> dict[str, tuple[int, int]]:
        def empty() -> dict[str, tuple[int, int]] | None:
            state = self.stream_state()
            return state if state and all(v == (0, 0) for v in state.values()) else None

        try:
            return poll("usage streams drained", empty, timeout)
        except pytest.fail.Exception:
            pytest.fail(f"entries left in the usage streams (xlen, pending): {self.stream_state()}")

    def aggregates(self, wanted: list[tuple[str, str, Scope, str]]) -> list[dict[str, int | str]]:
        async def go() -> list[dict[str, int | str]]:
            backend = RedisBackend(self.redis.url, prefix=self.prefix)
            try:
                sink = RedisUsageSink(backend, Spool(self.stack.workdir / "agg-spool", 1 << 20))
                return [await sink.aggregates(t, day, scope, sid) for t, day, scope, sid in wanted]
            finally:
                await backend.close()

        return asyncio.run(go())

    # -- the spool ------------------------------------------------------------------------------

    def spool_files(self) -> list[str]:
        path = self.admin.config.spool_path
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    # -- the invariant --------------------------------------------------------------------------

    def check_exactly_once(self, timeout: float) -> dict[str, Any]:
        """Every id the clients received is in the ledger once with the status they saw, nothing
        else is; the aggregates count each once; spool, streams and pending lists are empty."""
        rows = self.wait_for_ledger(timeout)
        ids = Counter(r[0] for r in rows)
        assert not [rid for rid, n in ids.items() if n > 1]
        assert self.duplicated_ids() == []
        extra = [r for r in rows if r[0] not in self.sent]
        assert not extra, f"{len(extra)} ledger records for requests no client saw: {extra[:5]}"
        wrong = [(r[0], r[5], self.sent[r[0]]) for r in rows if r[5] != self.sent[r[0]]]
        assert not wrong, f"records whose status is not what the client got (id, record, client): {wrong[:5]}"
        streams = self.wait_streams_empty(timeout)
        try:
            poll("spool drained", lambda: not self.spool_files(), timeout)
        except pytest.fail.Exception:
            pytest.fail(f"left in the spool {self.admin.config.spool_path}: {self.spool_files()}")

        # The hot-path aggregates (what budgets read) equal the durable records, per scope and day.
        groups: dict[tuple[str, str, Scope, str], list[tuple[Any, ...]]] = defaultdict(list)
        for r in rows:
            tenant, key_id, model, day = r[1], r[2], r[3], r[4]
            groups[(tenant, day, "tenant", "")].append(r)
            groups[(tenant, day, "key", key_id)].append(r)
            groups[(tenant, day, "model", model)].append(r)
        wanted = sorted(groups)
        mismatches = []
        for g, agg in zip(wanted, self.aggregates(wanted), strict=True):
            recs = groups[g]
            expect = {
                "requests": len(recs),
                "input_tokens": sum(int(r[6]) for r in recs),
                "output_tokens": sum(int(r[7]) for r in recs),
                "cost_pusd": int(sum((Decimal(r[8] or 0) for r in recs), Decimal(0)) * PUSD_PER_USD),
            }
            got = {k: int(agg[k]) for k in expect}
            if got != expect:
                mismatches.append((g, got, expect))
        assert not mismatches, f"Redis aggregates differ from the ledger (group, redis, ledger): {mismatches}"
        return {"records": len(rows), "aggregate_groups": len(wanted), "streams": streams}


def _proxied(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


def _with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="module")
def outages(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Outages]:
    with _outages(tmp_path_factory, pg_url, workers=1) as env:
        yield env


@pytest.fixture(scope="module")
def outages_two_workers(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Outages]:
    """Two worker processes (reuse_port) sharing one spool directory and one Redis."""
    with _outages(tmp_path_factory, pg_url, workers=2) as env:
        yield env


@contextlib.contextmanager
def _outages(tmp_path_factory: pytest.TempPathFactory, pg_url: str, workers: int) -> Iterator[Outages]:
    workdir = tmp_path_factory.mktemp("outages")
    pg = urlsplit(pg_url)
    schema = f"outage_{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as cleanup:
        redis_server = RedisServer(workdir / "redis")
        cleanup.callback(redis_server.stop)
        redis_server.start()
        proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
        cleanup.callback(proxy.stop)
        proxy.start()

        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")

        def drop_schema() -> None:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

        cleanup.callback(drop_schema)
        direct_url = _with_schema(pg_url, schema)

        # Two workers on two ports (worker_listen: ports): Envoy spreads the load over both from the
        # first request, so both spool.
        kw: dict[str, Any] = {}
        if workers > 1:
            ports = free_ports()
            kw = {
                "overrides": {"server": {"workers": workers, "worker_listen": "ports"}},
                "ports": dataclasses.replace(ports, extproc=free_ports_run(workers)),
                "extproc_endpoints": workers,
            }
        stack, admin = make_stack(workdir / "stack", redis_server.url, workers=workers, **kw)
        data = yaml.safe_load(admin.config_path.read_text())
        data["ledger"] = {"database_url_env": "DATABASE_URL"}
        admin.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        admin.config = load_config(admin.config_path)
        proc = admin.cli("db", "migrate", env={"DATABASE_URL": direct_url})
        assert proc.returncode == 0, proc.stderr
        # The server reaches the database only through the proxy.
        stack.env["DATABASE_URL"] = _with_schema(_proxied(pg_url, proxy.port), schema)
        cleanup.callback(stack.stop)
        stack.start()
        env = Outages(stack, admin, redis_server, proxy, direct_url)

        # Warm-up: one served request and one refused (a tenant-less record), both in the ledger,
        # so both tenant streams exist and the consumer (which looks for new streams every 10 s)
        # reads them before anything breaks.
        secret, _ = env.key("warm-up")
        with httpx.Client(base_url=stack.base_url, timeout=30) as c:
            env.take([one_request(c, secret, 0), one_request(c, "sk-not-a-key", 1)])
        assert sorted(env.sent.values()) == [200, 401]
        env.check_exactly_once(timeout=20)
        assert proxy.accepted > 0, "the server reached the ledger without the proxy"
        yield env


def _statuses(results: list[Result]) -> Counter[int | None]:
    return Counter(r.status for r in results)


def test_redis_killed_under_load_loses_and_duplicates_nothing(outages: Outages) -> None:
    _redis_kill(outages)


def test_redis_killed_under_load_with_two_workers(outages_two_workers: Outages) -> None:
    """Both workers spool into one directory while Redis is down and replay it once it is back:
    still every request once in the ledger."""
    writers = _redis_kill(outages_two_workers)
    assert len(writers) == 2, f"spool segments came from {writers}, not from both workers"


def _redis_kill(env: Outages) -> set[str]:
    """The pids (from the segment names) that spooled during the outage."""
    secret, _ = env.key("redis-kill")
    writers: set[str] = set()
    started = time.monotonic()
    load = Load(env.stack.base_url, secret, rate=50).start()
    back = float("inf")
    try:
        poll("load under way", lambda: load.done >= 60, 15, 0.01)
        done_at_kill = load.done
        env.redis.kill()
        killed = time.monotonic()
        # Records of refused requests (and of streams that end meanwhile) must go to the spool.
        poll("a spool segment while Redis is down", lambda: any(n.startswith("seg-") for n in env.spool_files()), 3)
        while time.monotonic() < killed + 3.0:  # the outage: 3 s of load without Redis
            # seg-<time_ns>-<pid>-<random>.spool
            writers |= {n.split("-")[2] for n in env.spool_files() if n.startswith("seg-")}
            time.sleep(0.05)
        done_at_restart = load.done
        env.redis.start()  # same port, same append-only file
        back = time.monotonic()
        poll("load after the restart", lambda: load.sent_since(back) >= 50, 15, 0.01)
    finally:
        if env.redis.proc is None:
            env.redis.start()
        results = load.stop(30)
    load_seconds = time.monotonic() - started
    env.take(results)
    statuses = _statuses(results)
    incomplete = [(r.index, r.kind) for r in results if r.status == 200 and not r.complete]
    assert not incomplete, f"served responses that were cut short: {incomplete}"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0, f"the outage did not show: {statuses}"
    after = _statuses([r for r in results if r.sent_at >= back])
    assert after[200] >= 0.9 * after.total(), f"still refusing once Redis answers again: {after}"
    summary = env.check_exactly_once(timeout=30)
    print(
        f"\nredis kill: {len(results)} requests in {load_seconds:.1f}s, {dict(statuses)};"
        f" {done_at_kill} done at the kill, {done_at_restart} at the restart, {dict(after)} sent after it;"
        f" ledger {summary['records']} records (module total), {summary['aggregate_groups']} aggregate groups,"
        f" all drained {time.monotonic() - started:.1f}s after the load began; spooled by pids {sorted(writers)}"
    )
    return writers


def test_database_down_under_load_loses_and_duplicates_nothing(outages: Outages) -> None:
    env = outages
    secret, _ = env.key("db-down")
    stream = f"{env.prefix}{tenant_tag(TENANT)}:usage"
    started = time.monotonic()
    load = Load(env.stack.base_url, secret, rate=50).start()
    try:
        poll("load under way", lambda: load.done >= 50, 15, 0.01)
        env.proxy.stop()
        stopped = time.monotonic()
        # The records wait in the stream meanwhile (read and pending, or not read yet).
        poll("records waiting in the stream", lambda: env.stream_state().get(stream, (0, 0))[0] >= 20, 5)
        time.sleep(max(0.0, stopped + 5.0 - time.monotonic()))  # the outage: 5 s of load without the database
        in_stream = env.stream_state().get(stream, (0, 0))
        env.proxy.start()
        back = time.monotonic()
        poll("load after the database is back", lambda: load.sent_since(back) >= 50, 15, 0.01)
    finally:
        if not env.proxy.listening:
            env.proxy.start()
        results = load.stop(30)
    load_seconds = time.monotonic() - started
    env.take(results)
    statuses = _statuses(results)
    incomplete = [(r.index, r.kind) for r in results if r.status == 200 and not r.complete]
    assert not incomplete, f"served responses that were cut short: {incomplete}"
    assert statuses == Counter({200: len(results)}), f"the database is not on the request path: {statuses}"
    summary = env.check_exactly_once(timeout=30)
    print(
        f"\ndb down: {len(results)} requests in {load_seconds:.1f}s, {dict(statuses)};"
        f" (xlen, pending) of the stream when the database came back: {in_stream};"
        f" ledger {summary['records']} records (module total), {summary['aggregate_groups']} aggregate groups,"
        f" all drained {time.monotonic() - started:.1f}s after the load began"
    )
