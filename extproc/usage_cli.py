"""`extproc db …` and `extproc usage …`: the ledger from the command line.

They open the ledger gateway.yaml names (PostgreSQL via its URL env var, or the SQLite file), so
what they show is what the consumer has written, from any host that can reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import shutil
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .accounting.record import TOKEN_FIELDS, UsageRecord, format_ts, parse_ts
from .auth.keys import parse_duration
from .cli_config import load_or_exit
from .config import ConfigError
from .ledger import GROUP_BY, Ledger, LedgerSchemaError, LedgerUnavailable, ReportRow, open_ledger
from .ledger.base import Filters, total_of

Op = Callable[[Ledger, argparse.Namespace], Awaitable[None]]

_SINCE_HELP = "30m, 24h, 7d, 2w, an ISO time (2025-01-31T12:00Z), or 'all'"
_TOKEN_HEADERS = ("INPUT", "CACHED", "CACHE_WRITE", "OUTPUT", "REASONING", "TOTAL")


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """A duration back from now, or an absolute time (naive = UTC); 'all' means no bound."""
    text = text.strip()
    if text.lower() == "all":
        return None
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        return parse_ts(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad time {text!r}: use {_SINCE_HELP}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _run(args: argparse.Namespace, op: Op, *, check_schema: bool = True) -> int:
    """Open the ledger, run one operation, close it; errors become a line on stderr and an exit
    code (1: refused, 2: config, 3: ledger unreachable), as in `extproc keys`."""
    try:
        ledger = open_ledger(load_or_exit(args.config))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    async def main() -> None:
        try:
            if check_schema:
                await ledger.check_schema()
            await op(ledger, args)
        finally:
            await ledger.close()

    try:
        asyncio.run(main())
    except LedgerSchemaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except LedgerUnavailable as err:
        print(f"error: ledger unavailable: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 0
    return 0


def _table(rows: list[list[str]], header: list[str], right: frozenset[int] = frozenset()) -> str:
    """Columns in `right` (numbers) are right-aligned so digits line up."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _cost(record: UsageRecord) -> str:
    if record.cost_usd is None:
        return "-"
    return ("~" if record.estimated else "") + record.cost_usd


def _name(group: str) -> str:
    return group or "(none)"


# --- db migrate ---


async def _migrate(ledger: Ledger, args: argparse.Namespace) -> None:
    applied = await ledger.migrate()
    version = await ledger.schema_version()
    if applied:
        print(f"ledger {ledger.target}: applied {', '.join(map(str, applied))}; schema at version {version}")
    else:
        print(f"ledger {ledger.target}: up to date (schema version {version})")


def cmd_db_migrate(args: argparse.Namespace) -> int:
    return _run(args, _migrate, check_schema=False)


def _db_consume(args: argparse.Namespace) -> int:
    from .consume_cli import cmd_db_consume  # redis and the consumer only for this command

    return cmd_db_consume(args)


# --- usage list ---


async def _list(ledger: Ledger, args: argparse.Namespace) -> None:
    records = await ledger.list(args.since, args.tenant, args.key, args.model, args.limit)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, ensure_ascii=False))
        return
    rows = [
        [
            format_ts(r.ts),
            r.request_id,
            _name(r.tenant),
            _name(r.key_id),
            r.model,
            r.provider,
            str(r.status),
            str(r.input_tokens),
            str(r.output_tokens),
            _cost(r),
            f"{r.latency_ms:.0f}",
        ]
        for r in records
    ]
    header = ["TIME", "REQUEST", "TENANT", "KEY", "MODEL", "PROVIDER", "STATUS", "IN", "OUT", "COST_USD", "MS"]
    print(_table(rows, header, frozenset({6, 7, 8, 9, 10})))
    if any(r.cost_usd is None for r in records) or any(r.estimated for r in records):
        print("\n-: no price for the model   ~: tokens estimated (the provider reported no usage)")


def cmd_usage_list(args: argparse.Namespace) -> int:
    return _run(args, _list)


# --- usage report ---


