"""`extproc limits set|show|reset`: limits on tenants and keys, and where they stand.

Limits are stored on the tenant or key record, so running servers pick a change up through the key
store's own change propagation (pub/sub on Redis, `data_version` polling on the embedded store),
within a second, without a restart. Input is validated with the same model as gateway.yaml before
anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .accounting.sink import cost_pusd
from .admin_cli import run_with_service
from .auth.service import AdminError, KeyService
from .config import GatewayConfig
from .ledger import Ledger, LedgerUnavailable, open_ledger
from .limits.alerts import usd
from .limits.engine import CheckStatus, plan
from .limits.local import LocalLimiter
from .limits.redis import RedisLimiter
from .limits.service import EmbeddedLimitsState, limits_state_path
from .limits.spec import EPOCH_FIELD, LimitsError, LimitSpec, Rule, parse_limits, rules_of
from .store import RedisBackend, open_backend

# CLI flag -> field of LimitSpec (and of a per-model entry for the first three).
FLAGS: dict[str, str] = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "concurrency": "concurrent_requests",
    "budget_usd": "budget_usd",
    "budget_tokens": "budget_tokens",
    "period": "period",
    "alert_at": "alert_at",
}
_RATE_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
_CLEARABLE = ("rpm", "tpm", "concurrency", "budget-usd", "budget-tokens", "period", "alert-at", "all")


def run(config: GatewayConfig, args: argparse.Namespace) -> int:
    return run_with_service(config, lambda svc: args.limits_op(svc, config, args), "store", (AdminError, LimitsError))


async def _current(svc: KeyService, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(tenant name, the policy holding the limits) of the tenant or key the command is about."""
    if args.tenant:
        tenant = await svc.tenant(args.tenant)
        if tenant is None:
            raise AdminError(f"unknown tenant {args.tenant!r}")
        return tenant.name, tenant.policy
    key = await svc.get_key(args.key)
    return key.tenant, key.policy


def apply_changes(current: Mapping[str, Any], args: argparse.Namespace) -> LimitSpec:
    """The stored limits with this command's changes, validated (nothing is written on an error)."""
    data: dict[str, Any] = json.loads(json.dumps(dict(current)))  # a deep copy
    model = args.model
    target = data.setdefault("models", {}).setdefault(model, {}) if model else data
    for flag, name in FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if model and name not in _RATE_FIELDS:
            raise AdminError(f"--{flag.replace('_', '-')} cannot be set per model (only --rpm, --tpm, --concurrency)")
        target[name] = list(value) if name == "alert_at" else value
    for flag in args.clear or ():
        if flag == "all":
            target.clear()
            continue
        name = FLAGS[flag.replace("-", "_")]
        target.pop(name, None)
    if model and not target:
        data["models"].pop(model, None)
    if not data.get("models"):
        data.pop("models", None)
    return parse_limits(data, "limits")


async def limits_set(svc: KeyService, config: GatewayConfig, args: argparse.Namespace) -> None:
    if not any(getattr(args, f, None) is not None for f in FLAGS) and not args.clear:
        raise AdminError("nothing to change: give a limit (--rpm, --tpm, ...) or --clear FIELD")
    _, policy = await _current(svc, args)
    spec = apply_changes(policy.get("limits") or {}, args)
    if args.tenant:
        await svc.set_tenant_limits(args.tenant, spec)
        who = f"tenant {args.tenant}"
    else:
        await svc.set_key_limits(args.key, spec)
        who = f"key {args.key}"
    if args.json:
        print(json.dumps({"scope": who, "limits": spec.to_dict()}, indent=2))
    else:
        shown = json.dumps(spec.to_dict()) if not spec.empty else "(none)"
        print(f"Limits of {who}: {shown}\nRunning servers apply them within a second.")


async def limits_reset(svc: KeyService, config: GatewayConfig, args: argparse.Namespace) -> None:
    if args.tenant:
        tenant = await svc.reset_tenant_limits(args.tenant)
        who, epoch = f"tenant {args.tenant}", tenant.policy[EPOCH_FIELD]
    else:
        key = await svc.reset_key_limits(args.key)
        who, epoch = f"key {args.key}", key.policy[EPOCH_FIELD]
    if args.json:
        print(json.dumps({"scope": who, "epoch": epoch}))
    else:
        print(f"Reset the rate and concurrency counters of {who} (budgets keep their spend).")


def _rules(tenant: str, policy: Mapping[str, Any], args: argparse.Namespace) -> tuple[Rule, ...]:
    spec = parse_limits(policy.get("limits"), "limits")
    epoch = int(policy.get(EPOCH_FIELD) or 0)
    if args.tenant:
        return rules_of(spec, tenant, "tenant", "", epoch)
    return rules_of(spec, tenant, "key", args.key, epoch)


