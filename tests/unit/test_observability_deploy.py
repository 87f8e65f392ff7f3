"""The observability deployment checked offline: dashboard, Grafana provisioning, Prometheus, the
OpenTelemetry collector, and their wiring in docker-compose.yml and k8s/.

No Docker or cluster here: a broken panel, a scrape job on the wrong port or a collector exporting
to a host that does not exist would only show as empty graphs after `docker compose up`, so every
name, port and path that ties the pieces together is compared here instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoyconf
from tests.dashboard_metrics import (
    dashboard_exprs,
    dashboard_metric_names,
    expr_metric_names,
    variable_query_metric_names,
)
from tests.unit.test_deploy import K8S, ROOT, containers, deployment, k8s_docs

OBS = ROOT / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "llm-gateway.json"
DATASOURCES = OBS / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = OBS / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
PROMETHEUS = OBS / "prometheus.yml"
COLLECTOR = OBS / "otel-collector.yaml"
METRICS_PORT = 9464

# What the server exports (issue 17), by family; histograms appear in a scrape as _bucket/_sum/_count.
HISTOGRAMS = {
    "gen_ai_client_token_usage",
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gateway_stage_duration_seconds",
}
COUNTERS_AND_GAUGES = {
    "gateway_requests_total",
    "gateway_tokens_total",
    "gateway_cost_usd_total",
    "gateway_auth_refusals_total",
    "gateway_limit_refusals_total",
    "gateway_pii_redactions_total",
    "gateway_pii_blocked_total",
    "gateway_pii_failures_total",
    "gateway_usage_spool_bytes",
    "gateway_usage_records_total",
    "gateway_usage_records_spooled_total",
    "gateway_usage_records_replayed_total",
    "gateway_redis_errors_total",
    "gateway_db_errors_total",
    "gateway_requests_in_flight",
    "gateway_open_streams",
    "gateway_build_info",
    "gateway_cache_lookups_total",
    "gateway_cache_saved_usd_total",
    "gateway_fallbacks_total",
    "gateway_ledger_records_total",
    "gateway_ledger_insert_failures_total",
    "gateway_ledger_backlog_records",
}
EXPORTED = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# Metrics carrying tenant and model labels: their panels must follow the dashboard's filters.
TENANT_MODEL_METRICS = {"gateway_requests_total", "gateway_tokens_total", "gateway_cost_usd_total"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return list(dashboard()["panels"])


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
    return data


def mounts(service: str) -> dict[str, Path]:
    """Container path -> repo path of a compose service's bind mounts (named volumes left out)."""
    out: dict[str, Path] = {}
    for vol in compose()["services"][service].get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith("."):
            out[dst] = ROOT / src
    return out


def mounted_file(service: str, container_path: str) -> Path:
    """The repo file a container sees at `container_path`, through a file or a directory mount."""
    for dst, src in mounts(service).items():
        if container_path == dst:
            return src
        if container_path.startswith(dst.rstrip("/") + "/"):
            return src / container_path.removeprefix(dst.rstrip("/") + "/")
    raise AssertionError(f"{service}: nothing mounted at {container_path}")


