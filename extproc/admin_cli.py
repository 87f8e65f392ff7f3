"""`extproc keys …` and `extproc tenants …`: manage the store the servers read.

The CLI opens the same store gateway.yaml names (the SQLite file or Redis), so a change is seen by
running servers through the store's own change propagation, with no restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import StoreUnavailable, key_service
from .auth.keys import Tenant, VirtualKey, hash_key, new_secret, parse_duration
from .auth.service import AdminError, KeyService
from .config import ConfigError, GatewayConfig


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _key_view(k: VirtualKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "tenant": k.tenant,
        "prefix": k.prefix,
        "status": k.status(),
        "models": list(k.models) if k.models is not None else None,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "static": k.static,
    }


def _tenant_view(t: Tenant, static: bool) -> dict[str, Any]:
    return {"name": t.name, "models": list(t.models) if t.models is not None else None, "static": static}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _models(m: list[str] | None, inherited: str = "(all)") -> str:
    return inherited if m is None else ",".join(m)


def _print_keys(keys: list[VirtualKey], as_json: bool) -> None:
    views = [_key_view(k) for k in keys]
    if as_json:
        print(json.dumps(views, indent=2, ensure_ascii=False))
        return
    rows = [
        [
            v["id"],
            v["name"],
            v["tenant"],
            v["prefix"],
            v["status"],
            _models(v["models"], "(tenant's)"),
            _when(v["created_at"]),
            _when(v["expires_at"]),
        ]
        for v in views
    ]
    print(_table(rows, ["ID", "NAME", "TENANT", "KEY", "STATUS", "MODELS", "CREATED", "EXPIRES"]))


def _print_secret(secret: str, key: VirtualKey, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps({**_key_view(key), "secret": secret}, indent=2, ensure_ascii=False))
        return
    print(f"{verb} key {key.id} ({key.name}) for tenant {key.tenant}.")
    print("The secret is shown only this once; store it now:\n")
    print(f"  {secret}\n")


def run(config: GatewayConfig, args: argparse.Namespace) -> int:
    return run_with_service(config, lambda svc: args.admin(svc, args), "key store")


def run_with_service(
    config: GatewayConfig,
    op: Callable[[KeyService], Awaitable[None]],
    store: str,
    refusals: tuple[type[Exception], ...] = (AdminError,),
) -> int:
    """Run one command against the store; exit codes: 1 refused (`refusals`), 2 bad config, 3 the
    store (named `store` in the message) unreachable."""

    async def go() -> None:
        async with key_service(config) as svc:
            await op(svc)

    try:
        asyncio.run(go())
    except refusals as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except StoreUnavailable as err:
        print(f"error: {store} unavailable: {err}", file=sys.stderr)
        return 3
    return 0


def _models_arg(args: argparse.Namespace) -> tuple[str, ...] | None:
    return tuple(args.models) if args.models else None


async def keys_create(svc: KeyService, args: argparse.Namespace) -> None:
    ttl = None
    if args.expires:
        try:
            ttl = parse_duration(args.expires)
        except ValueError as err:
            raise AdminError(str(err)) from None
    secret, key = await svc.create_key(args.tenant, args.name, _models_arg(args), ttl)
    _print_secret(secret, key, args.json, "Created")


def keys_generate(args: argparse.Namespace) -> int:
    """A secret and its SHA-256 for `auth.static_keys` in gateway.yaml; nothing is stored."""
    secret = new_secret()
    digest = hash_key(secret)
    if args.json:
        print(json.dumps({"secret": secret, "sha256": digest}))
        return 0
    print("Secret (give it to the app; it is not stored anywhere):\n")
    print(f"  {secret}\n")
    print("For gateway.yaml, under auth.static_keys:\n")
    print(f'  - {{id: my-app, name: my-app, tenant: <tenant>, sha256: "{digest}"}}')
    return 0


async def keys_list(svc: KeyService, args: argparse.Namespace) -> None:
    _print_keys(await svc.list_keys(args.tenant), args.json)


async def keys_show(svc: KeyService, args: argparse.Namespace) -> None:
    key = await svc.get_key(args.id)
    view = _key_view(key)
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
        return
    for field in (
        "id",
        "name",
        "tenant",
        "prefix",
        "status",
        "models",
        "created_at",
        "expires_at",
        "revoked_at",
        "static",
    ):
        value = view[field]
        if field.endswith("_at"):
            value = _when(value)
        elif field == "models":
            value = _models(value, "(tenant's)")
        print(f"{field:11} {value}")


async def keys_rotate(svc: KeyService, args: argparse.Namespace) -> None:
    secret, key = await svc.rotate_key(args.id)
    _print_secret(secret, key, args.json, "Rotated")


async def keys_revoke(svc: KeyService, args: argparse.Namespace) -> None:
    key = await svc.revoke_key(args.id)
    if args.json:
        print(json.dumps(_key_view(key), indent=2, ensure_ascii=False))
    else:
        print(f"Revoked key {key.id} ({key.name}); it stops working within a second on every server.")


async def tenants_create(svc: KeyService, args: argparse.Namespace) -> None:
    tenant = await svc.create_tenant(args.name, _models_arg(args))
    _print_tenants([(tenant, False)], args.json)


async def tenants_update(svc: KeyService, args: argparse.Namespace) -> None:
    models = None if args.all_models else _models_arg(args)
    if models is None and not args.all_models:
        raise AdminError("nothing to change: give --models … or --all-models")
    tenant = await svc.update_tenant(args.name, models)
    _print_tenants([(tenant, False)], args.json)


async def tenants_list(svc: KeyService, args: argparse.Namespace) -> None:
    _print_tenants(await svc.list_tenants(), args.json)


def _print_tenants(tenants: list[tuple[Tenant, bool]], as_json: bool) -> None:
    views = [_tenant_view(t, static) for t, static in tenants]
    if as_json:
        print(json.dumps(views, indent=2, ensure_ascii=False))
        return
    rows = [[v["name"], _models(v["models"]), "gateway.yaml" if v["static"] else "store"] for v in views]
    print(_table(rows, ["TENANT", "MODELS", "DEFINED IN"]))


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = sub.add_parser("keys", help="manage virtual keys").add_subparsers(dest="keys_command", required=True)

    p = keys.add_parser("create", help="create a key (the secret is printed once)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--models", nargs="+", metavar="MODEL", help="allowed models or globs (default: the tenant's)")
    p.add_argument("--expires", metavar="DURATION", help="e.g. 90s, 12h, 30d, 2w (default: never)")
    p.set_defaults(admin=keys_create)
    p = keys.add_parser("generate", help="print a new secret and its sha256 for a static key (stores nothing)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=keys_generate)
    p = keys.add_parser("list", help="list keys")
    p.add_argument("--tenant")
    p.set_defaults(admin=keys_list)
    for name, func, help_ in (
        ("show", keys_show, "show one key"),
        ("rotate", keys_rotate, "new secret; the old one stops working at once"),
        ("revoke", keys_revoke, "revoke a key"),
    ):
        p = keys.add_parser(name, help=help_)
        p.add_argument("id")
        p.set_defaults(admin=func)
    for name, p in keys.choices.items():
        if name != "generate":
            common(p)

    tenants = sub.add_parser("tenants", help="manage tenants (defaults keys inherit)").add_subparsers(
        dest="tenants_command", required=True
    )
    p = tenants.add_parser("create", help="create a tenant")
    p.add_argument("name")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="models its keys may use (default: all)")
    p.set_defaults(admin=tenants_create)
    p = tenants.add_parser("update", help="change a tenant's defaults")
    p.add_argument("name")
    p.add_argument("--models", nargs="+", metavar="MODEL")
    p.add_argument("--all-models", action="store_true", help="lift the model restriction")
    p.set_defaults(admin=tenants_update)
    p = tenants.add_parser("list", help="list tenants")
    p.set_defaults(admin=tenants_list)
    for p in tenants.choices.values():
        common(p)
