"""Pieces of a minimal Envoy config for the probes (one listener, loopback clusters), so each probe
states only what it asks Envoy about."""

from __future__ import annotations

import json
from typing import Any

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_H2_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def cluster(name: str, port: int, h2: bool = False) -> dict[str, Any]:
    """A cluster of one endpoint on 127.0.0.1; `h2` for a gRPC service."""
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    c: dict[str, Any] = {
        "name": name,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if h2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _H2_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def bootstrap(
    listener: int,
    filters: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    access_log: list[dict[str, Any]] | None = None,
    admin: int | None = None,
    upstream_cluster: str = "up",
) -> str:
    """One listener whose every request goes to `upstream_cluster` through `filters` (the router
    last), as the JSON Envoy's -c takes."""
    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "probe",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster}}],
                }
            ]
        },
        "http_filters": filters,
    }
    if access_log:
        hcm["access_log"] = access_log
    config: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        }
    }
    if admin is not None:
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    return json.dumps(config)
