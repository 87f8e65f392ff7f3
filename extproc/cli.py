"""The `extproc` command."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import envoyconf
from .cli_config import DEFAULT_CONFIG
from .cli_config import config_path as _config_path
from .cli_config import load_or_exit as _load
from .config import ConfigError, GatewayConfig
from .logsetup import configure_logging

if TYPE_CHECKING:
    from .devstack import Stack

DEFAULT_ENVOY = "envoy/envoy.yaml"


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    configure_logging(config.server.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import workers
    from .server import run

    try:
        n = workers.worker_count(config, args.workers)
        if n > 1:
            return workers.run(config, n, args.listen, args.metrics_listen)
        run(config, args.listen, args.metrics_listen)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def cmd_mock(args: argparse.Namespace) -> int:
    from .mock.server import MockOptions, run

    run(
        args.host,
        args.port,
        MockOptions(
            # From the environment only: a key on the command line is readable by anyone via `ps`.
            openai_key=os.environ.get("MOCK_OPENAI_KEY") or None,
            anthropic_key=os.environ.get("MOCK_ANTHROPIC_KEY") or None,
        ),
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        envoy_cfg = envoyconf.load(args.envoy)
    except (OSError, ValueError) as err:
        print(f"{args.envoy}: {err}", file=sys.stderr)
        return 2
    problems = envoyconf.check(config, envoy_cfg)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    routes = envoyconf.provider_clusters(envoy_cfg)
    print(f"{_config_path(args.config)}: ok ({len(config.providers)} providers, {len(config.models)} model entries)")
    for provider in config.providers:
        print(f"  {provider} -> cluster {routes[provider]}")
    targets = envoyconf.target_routes(envoy_cfg)
    for m in config.models:
        if m.targets:
            order = ", ".join(
                f"{t.provider}/{t.upstream} (priority {t.priority}, weight {t.weight})" for t in m.targets
            )
            print(f"  model {m.name} -> cluster {targets[m.name]['route']['cluster']}: {order}")
    return 0


def _dev_demo_key(config: GatewayConfig) -> str:
    """A fresh demo key (tenant "demo") for the dev stack; earlier demo keys are revoked."""
    import asyncio

    from .auth import key_service

    async def make() -> str:
        async with key_service(config) as svc:
            await svc.ensure_tenant("demo")
            for old in await svc.list_keys("demo"):
                if old.name == "dev-demo" and old.status() == "active" and not old.static:
                    await svc.revoke_key(old.id)
            secret, _ = await svc.create_key("demo", "dev-demo")
            return secret

    return asyncio.run(make())


def cmd_dev(args: argparse.Namespace) -> int:
    import secrets

    from .devstack import Stack

    ports = envoyconf.LocalPorts(
        listener=args.port,
        admin=args.admin_port,
        extproc=args.extproc_port,
        mock=args.mock_port,
        metrics=args.metrics_port,
    )
    config = _load(args.config)
    # Envoy's spans go where the server's go (the same OTEL_* variables, the same protocol).
    otlp = envoyconf.OtlpTarget.from_env(os.environ)
    ratio = config.tracing.sampling_ratio
    # A provider whose api_key_env is set in the environment goes to the real API; the others go
    # to the mock provider, which is given a made-up key per schema so that credential injection
    # works (and is checked) exactly as in production.
    real = frozenset(p for p, pc in config.providers.items() if pc.api_key_env and os.environ.get(pc.api_key_env))
    if args.print_envoy_config:
        derived = envoyconf.derive_local(envoyconf.load(args.envoy), ports, real, otlp, ratio)
        print(envoyconf.dump(derived), end="")
        return 0
    problems = envoyconf.check(config, envoyconf.load(args.envoy))
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    mock_keys = {
        "openai": "sk-mock-" + secrets.token_urlsafe(12),
        "anthropic": "sk-ant-mock-" + secrets.token_urlsafe(12),
    }
    env = {
        pc.api_key_env: mock_keys[pc.schema_]
        for name, pc in config.providers.items()
        if name not in real and pc.api_key_env
    }
    try:
        demo_key = _dev_demo_key(config)
    except Exception as err:  # the store is unreachable or the config is wrong: say so plainly
        print(f"error: cannot create the demo key: {err}", file=sys.stderr)
        return 1
    stack = Stack(
        gateway_config=Path(_config_path(args.config)),
        envoy_config=Path(args.envoy),
        workdir=Path(_config_path(args.config)).resolve().parent / ".dev",
        ports=ports,
        real_providers=real,
        with_mock=len(real) < len(config.providers),
        mock_env={"MOCK_OPENAI_KEY": mock_keys["openai"], "MOCK_ANTHROPIC_KEY": mock_keys["anthropic"]},
        env=env,
        sampling_ratio=ratio,
    )
    # `kill`, a closed terminal or a supervisor stopping dev must stop its Envoy, server and mock
    # too, exactly as Ctrl-C does; before this, SIGTERM ended dev alone and orphaned all three.
    with _signal_handlers(_interrupt, signal.SIGTERM, signal.SIGHUP):
        try:
            stack.start()
            _print_dev_banner(stack, config, real, demo_key)
            return stack.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            # A second signal while stopping must not cut the cleanup short.
            with _signal_handlers(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                stack.stop()


_Handler = Callable[[int, object], None] | signal.Handlers


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # what Ctrl-C raises


@contextlib.contextmanager
def _signal_handlers(handler: _Handler, *signums: signal.Signals) -> Iterator[None]:
    """`handler` for these signals for the block's duration; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _print_dev_banner(stack: Stack, config: GatewayConfig, real: frozenset[str], demo_key: str) -> None:
    models = [m for m in config.models if not m.is_wildcard]

    def example(schema: str) -> str:
        return next((m.name for m in models if m.provider and config.providers[m.provider].schema_ == schema), "MODEL")

    openai_model, anthropic_model = example("openai"), example("anthropic")
    mocked = sorted(set(config.providers) - real)
    anthropic_body = (
        f'{{"model":"{anthropic_model}","max_tokens":64,"stream":true,'
        '"messages":[{"role":"user","content":"hello"}]}'
    )
    url = stack.base_url
    print(
        f"""
gateway ready on {url}   (logs in {stack.workdir}; Ctrl-C stops everything)
  providers on the mock: {", ".join(mocked) or "none"}; real: {", ".join(sorted(real)) or "none"}
  models: {", ".join(m.name for m in models)}
  demo key (tenant "demo"): {demo_key}

  export GATEWAY_KEY={demo_key}
  curl {url}/v1/models -H "Authorization: Bearer $GATEWAY_KEY"
  curl {url}/v1/chat/completions -H "Authorization: Bearer $GATEWAY_KEY" -H 'content-type: application/json' \\
       -d '{{"model":"{openai_model}","messages":[{{"role":"user","content":"hello"}}]}}'
  curl -N {url}/v1/messages -H "x-api-key: $GATEWAY_KEY" -H 'content-type: application/json' \\
       -H 'anthropic-version: 2023-06-01' -d '{anthropic_body}'

  OpenAI SDK:    OpenAI(base_url="{url}/v1", api_key=GATEWAY_KEY)
  Anthropic SDK: Anthropic(base_url="{url}", api_key=GATEWAY_KEY)
  More keys:     extproc keys create --tenant demo --name me
""",
        flush=True,
    )


