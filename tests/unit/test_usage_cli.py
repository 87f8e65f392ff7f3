"""`extproc db migrate` and `extproc usage …` against a SQLite ledger and against PostgreSQL (via
the URL env var gateway.yaml names), through the CLI's own parsers and handlers; `usage tail` runs
in a subprocess so Ctrl-C is real."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pytest

from extproc import usage_cli
from extproc.accounting.record import TOKEN_FIELDS, UsageRecord
from extproc.config import load_config
from extproc.devstack import free_port
from extproc.ledger import GROUP_BY, GroupBy, ReportRow, open_ledger
from tests.unit.test_ledger import expected_rows

ROOT = Path(__file__).resolve().parents[2]
URL_ENV = "EXTPROC_TEST_LEDGER_URL"
FIELDS = [f.name for f in fields(UsageRecord)]
NOW = datetime.now(UTC).replace(microsecond=0)


def rec(rid: str, hours_ago: float, tenant: str, key: str, model: str, cost: str | None, **kw: Any) -> UsageRecord:
    n = int(rid[1:])
    return replace(
        UsageRecord(
            request_id=rid,
            ts=NOW - timedelta(hours=hours_ago),
            tenant=tenant,
            key_id=key,
            model=model,
            upstream_model=model,
            provider="anthropic" if model.startswith("claude") else "openai",
            endpoint="/v1/chat/completions",
            status=200,
            latency_ms=80.0 + n,
            input_tokens=1000 * n,
            cached_input_tokens=100 * n,
            output_tokens=50 * n,
            total_tokens=1050 * n,
            cost_usd=cost,
        ),
        **kw,
    )


RECORDS = [
    rec("r1", 0.5, "acme", "key_a", "gpt-mini", "0.1"),
    rec("r2", 2, "acme", "key_b", "gpt-mini", "0.2"),
    rec("r3", 5, "beta", "key_c", "claude", "1.000000000001", estimated=True),
    rec("r4", 30, "beta", "key_c", "claude", None),
    rec("r5", 50, "acme", "", "local", None, status=502, error_code="upstream_error"),
]
# Outside report's default 30 days: only `--since all` sees it.
OLD = rec("r6", 24 * 40, "acme", "key_a", "gpt-mini", "5")
NEWEST_FIRST = ["r1", "r2", "r3", "r4", "r5", "r6"]


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """The usage commands as `extproc` will run them, bound to one gateway.yaml."""

    def __init__(self, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config_path = config_path
        self.capsys = capsys

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="extproc")
        usage_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
        return parser

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        args = self.parser().parse_args([*argv, "--config", str(self.config_path)])
        code = int(args.func(args))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def seed(self, records: list[UsageRecord]) -> None:
        async def insert() -> None:
            async with open_ledger(load_config(self.config_path)) as ledger:
                assert await ledger.insert(records) == len(records)

        asyncio.run(insert())


def write_config(path: Path, ledger: str = "") -> Path:
    path.write_text(
        "providers:\n  openai: {schema: openai}\n  anthropic: {schema: anthropic}\nstore: {path: state/state.db}\n"
        + ledger
    )
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.delenv("EXTPROC_CONFIG", raising=False)
    ledger = ""
    if request.param == "postgres":
        monkeypatch.setenv(URL_ENV, request.getfixturevalue("pg_schema_url"))
        ledger = f"ledger: {{database_url_env: {URL_ENV}}}\n"
    write_config(tmp_path / "gateway.yaml", ledger)
    return str(request.param)


@pytest.fixture
def cli(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    c = Cli(tmp_path / "gateway.yaml", capsys)
    assert c("db", "migrate").code == 0
    return c


@pytest.fixture
def seeded(cli: Cli) -> Cli:
    cli.seed([*RECORDS, OLD])
    return cli


# --- db migrate ---


def test_migrate_is_repeatable(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path / "gateway.yaml", capsys)
    first, second, third = cli("db", "migrate"), cli("db", "migrate"), cli("db", "migrate")
    assert (first.code, second.code, third.code) == (0, 0, 0)
    assert "applied 1, 2, 3, 4" in first.out and "version 4" in first.out
    assert "up to date" in second.out and "up to date" in third.out


def test_postgres_commands_before_migrate_say_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_schema_url: str
) -> None:
    monkeypatch.setenv(URL_ENV, pg_schema_url)
    cli = Cli(write_config(tmp_path / "gateway.yaml", f"ledger: {{database_url_env: {URL_ENV}}}\n"), capsys)
    result = cli("usage", "list")
    assert result.code == 1
    assert "extproc db migrate" in result.err


# --- usage list ---


def test_list_json_has_exactly_the_record_fields(seeded: Cli) -> None:
    result = seeded("usage", "list", "--json")
    assert result.code == 0
    data = json.loads(result.out)
    assert isinstance(data, list)
    assert [list(d) for d in data] == [FIELDS] * len(data)
    by_id = {r.request_id: r for r in [*RECORDS, OLD]}
    assert data == [by_id[i].to_dict() for i in NEWEST_FIRST]


LIST_CASES: list[tuple[list[str], list[str]]] = [
    ([], NEWEST_FIRST),
    (["--tenant", "beta"], ["r3", "r4"]),
    (["--key", "key_a"], ["r1", "r6"]),
    (["--model", "claude"], ["r3", "r4"]),
    (["--since", "3h"], ["r1", "r2"]),
    (["--since", "90m"], ["r1"]),
    (["--since", "2d"], ["r1", "r2", "r3", "r4"]),
    (["--since", "7d", "--tenant", "acme"], ["r1", "r2", "r5"]),
    (["--since", (NOW - timedelta(hours=6)).isoformat()], ["r1", "r2", "r3"]),
    (["--limit", "2"], ["r1", "r2"]),
    (["--tenant", "nobody"], []),
]


@pytest.mark.parametrize(("argv", "expected"), LIST_CASES)
def test_list_filters(seeded: Cli, argv: list[str], expected: list[str]) -> None:
    result = seeded("usage", "list", "--json", *argv)
    assert result.code == 0
    assert [d["request_id"] for d in json.loads(result.out)] == expected


def test_list_table(seeded: Cli) -> None:
    result = seeded("usage", "list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "REQUEST", "TENANT"]
    body = lines[1 : 1 + len(NEWEST_FIRST)]
    assert [line.split()[1] for line in body] == NEWEST_FIRST
    assert "~1.000000000001" in result.out  # estimated
    assert any(line.split()[1] == "r4" and " - " in line for line in body)  # unpriced


# --- usage report ---


def _report_json(cli: Cli, by: GroupBy, *argv: str) -> dict[str, Any]:
    result = cli("usage", "report", "--by", by, "--json", *argv)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def _expected(records: list[UsageRecord], by: GroupBy | None) -> dict[str, dict[str, Any]]:
    return {
        group: {k: v for k, v in row.items() if k != "cost"} | {"cost_usd": row["cost"]}
        for group, row in expected_rows(records, by).items()
    }


def _parsed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (Decimal(v) if k == "cost_usd" else int(v)) for k, v in row.items() if k != "group"}


@pytest.mark.parametrize("by", GROUP_BY)
def test_report_json_equals_the_records(seeded: Cli, by: GroupBy) -> None:
    data = _report_json(seeded, by)
    assert data["by"] == by
    assert {r["group"]: _parsed(r) for r in data["rows"]} == _expected(RECORDS, by)
    assert _parsed(data["total"]) == _expected(RECORDS, None)["total"]
    assert data["total"]["cost_usd"] == "1.300000000001"  # exact: not 1.3000000000010002
    assert data["total"]["unpriced_requests"] == 2


def test_report_since_all_and_filters(seeded: Cli) -> None:
    everything = _report_json(seeded, "tenant", "--since", "all")
    assert _parsed(everything["total"]) == _expected([*RECORDS, OLD], None)["total"]
    acme = _report_json(seeded, "model", "--since", "all", "--tenant", "acme")
    assert {r["group"]: _parsed(r) for r in acme["rows"]} == _expected(
        [r for r in [*RECORDS, OLD] if r.tenant == "acme"], "model"
    )


@pytest.mark.parametrize("by", GROUP_BY)
def test_report_csv_parses_with_a_total_row(seeded: Cli, by: GroupBy) -> None:
    result = seeded("usage", "report", "--by", by, "--csv")
    assert result.code == 0
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert list(rows[0]) == [
        "group",
        "requests",
        "unpriced_requests",
        "estimated_requests",
        *TOKEN_FIELDS,
        "cost_usd",
    ]
    *groups, total = rows
    assert {r["group"]: _parsed(r) for r in groups} == _expected(RECORDS, by)
    assert total["group"] == "(total)"
    assert _parsed(total) == _expected(RECORDS, None)["total"]


def test_report_table_has_groups_and_total(seeded: Cli) -> None:
    result = seeded("usage", "report", "--by", "tenant")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["TENANT", "REQUESTS", "UNPRICED"]
    assert [line.split()[0] for line in lines[1:3]] == ["beta", "acme"]  # costliest first
    assert lines[-1].split()[0] == "TOTAL" and lines[-1].split()[-1] == "1.300000000001"


@pytest.mark.parametrize("by", GROUP_BY)
def test_report_chart_names_every_group(seeded: Cli, by: GroupBy) -> None:
    result = seeded("usage", "report", "--by", by, "--chart")
    assert result.code == 0
    for group in _expected(RECORDS, by):
        assert (group or "(none)") in result.out
    assert "total $1.300000000001 over 5 requests" in result.out
    assert "2 requests had no price" in result.out
    assert "\x1b[" not in result.out  # no colour codes when not on a terminal


def test_chart_folds_the_long_tail() -> None:
    rows = [ReportRow(group=f"g{i:02}", requests=1, cost_usd=Decimal(i + 1)) for i in range(usage_cli.CHART_GROUPS + 5)]
    text = usage_cli.render_chart(rows, "model", "t", width=100)
    assert "g24 $25" in text and "(6 others) $21" in text and "g05" not in text


def test_report_on_an_empty_ledger(cli: Cli) -> None:
    for fmt in ("--json", "--csv", "--chart", None):
        result = cli("usage", "report", *([fmt] if fmt else []))
        assert result.code == 0, (fmt, result.err)
    assert json.loads(cli("usage", "report", "--json").out)["total"]["requests"] == 0
    assert cli("usage", "report", "--chart").out.startswith("no usage records since ")


# --- --since ---

SINCE = [
    ("30m", NOW - timedelta(minutes=30)),
    ("24h", NOW - timedelta(hours=24)),
    ("7d", NOW - timedelta(days=7)),
    ("2w", NOW - timedelta(weeks=2)),
    ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ("2025-01-31T12:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ("2025-01-31T14:00:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
    ("all", None),
]


@pytest.mark.parametrize(("text", "expected"), SINCE)
def test_parse_since(text: str, expected: datetime | None) -> None:
    assert usage_cli.parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "0d", "-3h", "3 days", ""])
def test_bad_since_is_a_usage_error(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        usage_cli.parse_since(text)
    cli = Cli(write_config(tmp_path / "gateway.yaml"), capsys)
    with pytest.raises(SystemExit) as exit_:
        cli("usage", "list", "--since", text)
    assert exit_.value.code == 2
    assert "--since" in capsys.readouterr().err


# --- errors ---

UNREACHABLE = [
    ("sqlite", "ledger: {path: file/ledger.db}\n"),
    ("postgres", f"ledger: {{database_url_env: {URL_ENV}}}\n"),
]


@pytest.mark.parametrize(("kind", "ledger"), UNREACHABLE)
@pytest.mark.parametrize("argv", [["db", "migrate"], ["usage", "list"], ["usage", "report"], ["usage", "tail"]])
def test_unreachable_ledger_exits_3(
    kind: str,
    ledger: str,
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("a file where the ledger's directory should be")
    monkeypatch.setenv(URL_ENV, f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/ledger")
    cli = Cli(write_config(tmp_path / "gateway.yaml", ledger), capsys)
    result = cli(*argv)
    assert result.code == 3
    assert result.err.startswith("error: ledger unavailable:") and "Traceback" not in result.err
    assert "hunter2" not in result.err


def test_unset_url_variable_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    cli = Cli(write_config(tmp_path / "gateway.yaml", f"ledger: {{database_url_env: {URL_ENV}}}\n"), capsys)
    result = cli("usage", "list")
    assert result.code == 2
    assert f"environment variable {URL_ENV} is not set" in result.err


# --- usage tail ---

RUNNER = """
import argparse, sys
from extproc import usage_cli
parser = argparse.ArgumentParser(prog="extproc")
usage_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


