"""Which gateway.yaml a command reads: `--config`, else $EXTPROC_CONFIG, else ./gateway.yaml. One
place for every subcommand module (cli, usage_cli, cache_cli), so they need not import the `extproc`
command's own module (which imports them)."""

from __future__ import annotations

import os
import sys

from .config import ConfigError, GatewayConfig, load_config

DEFAULT_CONFIG = "gateway.yaml"


def config_path(arg: str | None) -> str:
    return arg or os.environ.get("EXTPROC_CONFIG") or DEFAULT_CONFIG


def load_or_exit(arg: str | None) -> GatewayConfig:
    """The validated config, or the mistake (with its path) on stderr and exit status 2."""
    try:
        return load_config(config_path(arg))
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from None
