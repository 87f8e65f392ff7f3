"""The grpc.aio ext_proc server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import __version__, allocator
from .accounting import tokenizer
from .accounting.consumer import LedgerConsumer, export_consumer
from .accounting.pricing import PriceTable
from .accounting.sink import EmbeddedUsageSink, RedisUsageSink, UsageSink
from .accounting.spool import Spool
from .auth import KeyStore, open_store
from .auth.credentials import load_provider_auth
from .auth.service import KeyService
from .cache.store import open_cache_store
from .config import ConfigError, GatewayConfig
from .ledger import Ledger, LedgerSchemaError, LedgerUnavailable, open_ledger
from .limits.alerts import AlertSender
from .limits.local import FallbackLimiter, LocalLimiter
from .limits.redis import RedisLimiter
from .limits.service import EmbeddedLimitsState, EmbeddedSpend, LimitsService, limits_state_path, snapshot_forever
from .observability.health import Health
from .observability.http import OpsServer, make_registry
from .observability.metrics import GatewayMetrics
from .observability.tracing import Tracing, start_tracing
from .pipeline import Pipeline, Stage
from .processor import serve_stream
from .stages import (
    AccountingStage,
    AdmissionStage,
    CacheStage,
    ContentCaptureStage,
    LimitsStage,
    ObservabilityStage,
    PiiStage,
    attempt_stage,
    default_stages,
)
from .stages.pii import PiiCounters, hash_key_from_env, pii_wanted
from .store import Backend, RedisBackend, open_backend
from .transport.h2server import NativeServer
from .wire import external_processor_pb2_grpc as ep_grpc

log = logging.getLogger("extproc.server")


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.open = 0

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.open += 1
        try:
            await serve_stream(self.pipeline, context)
        finally:
            self.open -= 1


# Service names the health check answers for ("" is the server as a whole).
HEALTH_SERVICES = frozenset({"", "envoy.service.ext_proc.v3.ExternalProcessor"})


def health_status(health: Health | None) -> Callable[[str], int | None]:
    """grpc.health.v1 status by service name (None: unknown service), from the readiness."""

    def status(service: str) -> int | None:
        if service not in HEALTH_SERVICES:
            return None
        ready = health is None or health.ready
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    return status


class GrpcHealth(health_pb2_grpc.HealthServicer):
    """The health service on the grpc.aio transport (the native one answers Check itself)."""

    def __init__(self, status: Callable[[str], int | None]) -> None:
        self.status = status

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)


@dataclass
class Runtime:
    """What one server process runs, started; `close` stops it in reverse order of starting."""

    pipeline: Pipeline
    backend: Backend
    store: KeyStore
    sink: UsageSink
    # None on the Redis backend with ledger.consumer false.
    ledger: Ledger | None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    limits: LimitsService | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    health: Health | None = None
    admission: AdmissionStage | None = None
    tracing: Tracing | None = None
    started: float = 0.0

    async def close(self) -> None:
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("shutdown step failed")


def cache_stage(config: GatewayConfig, backend: Backend) -> CacheStage | None:
    """None when no tenant or model turns the cache on."""
    specs = [config.cache, *(t.cache for t in config.tenants.values()), *(m.cache for m in config.models)]
    if not any(s is not None and s.mode not in (None, "off") for s in specs):
        return None
    return CacheStage(config, open_cache_store(config, backend))


async def build_runtime(config: GatewayConfig, extra_stages: tuple[Stage, ...] = (), metrics: bool = True) -> Runtime:
    """Everything a server process needs, started: raises ConfigError on a bad setup (a missing
    provider key). An unreachable Redis is not a startup error: requests get 503 until it is back."""
    provider_auth = load_provider_auth(config)
    pii_hash_key = hash_key_from_env(config)  # a missing secret stops the start, like a provider key
    prices = PriceTable.from_config(config)
    # Loaded now (~0.8 s, ~44 MB) rather than at the first aborted stream: memory is what it will
    # be in production from the start, and no estimate waits for it.
    await asyncio.to_thread(tokenizer.warm_up)
    backend = open_backend(config)
    on_redis = isinstance(backend, RedisBackend)
    # On Redis with `ledger.consumer: false` this process never touches the ledger (`extproc db
    # consume` moves the records): no database connection, nor its URL, per server.
    ledger = open_ledger(config) if not on_redis or config.ledger.consumer else None
    closers: list[Callable[[], Awaitable[None]]] = [backend.close]
    if ledger is not None:
        closers.append(ledger.close)
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
    consumer: LedgerConsumer | None = None
    if isinstance(backend, RedisBackend):
        sink = RedisUsageSink(backend, spool)
        if ledger is not None:
            consumer = LedgerConsumer(backend, ledger)
            await consumer.start()
            closers.append(consumer.close)
    else:
        assert ledger is not None
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
    gateway_metrics = GatewayMetrics(config.metrics.max_series)
    tracing = start_tracing(config.tracing, __version__)
    if tracing is not None:
        closers.append(lambda: asyncio.to_thread(tracing.shutdown))
    # Nothing would read what it records with neither a metrics port nor traces.
    observability = (
        ObservabilityStage(gateway_metrics, tracing, config.metrics.tenant_labels)
        if metrics or tracing is not None
        else None
    )
    capture = (
        ContentCaptureStage(pii.scrub if pii is not None else None)
        if tracing is not None and config.tracing.capture_content
        else None
    )
    cache = cache_stage(config, backend)
    if cache is not None:
        closers.append(cache.close)
    stages = default_stages(config, keys, provider_auth, accounting, limits_stage, pii, observability, capture, cache)
    admission = next(s for s in stages if isinstance(s, AdmissionStage))
    health = Health(config, backend.ping if isinstance(backend, RedisBackend) else None)
    await health.start()
    closers.append(health.close)
    export_counters(gateway_metrics, sink, accounting, pii, backend, ledger, admission)
    export_limits(gateway_metrics, limits)
    if consumer is not None:
        export_consumer(gateway_metrics, consumer)
    trimmer = asyncio.create_task(allocator.trim_after_peaks(admission.counters.take_peak))

    async def stop_trimmer() -> None:
        trimmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trimmer

    closers.append(stop_trimmer)
    return Runtime(
        Pipeline([*stages, *extra_stages], attempt_stage(config, provider_auth)),
        backend,
        store,
        sink,
        ledger,
        closers,
        limits,
        metrics=gateway_metrics,
        health=health,
        admission=admission,
        tracing=tracing,
        started=time.time(),
    )


def export_limits(metrics: GatewayMetrics, limits: LimitsService) -> None:
    """The limiter's own figures: outages, decisions taken without Redis, settlements retried or
    lost, budget alerts (read when scraped)."""
    lc, alerts = limits.counters, limits.alerts.counters
    metrics.counter_source(
        "gateway_limits_fallback_decisions",
        "Requests decided by the per-process fallback limiter while Redis was unreachable (failure mode open).",
        lambda: lc.fallback_decisions,
    )
    metrics.counter_source("gateway_limits_outages", "Times the limits store became unreachable.", lambda: lc.outages)
    metrics.counter_source(
        "gateway_limits_settle_problems",
        "Settlements retried later (store unreachable) or lost (their leases expire instead).",
        lambda: {("retried",): lc.settle_retries, ("failed",): lc.settle_failures + limits.primary.deferred_dropped},
        ("result",),
    )
    metrics.counter_source(
        "gateway_budget_alerts",
        "Budget alerts, by what became of them.",
        lambda: {
            ("sent",): alerts.sent,
            ("delivered",): alerts.webhook_delivered,
            ("failed",): alerts.webhook_failed,
            ("dropped",): alerts.webhook_dropped,
        },
        ("result",),
    )


def export_counters(
    metrics: GatewayMetrics,
    sink: UsageSink,
    accounting: AccountingStage,
    pii: PiiStage | None,
    backend: Backend,
    ledger: Ledger | None,
    admission: AdmissionStage,
) -> None:
    """Figures other parts already keep, read when scraped (nothing added per request)."""
    sc, ac, adm = sink.counters, accounting.counters, admission.counters
    metrics.gauge(
        "gateway_usage_spool_bytes",
        "Usage records waiting in the local spool, in bytes.",
        lambda: sink.spool.size_bytes,
    )
    metrics.counter_source("gateway_usage_records", "Usage records produced.", lambda: sc.recorded)
    metrics.counter_source("gateway_usage_records_spooled", "Usage records written to the spool.", lambda: sc.spooled)
    metrics.counter_source("gateway_usage_records_replayed", "Spooled usage records replayed.", lambda: sc.replayed)
    metrics.counter_source(
        "gateway_usage_records_failed", "Usage records neither stored nor spooled.", lambda: sc.failed
    )
    metrics.counter_source(
        "gateway_usage_records_estimated", "Usage records with estimated tokens.", lambda: ac.estimated
    )
    metrics.counter_source("gateway_usage_unpriced", "Usage records of models without a price.", lambda: ac.unpriced)
    metrics.counter_source(
        "gateway_redis_errors", "Redis calls that failed.", lambda: float(getattr(backend, "errors", 0))
    )
    metrics.counter_source(
        "gateway_db_errors", "Usage ledger calls that failed.", lambda: ledger.errors if ledger is not None else 0
    )
    metrics.gauge("gateway_requests_in_flight", "Exchanges this process is handling.", lambda: adm.streams)
    metrics.gauge("gateway_request_body_bytes_in_flight", "Request body bytes held.", lambda: adm.body_bytes)
    metrics.counter_source(
        "gateway_overload_refusals",
        "Requests refused with 503 gateway_overloaded, by limit.",
        lambda: {("streams",): adm.refused_streams, ("body_bytes",): adm.refused_bytes},
        ("limit",),
    )
    metrics.gauge("gateway_build_info", "The server's version.", lambda: {(__version__,): 1.0}, ("version",))
    # Declared whether or not PII redaction is configured (zero then): dashboards and alerts find them.
    pc = pii.counters if pii is not None else PiiCounters()

    def redactions() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {(k, "request"): v for k, v in pc.redacted.items()}
        out.update({(k, "response"): v for k, v in pc.masked_in_responses.items()})
        return out

    metrics.counter_source(
        "gateway_pii_redactions", "Entities redacted, by type and direction.", redactions, ("entity_type", "direction")
    )
    metrics.counter_source("gateway_pii_blocked", "Requests refused for the data they held.", lambda: pc.blocked)
    metrics.counter_source("gateway_pii_failures", "Scans that failed.", lambda: pc.failures)
    metrics.counter_source(
        "gateway_pii_forwarded_unscanned",
        "Requests forwarded unscanned after a failure (on_error: allow).",
        lambda: pc.forwarded_unscanned,
    )


async def start_limits(
    config: GatewayConfig, backend: Backend, sink: UsageSink, ledger: Ledger | None
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
    assert isinstance(sink, EmbeddedUsageSink) and ledger is not None
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


def create_server(
    config: GatewayConfig,
    pipeline: Pipeline,
    listen: str | None = None,
    health: Health | None = None,
    reuse_port: bool = False,
) -> tuple[ExtProcServer, int]:
    """Create (not start) the server; returns it with the bound port (0 for unix sockets).
    `reuse_port`: other worker processes listen on the same address (extproc.workers)."""
    address = listen or config.server.listen
    if config.server.transport == "native":
        # Streams beyond max_concurrent_streams still open (the admission stage answers them with a
        # counted 503); twice that is refused at the HTTP/2 level.
        native = NativeServer(
            pipeline,
            address,
            config.server.max_message_bytes,
            2 * config.server.max_concurrent_streams,
            health_status(health),
            reuse_port,
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
            # gRPC core sets SO_REUSEPORT unless told not to: a second server on the same port
            # must fail to start, unless it is a worker meant to share it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    processor = ExternalProcessor(pipeline)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(GrpcHealth(health_status(health)), server)
    server.open_streams = lambda: processor.open  # type: ignore[attr-defined]
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot listen on {address}")
    return server, port


Announce = Callable[[dict[str, Any]], None]


async def serve(
    config: GatewayConfig,
    listen: str | None = None,
    ready: asyncio.Event | None = None,
    metrics_listen: str | None = None,
    reuse_port: bool = False,
    announce: Announce | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. `announce` (a worker's, see extproc.workers) is told the ops
    port once the server takes streams."""
    ops = config.server.ops_address(metrics_listen)  # none: no metrics recorded either
    runtime = await build_runtime(config, metrics=ops is not None)
    # What is built so far lives as long as the process (config, tokenizer, detectors, clients):
    # frozen, a full collection no longer walks it. Measured at 16 connections: a full collection
    # took ~50 ms (every request in flight stalled), twice in 15 s; ~2 ms once frozen.
    gc.collect()
    gc.freeze()
    try:
        await _serve(config, runtime, listen, ready, ops, reuse_port, announce)
    finally:
        await runtime.close()