class LedgerSpend:
    """Budget spend read from the durable ledger (the CLI has no server's in-memory aggregates)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def __call__(self, rule: Rule, field: str, days: list[str]) -> int:
        since = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
        row = await self.ledger.totals(since, tenant=rule.tenant, key_id=rule.owner if rule.kind == "key" else None)
        if field == "cost_pusd":
            return cost_pusd(str(row.cost_usd)) or 0
        return int(row.total_tokens)


async def _status(config: GatewayConfig, tenant: str, rules: tuple[Rule, ...]) -> list[CheckStatus]:
    checks = plan(rules, 0, 0)
    backend = open_backend(config)
    try:
        if isinstance(backend, RedisBackend):
            return await RedisLimiter(backend, config.limits.lease_seconds).status(tenant, checks)
        state = EmbeddedLimitsState(limits_state_path(config))
        ledger = open_ledger(config)
        try:
            local = LocalLimiter(LedgerSpend(ledger), lease_seconds=config.limits.lease_seconds)
            local.load(await asyncio.to_thread(state.read_snapshot))
            return await local.status(tenant, checks)
        except LedgerUnavailable as err:
            raise AdminError(f"usage ledger unreachable: {err}") from None
        finally:
            await ledger.close()
            state.close()
    finally:
        await backend.close()


def _figure(what: str, value: int) -> str | int:
    """Money as an exact decimal string, counts as numbers."""
    return usd(value) if what == "budget_usd" else value


def _reset_text(s: CheckStatus) -> str:
    if s.check.kind == "concurrency":
        return "-"
    if s.check.kind == "budget":
        ends = datetime.now(UTC) + timedelta(seconds=s.reset)
        return f"{ends:%Y-%m-%d}"
    return f"{s.reset:.1f}s"


def status_views(statuses: list[CheckStatus]) -> list[dict[str, Any]]:
    out = []
    for s in statuses:
        c = s.check
        money = c.what == "budget_usd"
        out.append(
            {
                "limit": {
                    "requests": "requests_per_minute",
                    "tokens": "tokens_per_minute",
                    "concurrency": "concurrent_requests",
                }.get(c.what, c.what),
                "models": c.rule.models or None,
                "period": c.rule.period if c.kind == "budget" else None,
                "value": usd(c.limit) if money else c.limit,
                "used": _figure(c.what, s.used),
                "remaining": _figure(c.what, s.remaining),
                "reset_seconds": round(s.reset, 3),
            }
        )
    return out


async def limits_show(svc: KeyService, config: GatewayConfig, args: argparse.Namespace) -> None:
    tenant, policy = await _current(svc, args)
    rules = _rules(tenant, policy, args)
    statuses = await _status(config, tenant, rules) if rules else []
    views = status_views(statuses)
    who = f"tenant {args.tenant}" if args.tenant else f"key {args.key} (tenant {tenant})"
    if args.json:
        print(json.dumps({"scope": who, "limits": (policy.get("limits") or {}), "status": views}, indent=2))
        return
    if not views:
        print(f"{who}: no limits")
        return
    print(who)
    header = ["LIMIT", "MODELS", "VALUE", "USED", "REMAINING", "RESETS"]
    rows = [
        [
            v["limit"] + (f" ({v['period']})" if v["period"] else ""),
            v["models"] or "-",
            str(v["value"]),
            str(v["used"]),
            str(v["remaining"]),
            _reset_text(s),
        ]
        for v, s in zip(views, statuses, strict=True)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_parsers(sub: Any, common: Any) -> None:
    limits = sub.add_parser("limits", help="rate limits, concurrency and budgets of tenants and keys")
    ops = limits.add_subparsers(dest="limits_command", required=True)

    def scope(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--tenant", metavar="T")
        group.add_argument("--key", metavar="KEY_ID")
        common(p)

    p = ops.add_parser("set", help="set (or --clear) limits of a tenant or a key")
    scope(p)
    p.add_argument("--rpm", type=_positive_int, help="requests per minute")
    p.add_argument("--tpm", type=_positive_int, help="input + output tokens per minute")
    p.add_argument("--concurrency", type=_positive_int, help="requests in flight at once")
    p.add_argument("--budget-usd", metavar="X", help='spend per period, e.g. "250.00"')
    p.add_argument("--budget-tokens", type=_positive_int, metavar="N", help="tokens per period")
    p.add_argument("--period", choices=("day", "week", "month"), help="budget period (UTC calendar; default month)")
    p.add_argument("--alert-at", type=_fraction, nargs="+", metavar="F", help="alert thresholds (default 0.8 1.0)")
    p.add_argument("--model", metavar="GLOB", help="set --rpm/--tpm/--concurrency for the models matching GLOB")
    p.add_argument("--clear", nargs="+", choices=_CLEARABLE, metavar="FIELD", help=f"remove: {', '.join(_CLEARABLE)}")
    p.set_defaults(limits_op=limits_set)
    p = ops.add_parser("show", help="limits, current usage, remaining and reset time")
    scope(p)
    p.set_defaults(limits_op=limits_show)
    p = ops.add_parser("reset", help="start the rate and concurrency counters over (not budgets' spend)")
    scope(p)
    p.set_defaults(limits_op=limits_reset)