def _report_csv(rows: list[ReportRow], total: ReportRow) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = list(total.to_dict())
    writer.writerow(names)
    for row in [*rows, total]:
        d = row.to_dict()
        writer.writerow([d[n] for n in names])
    return out.getvalue()


def _report_table(rows: list[ReportRow], total: ReportRow, by: str) -> str:
    def cells(r: ReportRow, group: str) -> list[str]:
        return [
            group,
            str(r.requests),
            str(r.unpriced_requests),
            *(str(getattr(r, t)) for t in TOKEN_FIELDS),
            r.to_dict()["cost_usd"],
        ]

    header = [by.upper(), "REQUESTS", "UNPRICED", *_TOKEN_HEADERS, "COST_USD"]
    body = [cells(r, _name(r.group)) for r in rows] + [cells(total, "TOTAL")]
    text = _table(body, header, frozenset(range(1, len(header))))
    lines = text.splitlines()
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([*lines[:-1], rule, lines[-1]])


CHART_GROUPS = 20


def _chart_rows(rows: list[ReportRow], by: str) -> list[ReportRow]:
    """At most CHART_GROUPS bars, top to bottom: the latest days in calendar order, or the
    costliest groups; the rest folded into one bar so the chart fits a terminal."""
    if by == "day":
        ordered = sorted(rows, key=lambda r: r.group)
        shown, rest, label = ordered[-(CHART_GROUPS - 1) :], ordered[: -(CHART_GROUPS - 1)], "earlier"
    else:
        ordered = sorted(rows, key=lambda r: (-r.cost_usd, r.group))
        shown, rest, label = ordered[: CHART_GROUPS - 1], ordered[CHART_GROUPS - 1 :], "others"
    if len(rest) > 1:
        folded = total_of(rest, f"({len(rest)} {label})")
        return [folded, *shown] if by == "day" else [*shown, folded]
    return ordered


def render_chart(rows: list[ReportRow], by: str, title: str, width: int | None = None, color: bool = False) -> str:
    """Cost per group as a horizontal bar chart by plotext, returned as text (works without a TTY).
    Each label carries the exact cost; the bars only give the proportions."""
    import plotext  # type: ignore[import-untyped]  # ships no type information

    shown = _chart_rows(rows, by)[::-1]  # plotext draws the first bar at the bottom
    labels = [f"{_name(r.group)} ${r.to_dict()['cost_usd']}" for r in shown]
    values = [float(r.cost_usd) for r in shown]
    fig = plotext.figure
    fig.clear()
    fig.draw(fig.bar(labels, values, orientation="horizontal", width=0.5))
    # plotext 6.1 sizes a horizontal bar chart's value axis from the wrong data: set it explicitly.
    top = max(values, default=0.0)
    fig.ruler("x").lim(0, top * 1.05 if top > 0 else 1.0)
    fig.theme("simple" if color else "colorless")
    columns = width or shutil.get_terminal_size((100, 24)).columns
    per_bar = 3 if len(shown) <= 12 else 2
    fig.plot_size(max(40, min(columns, 120)), per_bar * max(len(shown), 1) + 5)
    fig.title(title)
    fig.label("USD", axis="x")
    return str(fig.build().string(colorless=not color))


async def _report(ledger: Ledger, args: argparse.Namespace) -> None:
    rows = await ledger.report(args.by, args.since, tenant=args.tenant, key_id=args.key, model=args.model)
    # The total is the sum of the rows shown, so it matches them even while records keep arriving.
    total = total_of(rows, "(total)")
    since = format_ts(args.since) if args.since else None
    if args.json:
        view = {"by": args.by, "since": since, "rows": [r.to_dict() for r in rows], "total": total.to_dict()}
        print(json.dumps(view, indent=2, ensure_ascii=False))
    elif args.csv:
        print(_report_csv(rows, total), end="")
    elif args.chart and not rows:
        print("no usage records" + (f" since {since}" if since else ""))
    elif args.chart:
        title = f"cost by {args.by}" + (f" since {since}" if since else "")
        print(render_chart(rows, args.by, title, color=sys.stdout.isatty()))
        print(f"total ${total.to_dict()['cost_usd']} over {total.requests} requests")
        if total.unpriced_requests:
            print(f"{total.unpriced_requests} requests had no price and are not in the costs")
    else:
        print(_report_table(rows, total, args.by))


