"""`extproc db consume`: the ledger consumer as a process of its own.

On the Redis backend every server process runs a consumer by default. With `ledger.consumer: false`
in the servers' gateway.yaml they leave it to this command, run apart (a Deployment of its own, one
or more replicas: they share Redis' consumer group, so the work spreads and survives any of them).
The sidecars then hold no database connection and spend no CPU moving records, and the database
sees a few writers instead of one per pod. Records wait in Redis, durable, while no consumer runs.
With `--metrics-listen` it serves /metrics (the `gateway_ledger_*` figures, among them the backlog
to alert on), /healthz, /readyz and /status, like a server's ops port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any

from . import __version__
from .accounting.consumer import LedgerConsumer, export_consumer
from .cli_config import load_or_exit
from .config import ConfigError, GatewayConfig
from .ledger import Ledger, LedgerSchemaError, LedgerUnavailable, open_ledger
from .logsetup import configure_logging
from .observability.health import Health
from .observability.http import OpsServer, make_registry
from .observability.metrics import GatewayMetrics
from .store import RedisBackend, open_backend

log = logging.getLogger("extproc.accounting.consumer")


def cmd_db_consume(args: argparse.Namespace) -> int:
    """Exit codes as the other `db` commands: 1 the ledger's schema is wrong, 2 configuration."""
    config = load_or_exit(args.config)
    configure_logging(config.server.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.store.backend != "redis":
        print(
            "error: store.backend is embedded: its server writes each record straight into the ledger, "
            "there is nothing to consume",
            file=sys.stderr,
        )
        return 2
    try:
        backend = open_backend(config)
        ledger = open_ledger(config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    assert isinstance(backend, RedisBackend)
    return asyncio.run(consume(config, backend, ledger, args.metrics_listen))


async def consume(
    config: GatewayConfig,
    backend: RedisBackend,
    ledger: Ledger,
    metrics_listen: str | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Until SIGTERM or SIGINT (or `stop`); records not acknowledged by then stay pending in Redis
    for another consumer, as when a server stops."""
    ops: OpsServer | None = None
    health: Health | None = None
    try:
        try:
            await ledger.check_schema()
        except LedgerSchemaError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except LedgerUnavailable as err:
            log.warning("usage ledger unreachable at start (%s); records wait in Redis", err)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        consumer = LedgerConsumer(backend, ledger)
        if metrics_listen:
            health = Health(config, backend.ping)
            await health.start()
            metrics = GatewayMetrics()
            export_consumer(metrics, consumer)
            ops = OpsServer(metrics_listen, make_registry(metrics), health, _status(consumer, health, time.time()))
            try:
                await ops.start()
            except (OSError, ValueError) as err:
                print(f"error: --metrics-listen {metrics_listen}: cannot listen ({err})", file=sys.stderr)
                return 2
        await consumer.start()
        log.info("moving usage records from Redis (prefix %s) into the ledger %s", backend.prefix, ledger.target)
        try:
            await stop.wait()
        finally:
            await consumer.close()
        c = consumer.counters
        log.info(
            "stopped: %d records inserted (%d already in the ledger), %d acknowledged, %d set aside as dead letters",
            c.inserted,
            c.duplicates,
            c.acked,
            c.dead_lettered,
        )
        return 0
    finally:
        if ops is not None:
            await ops.close()
        if health is not None:
            await health.close()
        await backend.close()
        await ledger.close()


def _status(consumer: LedgerConsumer, health: Health, started: float) -> Any:
    def status() -> dict[str, Any]:
        c = consumer.counters
        return {
            "version": __version__,
            "role": "ledger consumer",
            "uptime_seconds": round(time.time() - started, 1),
            "store": "redis",
            "store_reachable": health.store_ok,
            "ready": health.ready,
            "reasons": health.reasons(),
            "records_inserted": c.inserted,
            "records_duplicate": c.duplicates,
            "records_dead_lettered": c.dead_lettered,
            "insert_failures": c.insert_failures,
            "backlog": c.backlog,
        }

    return status
