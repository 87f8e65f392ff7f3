"""The shipped Envoy configs are valid for Envoy 1.40 and consistent with gateway.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from extproc import envoyconf
from extproc.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [*sorted((ROOT / "envoy").glob("*.yaml")), ROOT / "k8s" / "envoy.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_envoy_validates_shipped_config(path: Path) -> None:
    out = subprocess.run(
        [envoyconf.envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


@pytest.mark.parametrize("flavor", envoyconf.FLAVORS, ids=lambda f: f.path)
def test_derived_configs_are_up_to_date(flavor: envoyconf.Flavor) -> None:
    prod = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    assert (ROOT / flavor.path).read_text() == envoyconf.render_flavor(prod, flavor), (
        "regenerate: extproc envoy-config --write"
    )


def test_derivation_only_touches_endpoints() -> None:
    prod = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    local = envoyconf.derive_local(
        prod, envoyconf.LocalPorts(listener=1, admin=2, extproc=3, mock=4), keep_tracing=True
    )
    # Routes, filters, access logs and tracing are exactly what ops ship.
    assert (
        local["static_resources"]["listeners"][0]["filter_chains"]
        == prod["static_resources"]["listeners"][0]["filter_chains"]
    )
    clusters = envoyconf.clusters(local)
    assert "transport_socket" not in clusters["openai"]
    assert clusters["openai"]["outlier_detection"] == envoyconf.clusters(prod)["openai"]["outlier_detection"]
    endpoint = clusters["anthropic"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 4
    real = envoyconf.derive_local(prod, envoyconf.LocalPorts(), real_providers=frozenset({"openai"}))
    assert envoyconf.clusters(real)["openai"]["transport_socket"]["typed_config"]["sni"] == "api.openai.com"


def test_provider_routes_and_ext_proc_settings() -> None:
    cfg = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    assert envoyconf.provider_clusters(cfg) == {"openai": "openai", "anthropic": "anthropic"}
    hcm = next(envoyconf._hcms(cfg))
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[-1] == "envoy.filters.http.router"
    ext = hcm["http_filters"][names.index("envoy.filters.http.ext_proc")]
    conf = ext["typed_config"]
    assert conf["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert conf["processing_mode"]["response_body_mode"] == "NONE"
    assert conf["allow_mode_override"] is True
    assert conf["failure_mode_allow"] is False
    assert conf["metadata_options"]["receiving_namespaces"]["untyped"] == ["gateway"]
    body_limit = envoyconf.request_body_limit(hcm)
    assert body_limit is not None and body_limit >= 4 * 1024 * 1024
    assert names.index("envoy.filters.http.buffer") < names.index("envoy.filters.http.ext_proc")
    assert load_config(ROOT / "gateway.yaml").server.max_message_bytes > body_limit, "gRPC limit must exceed it"


def test_memory_bounds_follow_the_sizing_rule() -> None:
    """Per-connection buffers stay small (they also hold responses a slow client does not read),
    and the overload manager's heap limit is 75% of the Envoy container's memory limit."""
    cfg = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    assert cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] <= 1024 * 1024
    monitors = {m["name"]: m["typed_config"] for m in cfg["overload_manager"]["resource_monitors"]}
    heap = monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]
    actions = {a["name"] for a in cfg["overload_manager"]["actions"]}
    assert {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.reset_high_memory_stream",
        "envoy.overload_actions.stop_accepting_requests",
    } <= actions
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]
    deployment = yaml.safe_load((ROOT / "k8s" / "deployment.yaml").read_text())
    envoy = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy")
    limit = envoy["resources"]["limits"]["memory"]
    units = {"Mi": 1024**2, "Gi": 1024**3}
    assert limit[-2:] in units
    assert heap == int(limit[:-2]) * units[limit[-2:]] * 3 // 4


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "check", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_check_command_ok_and_failures(tmp_path: Path) -> None:
    ok = run_check()
    assert ok.returncode == 0, ok.stderr
    assert "openai -> cluster openai" in ok.stdout
    extra = tmp_path / "g.yaml"
    extra.write_text(
        "providers:\n  openai: {schema: openai}\n  mistral: {schema: openai}\n"
        "models:\n  - {name: m, provider: mistral}\n"
    )
    bad = run_check("--config", str(extra))
    assert bad.returncode == 1
    assert "provider 'mistral': no route in envoy.yaml matches header x-gateway-provider: mistral" in bad.stderr
    broken = tmp_path / "b.yaml"
    broken.write_text("providers: {openai: {schema: nope}}\n")
    res = run_check("--config", str(broken))
    assert res.returncode == 2 and "providers.openai.schema" in res.stderr


def test_check_detects_missing_cluster() -> None:
    cfg = envoyconf.load(ROOT / "envoy" / "envoy.yaml")
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"] if c["name"] != "anthropic"]
    gw = parse_config({"providers": {"openai": {"schema": "openai"}, "anthropic": {"schema": "anthropic"}}})
    assert envoyconf.check(gw, cfg) == [
        "provider 'anthropic': route points at cluster 'anthropic', which is not defined"
    ]
