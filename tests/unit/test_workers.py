"""Worker processes: how many, where each listens, how their metrics add up, what config refuses."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import ConfigError, GatewayConfig, ServerConfig
from extproc.observability.aggregate import merge
from extproc.workers import available_cores, cgroup_cpu_limit, to_shed, worker_count

PROVIDERS: dict[str, Any] = {"openai": {"schema": "openai", "api_key_env": "K"}}


def gateway(store: str = "redis", **server: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({"providers": PROVIDERS, "store": {"backend": store}, "server": server})


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], want: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == want


@pytest.mark.parametrize(("quota", "cap"), [("max 100000", 10_000), ("150000 100000", 2), ("50000 100000", 1)])
def test_available_cores_is_affinity_capped_by_quota_rounded_up(tmp_path: Path, quota: str, cap: int) -> None:
    (tmp_path / "cpu.max").write_text(quota)
    import os

    assert available_cores(tmp_path) == min(len(os.sched_getaffinity(0)), cap)


@pytest.mark.parametrize(
    ("store", "server", "override", "want"),
    [
        ("embedded", {}, None, 1),  # auto with the embedded store: one process
        ("embedded", {"workers": 1}, None, 1),
        ("redis", {"workers": 3}, None, 3),
        ("redis", {"workers": 3}, 2, 2),  # --workers wins
        ("redis", {}, "auto", "cores"),
        ("redis", {}, None, "cores"),
    ],
)
def test_worker_count(store: str, server: dict[str, Any], override: Any, want: Any) -> None:
    n = worker_count(gateway(store, **server), override)
    assert n == (available_cores() if want == "cores" else want)


@pytest.mark.parametrize(
    ("store", "server", "override", "message"),
    [
        ("embedded", {}, 2, "server.workers: 2 workers need store.backend redis"),
        ("redis", {}, 65, "--workers: expected 1 to 64"),
        ("redis", {}, 0, "--workers: expected 1 to 64"),
    ],
)
def test_worker_count_refusals(store: str, server: dict[str, Any], override: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        worker_count(gateway(store, **server), override)


@pytest.mark.parametrize(
    ("store", "server", "message"),
    [
        ("embedded", {"workers": 2}, "server.workers: 2 workers need store.backend redis"),
        ("redis", {"workers": 0}, "expected 1 to 64 or 'auto'"),
        ("redis", {"workers": 65}, "expected 1 to 64 or 'auto'"),
        ("redis", {"workers": "many"}, "workers"),
        ("redis", {"worker_listen": "ports"}, "set a number with worker_listen: ports"),
        ("redis", {"worker_listen": "fork"}, "worker_listen"),
    ],
)
def test_config_refusals(store: str, server: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gateway(store, **server)


@pytest.mark.parametrize(
    ("listen", "mode", "n", "want"),
    [
        ("127.0.0.1:50051", "reuse_port", 1, ["127.0.0.1:50051"]),
        ("127.0.0.1:50051", "reuse_port", 3, ["127.0.0.1:50051"] * 3),
        ("127.0.0.1:50051", "ports", 3, ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]),
        ("[::1]:7000", "ports", 2, ["[::1]:7000", "[::1]:7001"]),
        ("unix:/run/x.sock", "ports", 2, ["unix:/run/x.sock.0", "unix:/run/x.sock.1"]),
        ("unix:/run/x.sock", "reuse_port", 1, ["unix:/run/x.sock"]),
    ],
)
def test_worker_addresses(listen: str, mode: str, n: int, want: list[str]) -> None:
    workers = n if mode == "ports" else "auto"
    assert ServerConfig(listen=listen, worker_listen=mode, workers=workers).worker_addresses(n) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("listen", "mode", "n", "message"),
    [
        ("unix:/run/x.sock", "reuse_port", 2, "cannot share a unix socket"),
        ("127.0.0.1:0", "reuse_port", 2, "need a fixed port"),
        ("127.0.0.1:0", "ports", 2, "need a fixed port"),
        ("127.0.0.1:65535", "ports", 2, "do not exist"),
    ],
)
def test_worker_address_refusals(listen: str, mode: str, n: int, message: str) -> None:
    server = ServerConfig(listen=listen, worker_listen=mode, workers=n)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        server.worker_addresses(n)


def test_config_survives_the_trip_to_a_spawned_worker() -> None:
    config = gateway(workers=2)
    again = pickle.loads(pickle.dumps(config))
    assert again == config and again.base_dir == config.base_dir


W0 = """# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{model="gpt-5",status="200"} 3.0
gateway_requests_total{model="a\\"b\\\\c\\nd",status="200"} 1.0
gateway_requests_created{model="gpt-5",status="200"} 1000.0
# HELP gateway_requests_in_flight In flight.
# TYPE gateway_requests_in_flight gauge
gateway_requests_in_flight 2.0
# HELP gateway_usage_spool_bytes Spool.
# TYPE gateway_usage_spool_bytes gauge
gateway_usage_spool_bytes 100.0
# HELP gateway_ledger_backlog_records Backlog.
# TYPE gateway_ledger_backlog_records gauge
gateway_ledger_backlog_records 40.0
# HELP gateway_build_info Build.
# TYPE gateway_build_info gauge
gateway_build_info{version="0.1.0"} 1.0
# HELP gen_ai_client_token_usage Tokens.
# TYPE gen_ai_client_token_usage histogram
gen_ai_client_token_usage_bucket{gen_ai_token_type="input",le="1.0"} 0.0
gen_ai_client_token_usage_bucket{gen_ai_token_type="input",le="+Inf"} 2.0
gen_ai_client_token_usage_sum{gen_ai_token_type="input"} 30.0
gen_ai_client_token_usage_count{gen_ai_token_type="input"} 2.0
"""
W1 = """# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{model="gpt-5",status="200"} 4.0
gateway_requests_total{model="gpt-5",status="429"} 1.0
gateway_requests_created{model="gpt-5",status="200"} 900.0
# HELP gateway_requests_in_flight In flight.
# TYPE gateway_requests_in_flight gauge
gateway_requests_in_flight 5.0
# HELP gateway_usage_spool_bytes Spool.
# TYPE gateway_usage_spool_bytes gauge
gateway_usage_spool_bytes 120.0
# HELP gateway_ledger_backlog_records Backlog.
# TYPE gateway_ledger_backlog_records gauge
gateway_ledger_backlog_records 42.0
# HELP gateway_build_info Build.
# TYPE gateway_build_info gauge
gateway_build_info{version="0.1.0"} 1.0
# HELP gen_ai_client_token_usage Tokens.
# TYPE gen_ai_client_token_usage histogram
gen_ai_client_token_usage_bucket{gen_ai_token_type="input",le="1.0"} 1.0
gen_ai_client_token_usage_bucket{gen_ai_token_type="input",le="+Inf"} 3.0
gen_ai_client_token_usage_sum{gen_ai_token_type="input"} 12.0
gen_ai_client_token_usage_count{gen_ai_token_type="input"} 3.0
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def s(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.mark.parametrize(
    ("key", "want"),
    [
        (s("gateway_requests_total", model="gpt-5", status="200"), 7.0),  # counters: sum
        (s("gateway_requests_total", model="gpt-5", status="429"), 1.0),  # only in one worker
        (s("gateway_requests_total", model='a"b\\c\nd', status="200"), 1.0),  # escaping survives
        (s("gateway_requests_created", model="gpt-5", status="200"), 900.0),  # created: the earliest
        (s("gateway_requests_in_flight"), 7.0),  # gauges: sum
        (s("gateway_usage_spool_bytes"), 120.0),  # one shared directory: max
        (s("gateway_ledger_backlog_records"), 42.0),  # Redis' streams, measured by each worker: max
        (s("gateway_build_info", version="0.1.0"), 1.0),
        (s("gen_ai_client_token_usage_bucket", gen_ai_token_type="input", le="1.0"), 1.0),  # histograms: sum
        (s("gen_ai_client_token_usage_bucket", gen_ai_token_type="input", le="+Inf"), 5.0),
        (s("gen_ai_client_token_usage_sum", gen_ai_token_type="input"), 42.0),
        (s("gen_ai_client_token_usage_count", gen_ai_token_type="input"), 5.0),
    ],
)
def test_merge(key: tuple[str, frozenset[tuple[str, str]]], want: float) -> None:
    assert samples(merge([W0, W1]).decode())[key] == want


def test_merge_keeps_types_help_and_extra_families() -> None:
    from prometheus_client.metrics_core import GaugeMetricFamily

    text = merge([W0, W1], [GaugeMetricFamily("gateway_workers", "Workers.", value=2)]).decode()
    assert "# TYPE gateway_requests_total counter" in text
    assert "# TYPE gen_ai_client_token_usage histogram" in text
    assert "# HELP gateway_requests_in_flight In flight." in text
    assert samples(text)[s("gateway_workers")] == 2.0
    assert merge([W0]).decode() == merge([W0, ""]).decode()  # a worker with nothing yet adds nothing


def r(opened: int, active: int) -> dict[str, int]:
    return {"opened": opened, "active": active}


@pytest.mark.parametrize(
    ("reports", "want"),
    [
        ([r(100, 2), r(0, 0)], 0),  # both of Envoy's connections on worker 0
        ([r(0, 0), r(100, 2)], 1),
        ([r(100, 1), r(0, 0)], None),  # its only connection: moving it moves the imbalance
        ([r(50, 1), r(50, 1)], None),  # even
        ([r(70, 2), r(30, 1)], None),  # within 1.5x of the fair share (75 of 100)
        ([r(80, 2), r(20, 1)], 0),
        ([r(20, 2), r(0, 0)], None),  # too few streams to judge
        ([r(60, 2), r(20, 1), r(20, 1)], 0),  # three workers: fair share 33, 1.5x = 50
        ([r(100, 2), None], None),  # a worker not answering: wait
        ([], None),
    ],
)
def test_which_worker_sheds_a_connection(reports: list[dict[str, int] | None], want: int | None) -> None:
    assert to_shed(reports) == want
