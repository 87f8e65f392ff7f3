"""`extproc cache stats|clear`: what the response cache holds and what it saved, and emptying it.

Works on the store gateway.yaml names (Redis, or the embedded SQLite file) while servers run:
cleared entries are misses from the next request on."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

from .cache.store import TenantStats, open_cache_store
from .cli_config import load_or_exit
from .config import ConfigError, GatewayConfig
from .store import StoreUnavailable, open_backend


def _config(args: argparse.Namespace) -> GatewayConfig:
    return load_or_exit(args.config)


async def _with_store(config: GatewayConfig, op: Any) -> Any:
    backend = open_backend(config)
    store = open_cache_store(config, backend)
    try:
        return await op(store)
    finally:
        await store.close()
        await backend.close()


def cmd_stats(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        stats: dict[str, TenantStats] = asyncio.run(_with_store(config, lambda s: s.stats(args.tenant)))
    except (StoreUnavailable, ConfigError, OSError) as err:
        print(f"cache store unreachable: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({t: asdict(st) for t, st in stats.items()}, indent=2))
        return 0
    if not stats:
        print("no cache entries or figures" + (f" for tenant {args.tenant!r}" if args.tenant else ""))
        return 0
    print(f"{'tenant':20} {'entries':>8} {'bytes':>12} {'hits':>8} {'misses':>8} {'hit rate':>8} {'saved USD':>14}")
    for tenant, st in stats.items():
        looked = st.hits + st.misses
        rate = f"{st.hits / looked:.1%}" if looked else "-"
        print(f"{tenant:20} {st.entries:>8} {st.bytes:>12} {st.hits:>8} {st.misses:>8} {rate:>8} {st.saved_usd:>14}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        n = asyncio.run(_with_store(config, lambda s: s.clear(args.tenant, args.model)))
    except (StoreUnavailable, ConfigError, OSError) as err:
        print(f"cache store unreachable: {err}", file=sys.stderr)
        return 1
    scope = " ".join(
        x
        for x in (f"tenant {args.tenant!r}" if args.tenant else "", f"model {args.model!r}" if args.model else "")
        if x
    )
    print(f"removed {n} cache entries" + (f" ({scope})" if scope else ""))
    return 0


def add_parsers(sub: Any) -> None:
    cache = sub.add_parser("cache", help="the response cache").add_subparsers(dest="cache_command", required=True)
    p = cache.add_parser("stats", help="entries, bytes, hits, misses and saved USD per tenant")
    p.add_argument("--config", help="gateway.yaml path (default: $EXTPROC_CONFIG or gateway.yaml)")
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)
    p = cache.add_parser("clear", help="remove cached answers (all, a tenant's, a model's)")
    p.add_argument("--config", help="gateway.yaml path (default: $EXTPROC_CONFIG or gateway.yaml)")
    p.add_argument("--tenant")
    p.add_argument(
        "--model",
        help="the name entries are stored under: the upstream model (a model with targets: its public name)",
    )
    p.set_defaults(func=cmd_clear)