def cmd_envoy_config(args: argparse.Namespace) -> int:
    source = envoyconf.load(args.envoy)
    root = Path(args.envoy).resolve().parent.parent
    for flavor in envoyconf.FLAVORS:
        text = envoyconf.render_flavor(source, flavor)
        target = root / flavor.path
        if args.write:
            target.write_text(text)
            print(f"wrote {flavor.path}")
        elif not target.exists() or target.read_text() != text:
            print(f"out of date: {flavor.path} (run `extproc envoy-config --write`)", file=sys.stderr)
            return 1
    return 0


def status_url(config: GatewayConfig, override: str | None) -> str | None:
    """The running server's ops endpoint: --url, else gateway.yaml server.metrics_listen."""
    if override:
        return override.rstrip("/")
    listen = config.server.metrics_listen
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    url = args.url or status_url(_load(args.config), None)
    if url is None:
        print("error: server.metrics_listen is off in gateway.yaml; pass --url", file=sys.stderr)
        return 2
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=args.timeout) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"error: no server status at {url}/status ({type(err).__name__}: {err})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [
        ("version", status.get("version")),
        ("uptime", _duration(float(status.get("uptime_seconds", 0)))),
        ("ready", "yes" if status.get("ready") else "no: " + "; ".join(status.get("reasons") or [])),
        ("store", f"{status.get('store')} ({'reachable' if status.get('store_reachable') else 'UNREACHABLE'})"),
    ]
    if status.get("role") == "ledger consumer":  # `extproc db consume --metrics-listen`
        backlog = status.get("backlog", -1)
        rows.insert(0, ("role", "ledger consumer (extproc db consume)"))
        rows += [
            ("records inserted", status.get("records_inserted")),
            ("already in the ledger", status.get("records_duplicate")),
            ("dead letters", status.get("records_dead_lettered")),
            ("insert failures", status.get("insert_failures")),
            ("backlog", "not measured yet" if backlog is None or backlog < 0 else f"{backlog} records in Redis"),
        ]
    else:
        rows += [
            ("transport", status.get("transport")),
            ("in-flight requests", status.get("in_flight")),
            ("open streams", status.get("open_streams")),
            ("usage spool", f"{status.get('spool_bytes', 0)} bytes"),
            ("records replayed", status.get("records_replayed")),
            ("tracing", "on" if status.get("tracing") else "off"),
        ]
    for w in status.get("workers") or ():
        state = "ready" if w.get("ready") else "NOT READY"
        rows.append(
            (
                f"worker {w.get('index')}",
                f"pid {w.get('pid')} on {w.get('listen')}, {state}, {w.get('in_flight')} in flight, "
                f"{w.get('restarts')} restarts",
            )
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if status.get("ready") else 3


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def cmd_admin(args: argparse.Namespace) -> int:
    from . import admin_cli

    return admin_cli.run(_load(args.config), args)


def cmd_limits(args: argparse.Namespace) -> int:
    from . import limits_cli

    return limits_cli.run(_load(args.config), args)


def _limits_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"gateway.yaml path (default: $EXTPROC_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_limits)


def _admin_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"gateway.yaml path (default: $EXTPROC_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_admin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="LLM gateway: Envoy ext_proc server and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC ext_proc server")
    p.add_argument("--config", help=f"gateway.yaml path (default: $EXTPROC_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--listen", help="override server.listen (host:port or unix:/path)")
    p.add_argument(
        "--metrics-listen", help="override server.metrics_listen (host:port of /metrics, /healthz, ...; off: none)"
    )
    p.add_argument(
        "--workers",
        type=_workers_arg,
        help="override server.workers: server processes (auto: the cores available with the redis store, else 1)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mock-provider", help="run the mock OpenAI/Anthropic provider")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18080)
    p.epilog = "Provider keys it requires come from $MOCK_OPENAI_KEY / $MOCK_ANTHROPIC_KEY (unset: accept any)."
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("check", help="validate gateway.yaml and its routes in envoy.yaml")
    p.add_argument("--config")
    p.add_argument("--envoy", default=DEFAULT_ENVOY)
    p.set_defaults(func=cmd_check)

    from . import admin_cli

    admin_cli.add_parsers(sub, _admin_common)
    from . import usage_cli

    usage_cli.add_parsers(sub)
    from . import limits_cli

    limits_cli.add_parsers(sub, _limits_common)
    from . import cache_cli

    cache_cli.add_parsers(sub)

    p = sub.add_parser("status", help="a running server's version, uptime, store, in-flight requests, spool")
    p.add_argument("--config", help=f"gateway.yaml path (default: $EXTPROC_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--url", help="the server's ops endpoint (default: http://<server.metrics_listen>)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("envoy-config", help="check (or --write) the configs derived from envoy.yaml")
    p.add_argument("--envoy", default=DEFAULT_ENVOY)
    p.add_argument("--write", action="store_true")
    p.set_defaults(func=cmd_envoy_config)

    p = sub.add_parser("dev", help="run Envoy + server + mock provider locally")
    p.add_argument("--config")
    p.add_argument("--envoy", default=DEFAULT_ENVOY)
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--extproc-port", type=int, default=50051)
    p.add_argument("--mock-port", type=int, default=18080)
    p.add_argument("--metrics-port", type=int, default=9464, help="the server's /metrics, /healthz, /readyz port")
    p.add_argument("--print-envoy-config", action="store_true", help="print the derived Envoy config and exit")
    p.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