class Lines:
    """A pipe read by a thread, so waiting for a line can time out (select() on a buffered text
    pipe would miss lines already buffered)."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")

    def next(self, timeout: float) -> str:
        return self._queue.get(timeout=timeout)

    def rest(self, timeout: float = 10) -> str:
        self._thread.join(timeout)
        return "".join(iter(self._queue.get_nowait, ""))


@pytest.fixture
def tail(cli: Cli) -> Iterator[subprocess.Popen[str]]:
    cli.seed(RECORDS[:2])  # already there: tail shows only what comes after it starts
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUNNER,
            "usage",
            "tail",
            "--json",
            "--interval",
            "0.05",
            "--config",
            str(cli.config_path),
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_tail_follows_new_records_until_ctrl_c(cli: Cli, tail: subprocess.Popen[str]) -> None:
    assert tail.stdout is not None and tail.stderr is not None
    out, err = Lines(tail.stdout), Lines(tail.stderr)
    assert "following" in err.next(20)
    cli.seed(RECORDS[2:4])
    time.sleep(0.2)
    cli.seed(RECORDS[4:])
    got = [json.loads(out.next(10)) for _ in range(3)]
    assert got == [r.to_dict() for r in RECORDS[2:]]
    tail.send_signal(signal.SIGINT)
    assert tail.wait(10) == 0
    assert "Traceback" not in err.rest()