def flag(args: list[str], name: str) -> str:
    """The value of `--name=value` in a command line."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} in {args}"
    return values[0]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("http://").removeprefix("https://").rstrip("/").rpartition(":")
    return host, int(port)


# --- the metric-name helper ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (tenant, model) (rate(gateway_requests_total{tenant=~"$tenant"}[$__rate_interval]))',
            {"gateway_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, stage) (rate(gateway_stage_duration_seconds_bucket[5m])))",
            {"gateway_stage_duration_seconds_bucket"},
        ),
        ("sum(rate(a_sum[5m])) without (instance) / sum(rate(a_count[5m])) without (instance)", {"a_sum", "a_count"}),
        ("a_total * on (job) group_left (version) b_info", {"a_total", "b_info"}),
        ("x > bool 1e-3 and ignoring (le) y unless z offset 5m", {"x", "y", "z"}),
        ("max_over_time(deriv(g[1h:5m])[1d:]) @ start()", {"g"}),
        ('label_replace(c_total, "dst", "$1", "by", "(rate|sum)")', {"c_total"}),
        ('count_values("version", gateway_build_info) or vector(0) + Inf - NaN', {"gateway_build_info"}),
        ('{__name__="via_name_total", job="x"}', {"via_name_total"}),
        ("job:requests:rate5m", {"job:requests:rate5m"}),
        ("sum(increase(gateway_cost_usd_total[${__range}]))", {"gateway_cost_usd_total"}),
        ("SUM BY (le) (x_bucket)", {"x_bucket"}),
    ],
)
def test_expr_metric_names(expr: str, names: set[str]) -> None:
    assert expr_metric_names(expr) == names


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("label_values(gateway_requests_total, tenant)", {"gateway_requests_total"}),
        ('label_values(gateway_requests_total{tenant=~"$tenant", status="200"}, model)', {"gateway_requests_total"}),
        ("label_values(tenant)", set()),
        ("label_names()", set()),
        ("metrics(gateway_.*)", set()),
        ("query_result(topk(5, sum by (model) (gateway_tokens_total)))", {"gateway_tokens_total"}),
    ],
)
def test_variable_query_metric_names(query: str, names: set[str]) -> None:
    assert variable_query_metric_names(query) == names


def test_dashboard_metric_names_reads_panels_rows_and_variables(tmp_path: Path) -> None:
    doc = {
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "rate(a_total[5m])"}, {"expr": ""}]},
            {"type": "row", "collapsed": True, "panels": [{"targets": [{"expr": "b_bucket"}]}]},
            {"type": "text"},
        ],
        "templating": {
            "list": [
                {"type": "datasource", "query": "prometheus"},
                {"type": "query", "query": {"query": "label_values(c_total, tenant)"}},
                {"type": "query", "query": "label_values(d_total{x='1'}, model)"},
            ]
        },
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    assert dashboard_metric_names(path) == {"a_total", "b_bucket", "c_total", "d_total"}
    assert dashboard_metric_names(str(path)) == dashboard_metric_names(path)


# --- the dashboard ---------------------------------------------------------------------------


def test_dashboard_identity_and_variables() -> None:
    d = dashboard()
    assert d["uid"] == "llm-gateway" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41, "a schema current Grafana loads without migrating much"
    v = variables()
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    for name in ("tenant", "model"):
        var = v[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query == f"label_values(gateway_requests_total, {name})"
        assert var["includeAll"] is True and var["allValue"] == ".*", "All must match every series"
        assert var["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_panel_queries_the_datasource_variable(panel: dict[str, Any]) -> None:
    assert panel["type"] in ("timeseries", "stat")
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"], "a panel without a query shows nothing"
    for target in panel["targets"]:
        assert target["expr"].strip()
        assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    pos = panel["gridPos"]
    assert all(isinstance(pos[k], int) for k in ("h", "w", "x", "y"))
    assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24


def test_panel_ids_unique_and_no_panels_overlap() -> None:
    ps = panels()
    assert len({p["id"] for p in ps}) == len(ps)
    cells: dict[tuple[int, int], str] = {}
    for p in ps:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_queries_only_exported_metrics_and_all_of_them() -> None:
    queried = dashboard_metric_names(DASHBOARD)
    ours = {n for n in queried if not n.startswith("envoy_")}
    assert ours <= EXPORTED, f"not exported by the server: {sorted(ours - EXPORTED)}"
    assert "envoy_http_downstream_rq_total" in queried, "one panel shows Envoy's own view"
    families = {n.removesuffix(s) for n in ours for s in ("_bucket", "_sum", "_count") if n.endswith(s)} | ours
    missing = (HISTOGRAMS | COUNTERS_AND_GAUGES) - families
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_percentiles_are_taken_over_buckets_by_le() -> None:
    """histogram_quantile over a sum that drops `le` returns nothing, silently."""
    quantiles = [e for e in dashboard_exprs(dashboard()) if "histogram_quantile" in e]
    assert quantiles
    for expr in quantiles:
        by = re.search(r"sum by \(([^)]*)\)", expr)
        assert by and "le" in [s.strip() for s in by.group(1).split(",")], expr
        assert all(n.endswith("_bucket") for n in expr_metric_names(expr)), expr
    titles = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels()}
    ttft = next(exprs for title, exprs in titles.items() if "first token" in title.lower())
    assert [e.split(",")[0] for e in ttft] == [f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")]
    assert all("by (le, gen_ai_request_model)" in e for e in ttft)


def test_tenant_and_model_filters_apply() -> None:
    for expr in dashboard_exprs(dashboard()):
        if expr_metric_names(expr) & TENANT_MODEL_METRICS:
            assert 'tenant=~"$tenant"' in expr and 'model=~"$model"' in expr, expr
        elif any(n.startswith("gen_ai_") for n in expr_metric_names(expr)):
            assert 'gen_ai_request_model=~"$model"' in expr, expr


# --- Grafana provisioning, Prometheus, the collector ------------------------------------------


def test_grafana_datasource_is_the_dashboard_default_and_reaches_prometheus() -> None:
    sources = load_yaml(DATASOURCES)["datasources"]
    assert len(sources) == 1
    ds = sources[0]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert variables()["datasource"]["current"]["value"] == ds["uid"] == "prometheus"
    services = compose()["services"]
    host, port = host_port(ds["url"])
    # Prometheus lives in the envoy service's network namespace: its name is Prometheus's address.
    assert services["prometheus"]["network_mode"] == f"service:{host}"
    assert host_port(flag(services["prometheus"]["command"], "web.listen-address"))[1] == port
    assert f"{port}:{port}" in services[host]["ports"]
    assert ds["jsonData"]["timeInterval"] == load_yaml(PROMETHEUS)["global"]["scrape_interval"]


def test_grafana_provisioning_is_mounted_and_loads_the_dashboard() -> None:
    provider = load_yaml(PROVIDERS)["providers"][0]
    assert provider["type"] == "file"
    assert mounted_file("grafana", provider["options"]["path"]) / DASHBOARD.name == DASHBOARD
    assert mounted_file("grafana", "/etc/grafana/provisioning/datasources/prometheus.yaml") == DATASOURCES
    assert mounted_file("grafana", "/etc/grafana/provisioning/dashboards/dashboards.yaml") == PROVIDERS
    env = compose()["services"]["grafana"]["environment"]
    assert mounted_file("grafana", env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD


@pytest.mark.parametrize(
    ("job", "path", "port"),
    [("extproc", "/metrics", METRICS_PORT), ("envoy", "/stats/prometheus", None)],
)
def test_prometheus_scrapes_inside_the_pod(job: str, path: str, port: int | None) -> None:
    config = load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"extproc", "envoy", "ledger-consumer"}
    targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
    assert jobs[job].get("metrics_path", "/metrics") == path
    if port is None:  # Envoy's admin port, as envoy-compose.yaml binds it
        admin = envoyconf.load(ROOT / "envoy" / "envoy-compose.yaml")["admin"]["address"]["socket_address"]
        assert admin["address"] == "127.0.0.1", "admin reachable only inside the namespace"
        port = admin["port_value"]
    assert targets == [f"127.0.0.1:{port}"]
    prometheus = compose()["services"]["prometheus"]
    assert mounted_file("prometheus", flag(prometheus["command"], "config.file")) == PROMETHEUS


def test_prometheus_scrapes_the_compose_ledger_consumer() -> None:
    """A service of its own (outside the pod's namespace): by its compose name, on the port its
    --metrics-listen serves."""
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS)["scrape_configs"]}
    command = compose()["services"]["ledger-consumer"]["command"]
    _, port = host_port(command[command.index("--metrics-listen") + 1])
    assert [t for sc in jobs["ledger-consumer"]["static_configs"] for t in sc["targets"]] == [f"ledger-consumer:{port}"]


def test_compose_server_metrics_listen_is_what_prometheus_scrapes() -> None:
    gateway_yaml = mounted_file("extproc", "/etc/gateway/gateway.yaml")
    server = load_yaml(gateway_yaml).get("server") or {}
    _, port = host_port(server.get("metrics_listen", f"127.0.0.1:{METRICS_PORT}"))
    assert port == METRICS_PORT


def test_collector_pipeline_exports_to_jaeger_in_compose() -> None:
    config = load_yaml(COLLECTOR)
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), f"undefined {kind} in the traces pipeline"
    assert "batch" in pipeline["processors"] and {"otlp", "debug"} <= set(pipeline["exporters"])
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    otlp = config["exporters"]["otlp"]
    host, port = host_port(otlp["endpoint"])
    assert otlp["tls"]["insecure"] is True
    services = compose()["services"]
    assert host == "jaeger" and host in services and port == 4317, "Jaeger's OTLP gRPC port"
    assert services[host]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    collector = services["otel-collector"]
    assert mounted_file("otel-collector", flag(collector["command"], "config")) == COLLECTOR


def test_server_sends_traces_to_the_collector() -> None:
    services = compose()["services"]
    env = services["extproc"]["environment"]
    host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    receiver = load_yaml(COLLECTOR)["receivers"]["otlp"]["protocols"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert host in services and host_port(receiver["grpc"]["endpoint"])[1] == port
    assert env["OTEL_SERVICE_NAME"] == "llm-gateway-extproc"


@pytest.mark.parametrize(
    ("service", "port"),
    [("grafana", "3000:3000"), ("jaeger", "16686:16686"), ("envoy", "9090:9090")],
)
def test_compose_publishes_the_uis(service: str, port: str) -> None:
    assert port in compose()["services"][service]["ports"]


@pytest.mark.parametrize("service", sorted(compose()["services"]))
def test_compose_images_are_pinned(service: str) -> None:
    image = compose()["services"][service]["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), image
    assert re.search(r"\d", tag), f"{image}: pin a version"


def test_observability_mounts_exist() -> None:
    for service in ("prometheus", "grafana", "otel-collector"):
        assert mounts(service), service
        for src in mounts(service).values():
            assert src.exists(), f"{service}: {src}"
    assert compose()["services"]["grafana"]["depends_on"] == ["prometheus"]


# --- Kubernetes ------------------------------------------------------------------------------


def test_pod_is_annotated_for_scraping() -> None:
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }


def test_extproc_probes_use_the_metrics_port() -> None:
    ext = containers()["extproc"]
    ports = {p["name"]: p["containerPort"] for p in ext["ports"]}
    assert ports["metrics"] == METRICS_PORT
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = ext[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "metrics"), probe
    assert ext["readinessProbe"]["periodSeconds"] < ext["livenessProbe"]["periodSeconds"]
    for container in containers().values():
        assert "livenessProbe" in container and "readinessProbe" in container, container["name"]


def test_k8s_metrics_listen_is_reachable_by_the_kubelet() -> None:
    server = load_yaml(K8S / "gateway.yaml")["server"]
    assert host_port(server["metrics_listen"]) == ("0.0.0.0", METRICS_PORT), "probes hit the pod IP"


def test_service_monitor_selects_the_service_metrics_port() -> None:
    path = K8S / "servicemonitor.yaml"
    assert path.name not in load_yaml(K8S / "kustomization.yaml")["resources"], "needs the operator's CRDs"
    assert "Prometheus Operator" in path.read_text().split("apiVersion")[0]
    monitor = load_yaml(path)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        d for d in k8s_docs() if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["llm-gateway"]
    service_ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for c in containers().values() for p in c["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        port = service_ports[endpoint["port"]]
        assert container_ports[port["targetPort"]] == port["port"]
    endpoint = next(e for e in monitor["spec"]["endpoints"] if e["port"] == "metrics")
    assert service_ports["metrics"]["port"] == METRICS_PORT and endpoint["path"] == "/metrics"
