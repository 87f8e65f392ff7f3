"""The grpc.aio ext_proc server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from . import allocator
from .accounting import tokenizer
from .accounting.consumer import LedgerConsumer
from .accounting.pricing import PriceTable
from .accounting.sink import EmbeddedUsageSink, RedisUsageSink, UsageSink
from .accounting.spool import Spool
from .auth import KeyStore, open_store
from .auth.credentials import load_provider_auth
from .auth.service import KeyService
from .config import ConfigError, GatewayConfig
from .ledger import Ledger, LedgerSchemaError, LedgerUnavailable, open_ledger
from .limits.alerts import AlertSender
from .limits.local import FallbackLimiter, LocalLimiter
from .limits.redis import RedisLimiter
from .limits.service import EmbeddedLimitsState, EmbeddedSpend, LimitsService, limits_state_path, snapshot_forever
from .pipeline import Pipeline, Stage
from .processor import serve_stream
from .stages import AccountingStage, AdmissionStage, LimitsStage, PiiStage, default_stages
from .stages.pii import hash_key_from_env, pii_wanted
from .store import Backend, RedisBackend, open_backend
from .transport.h2server import NativeServer
from .wire import external_processor_pb2_grpc as ep_grpc

log = logging.getLogger("extproc.server")


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await serve_stream(self.pipeline, context)


@dataclass
class Runtime:
    """What one server process runs, started; `close` stops it in reverse order of starting."""

    pipeline: Pipeline
    backend: Backend
    store: KeyStore
    sink: UsageSink
    ledger: Ledger
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    limits: LimitsService | None = None

    async def close(self) -> None:
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("shutdown step failed")


async def build_runtime(config: GatewayConfig, extra_stages: tuple[Stage, ...] = ()) -> Runtime:
    """Everything a server process needs, started: raises ConfigError on a bad setup (a missing
    provider key). An unreachable Redis is not a startup error: requests get 503 until it is back."""
    provider_auth = load_provider_auth(config)
    pii_hash_key = hash_key_from_env(config)  # a missing secret stops the start, like a provider key
    prices = PriceTable.from_config(config)
    # Loaded now (~0.8 s, ~44 MB) rather than at the first aborted stream: memory is what it will
    # be in production from the start, and no estimate waits for it.
    await asyncio.to_thread(tokenizer.warm_up)
    backend = open_backend(config)
    ledger = open_ledger(config)
    closers: list[Callable[[], Awaitable[None]]] = [backend.close, ledger.close]
    try:
        await ledger.check_schema()
    except LedgerSchemaError as err:
        await ledger.close()
        raise ConfigError(str(err)) from None
    except LedgerUnavailable as err:
        # Records wait in Redis (or the spool) until the database is back.
        log.warning("usage ledger unreachable at startup (%s); records will wait", err)
    store = open_store(backend)
    await store.start()
    closers.append(store.close)
    spool = Spool(config.spool_path, config.usage.spool_max_bytes)
    sink: UsageSink
    if isinstance(backend, RedisBackend):
        sink = RedisUsageSink(backend, spool)
        consumer = LedgerConsumer(backend, ledger)
        await consumer.start()
        closers.append(consumer.close)
    else:
        sink = EmbeddedUsageSink(backend, ledger, spool)
    await sink.start()
    # Closed before the consumer and the ledger: its last records still reach them.
    closers.append(sink.close)
    keys = KeyService(store, config)
    accounting = AccountingStage(prices, sink)
    limits, stop_limits = await start_limits(config, backend, sink, ledger)
    closers.extend(stop_limits)
    limits_stage = LimitsStage(limits, prices, config.limits.default_max_output_tokens)
    pii = PiiStage(config, pii_hash_key) if pii_wanted(config) else None
    stages = default_stages(config, keys, provider_auth, accounting, limits_stage, pii)
    admission = next(s for s in stages if isinstance(s, AdmissionStage))
    trimmer = asyncio.create_task(allocator.trim_after_large_bodies(admission.counters.take_peak))

    async def stop_trimmer() -> None:
        trimmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trimmer

    closers.append(stop_trimmer)
    return Runtime(Pipeline([*stages, *extra_stages]), backend, store, sink, ledger, closers, limits)


async def start_limits(
    config: GatewayConfig, backend: Backend, sink: UsageSink, ledger: Ledger
) -> tuple[LimitsService, list[Callable[[], Awaitable[None]]]]:
    """The process's limiter, started: shared in Redis (with the per-process fallback for outages),
    or in memory on the embedded backend (its counters snapshotted for `extproc limits show`).
    Returns it with what stops it, in the order to start them (close in reverse)."""
    cfg = config.limits
    alerts = AlertSender(config.alerts.webhook_url, timeout=config.alerts.webhook_timeout_seconds)
    if isinstance(backend, RedisBackend):
        service = LimitsService(
            RedisLimiter(backend, cfg.lease_seconds),
            fallback=FallbackLimiter(cfg.expected_replicas, cfg.lease_seconds),
            failure_mode=cfg.failure_mode,
            alerts=alerts,
            lease_seconds=cfg.lease_seconds,
            ping=backend.ping,
        )
        await service.start()
        return service, [service.close]
    assert isinstance(sink, EmbeddedUsageSink)
    state = EmbeddedLimitsState(limits_state_path(config))

    async def once(key: str) -> bool:
        return await asyncio.to_thread(state.mark_once, key)

    local = LocalLimiter(EmbeddedSpend(sink, ledger), lease_seconds=cfg.lease_seconds, once=once)
    service = LimitsService(local, alerts=alerts, lease_seconds=cfg.lease_seconds)
    await service.start()
    snapshots = asyncio.create_task(snapshot_forever(local, state))

    async def close_state() -> None:
        state.close()

    async def stop_snapshots() -> None:
        snapshots.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots
        await asyncio.to_thread(state.write_snapshot, local.snapshot())

    return service, [close_state, service.close, stop_snapshots]


class ExtProcServer(Protocol):
    async def start(self) -> None: ...
    async def stop(self, grace: float | None) -> Any: ...
    async def wait_for_termination(self) -> Any: ...


def create_server(config: GatewayConfig, pipeline: Pipeline, listen: str | None = None) -> tuple[ExtProcServer, int]:
    """Create (not start) the server; returns it with the bound port (0 for unix sockets)."""
    address = listen or config.server.listen
    if config.server.transport == "native":
        # Streams beyond max_concurrent_streams still open (the admission stage answers them with a
        # counted 503); twice that is refused at the HTTP/2 level.
        native = NativeServer(
            pipeline, address, config.server.max_message_bytes, 2 * config.server.max_concurrent_streams
        )
        return native, native.port
    limit = config.server.max_message_bytes
    streams = config.server.max_concurrent_streams
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Calls that arrived but that grpc.aio has not picked up yet wait in gRPC core, which
            # by default cancels them past 1,000 (at random) and 3,000 (all), silently: that was the
            # CANCELLED seen in bursts above ~1,200 requests. Size the queue to the admission limit,
            # so the admission stage is the one place that refuses, with a counted 503.
            ("grpc.server.max_pending_requests", streams),
            ("grpc.server.max_pending_requests_hard_limit", 2 * streams),
            # Envoy keeps one long-lived HTTP/2 connection per worker; allow its keepalive pings.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(  # type: ignore[no-untyped-call]
        ExternalProcessor(pipeline), server
    )
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot listen on {address}")
    return server, port


async def serve(config: GatewayConfig, listen: str | None = None, ready: asyncio.Event | None = None) -> None:
    runtime = await build_runtime(config)
    try:
        await _serve(config, runtime.pipeline, listen, ready)
    finally:
        await runtime.close()


async def _serve(config: GatewayConfig, pipeline: Pipeline, listen: str | None, ready: asyncio.Event | None) -> None:
    server, _ = create_server(config, pipeline, listen)
    await server.start()
    log.info("ext_proc server listening on %s", listen or config.server.listen)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        # Let in-flight streams (long SSE responses) finish; Kubernetes' grace period bounds this.
        log.info("shutting down; waiting up to 25s for open streams")
        await server.stop(grace=25)
    waiter.cancel()
    stopper.cancel()


def run(config: GatewayConfig, listen: str | None = None) -> None:
    # Before any thread exists (arena settings apply to threads created later).
    allocator.tune()
    # Only the import is guarded: an ImportError raised while serving must surface, not silently
    # start a second server under asyncio.
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, listen))
        return
    uvloop.run(serve(config, listen))