def cmd_usage_report(args: argparse.Namespace) -> int:
    return _run(args, _report)


# --- usage tail ---


def _line(r: UsageRecord) -> str:
    ttft = "" if r.ttft_ms is None else f" ttft={r.ttft_ms:.0f}ms"
    error = f" error={r.error_code}" if r.error_code else ""
    return (
        f"{format_ts(r.ts)} {r.status} {_name(r.tenant)}/{_name(r.key_id)} {r.model} ({r.provider}) "
        f"in={r.input_tokens} out={r.output_tokens} cost={_cost(r)} {r.latency_ms:.0f}ms{ttft}{error} {r.request_id}"
    )


async def _tail(ledger: Ledger, args: argparse.Namespace) -> None:
    wanted = Filters(tenant=args.tenant, key_id=args.key, model=args.model)
    cursor = await ledger.last_seq()
    print(f"following {ledger.target} (Ctrl-C stops)", file=sys.stderr, flush=True)
    down = False
    while True:
        try:
            async for seq, record in ledger.follow(cursor, poll_interval=args.interval):
                cursor = seq
                down = False
                if not wanted.matches(record):
                    continue
                print(json.dumps(record.to_dict(), ensure_ascii=False) if args.json else _line(record), flush=True)
        except LedgerUnavailable as err:
            # Keep following across a database restart; say so once per outage.
            if not down:
                print(f"warning: ledger unavailable, retrying: {err}", file=sys.stderr, flush=True)
                down = True
            await asyncio.sleep(args.interval)


def cmd_usage_tail(args: argparse.Namespace) -> int:
    return _run(args, _tail)


# --- parsers ---


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="gateway.yaml path (default: $EXTPROC_CONFIG or gateway.yaml)")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant")
    p.add_argument("--key", metavar="ID", help="virtual key id")
    p.add_argument("--model", help="public model name")


def add_parsers(sub: Any) -> None:
    db = sub.add_parser("db", help="the usage ledger's database").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("migrate", help="create or upgrade the ledger schema (safe to repeat)")
    _common(p)
    p.set_defaults(func=cmd_db_migrate)
    p = db.add_parser(
        "consume",
        help="move usage records from Redis into the ledger until stopped (for servers with ledger.consumer: false)",
    )
    _common(p)
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz, /status (default: off)",
    )
    p.set_defaults(func=_db_consume)

    usage = sub.add_parser("usage", help="usage records and costs from the ledger").add_subparsers(
        dest="usage_command", required=True
    )
    p = usage.add_parser("list", help="usage records, newest first")
    _common(p)
    p.add_argument("--since", type=parse_since, metavar="WHEN", help=f"{_SINCE_HELP} (default: all)")
    _filters(p)
    p.add_argument("--limit", type=_positive, default=50, help="at most this many records (default: 50)")
    p.add_argument("--json", action="store_true", help="one JSON array of usage records")
    p.set_defaults(func=cmd_usage_list)

    p = usage.add_parser("report", help="requests, tokens and cost per group, with a total")
    _common(p)
    p.add_argument("--by", choices=GROUP_BY, default="model", help="grouping (default: model)")
    p.add_argument("--since", type=parse_since, default="30d", metavar="WHEN", help=f"{_SINCE_HELP} (default: 30d)")
    _filters(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header and a final total row")
    fmt.add_argument("--chart", action="store_true", help="bar chart of cost per group")
    p.set_defaults(func=cmd_usage_report)

    p = usage.add_parser("tail", help="print new usage records as they arrive (Ctrl-C stops)")
    _common(p)
    _filters(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default: 1)")
    p.set_defaults(func=cmd_usage_tail)
