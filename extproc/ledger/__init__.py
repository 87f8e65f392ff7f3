"""The usage ledger: the durable, queryable home of every usage record.

PostgreSQL when gateway.yaml names `ledger.database_url_env` (shared by replicas, migrated with
`extproc db migrate`), otherwise a SQLite file at `config.ledger_path` (migrated on open). The
choice is independent of the store backend: a Redis deployment may still keep a SQLite ledger on
the one host that runs the consumer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import ConfigError, GatewayConfig
from ._codec import InvalidRecord, validate_record
from .base import GROUP_BY, GroupBy, Ledger, LedgerSchemaError, LedgerUnavailable, ReportRow
from .postgres import PostgresLedger
from .sqlite import SqliteLedger


def open_ledger(config: GatewayConfig, env: Mapping[str, str] | None = None) -> Ledger:
    """The ledger gateway.yaml names, not connected yet (the first call connects). `env` (default:
    this process's) holds the PostgreSQL URL under the name the config gives."""
    name = config.ledger.database_url_env
    if name:
        url = (os.environ if env is None else env).get(name)
        if not url:
            raise ConfigError(f"ledger.database_url_env is {name} but environment variable {name} is not set")
        return PostgresLedger(url)
    return SqliteLedger(config.ledger_path)


__all__ = [
    "GROUP_BY",
    "GroupBy",
    "InvalidRecord",
    "Ledger",
    "LedgerSchemaError",
    "LedgerUnavailable",
    "PostgresLedger",
    "ReportRow",
    "SqliteLedger",
    "open_ledger",
    "validate_record",
]