def status_of(runtime: Runtime, server: ExtProcServer, transport: str) -> Callable[[], dict[str, Any]]:
    """What `extproc status` shows of this process."""

    def status() -> dict[str, Any]:
        health = runtime.health
        adm = runtime.admission
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - runtime.started, 1),
            "transport": transport,
            "store": runtime.backend.kind,
            "store_reachable": health.store_ok if health is not None else True,
            "ready": health.ready if health is not None else True,
            "reasons": health.reasons() if health is not None else [],
            "in_flight": adm.counters.streams if adm is not None else 0,
            "open_streams": _open_streams(server),
            "spool_bytes": runtime.sink.spool.size_bytes,
            "records_replayed": runtime.sink.counters.replayed,
            "tracing": runtime.tracing is not None,
            "gc_frozen_objects": gc.get_freeze_count(),
        }

    return status


def _open_streams(server: ExtProcServer) -> int:
    count = getattr(server, "open_streams", None)
    return int(count()) if callable(count) else 0


async def _serve(
    config: GatewayConfig,
    runtime: Runtime,
    listen: str | None,
    ready: asyncio.Event | None,
    metrics_listen: str | None,
    reuse_port: bool = False,
    announce: Announce | None = None,
) -> None:
    server, _ = create_server(config, runtime.pipeline, listen, runtime.health, reuse_port)
    ops: OpsServer | None = None
    if metrics_listen:
        runtime.metrics.gauge(
            "gateway_open_streams", "ext_proc streams open with Envoy.", lambda: _open_streams(server)
        )
        assert runtime.health is not None
        # Workers sharing one address: the supervisor evens out Envoy's connections among them.
        balance = None
        if announce is not None and reuse_port and isinstance(server, NativeServer):
            balance = (server.balance, server.shed)
        ops = OpsServer(
            metrics_listen,
            make_registry(runtime.metrics),
            runtime.health,
            status_of(runtime, server, config.server.transport),
            balance,
        )
        try:
            await ops.start()
        except (OSError, ValueError) as err:
            # A port in use or a bad host: say which setting, like any other config mistake.
            raise ConfigError(f"server.metrics_listen {metrics_listen}: cannot listen ({err})") from None

    def started() -> None:
        if ready is not None:
            ready.set()
        if announce is not None:
            announce({"pid": os.getpid(), "ops_port": ops.port if ops is not None else None})

    try:
        await _run_server(config, server, listen, started, runtime.health)
    finally:
        if ops is not None:
            await ops.close()


async def _run_server(
    config: GatewayConfig,
    server: ExtProcServer,
    listen: str | None,
    started: Callable[[], None],
    health: Health | None,
) -> None:
    await server.start()
    log.info("ext_proc server listening on %s", listen or config.server.listen)
    started()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        if health is not None:
            health.stopping = True  # readiness and the gRPC health check say so while draining
        # Let in-flight streams (long SSE responses) finish; Kubernetes' grace period bounds this.
        log.info("shutting down; waiting up to 25s for open streams")
        await server.stop(grace=25)
    waiter.cancel()
    stopper.cancel()


def run(
    config: GatewayConfig,
    listen: str | None = None,
    metrics_listen: str | None = None,
    reuse_port: bool = False,
    announce: Announce | None = None,
) -> None:
    """One server process (a worker of extproc.workers when `announce` is given)."""
    # Before any thread exists (arena settings apply to threads created later).
    allocator.tune()
    main = serve(config, listen, metrics_listen=metrics_listen, reuse_port=reuse_port, announce=announce)
    # Only the import is guarded: an ImportError raised while serving must surface, not silently
    # start a second server under asyncio.
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
