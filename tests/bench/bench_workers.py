"""`extproc serve --workers N`: throughput by worker count, and how evenly each way of sharing the
address spreads the load, against Envoy alone in the same run.

    .venv/bin/python tests/bench/bench_workers.py [--duration 5] [--repeats 3] [--trials 6] [--out DIR]

Stacks (full pipeline on one Redis, tenant with limits that never refuse, as tests/bench/suite.py's B;
all running at once, measured in alternating order so drift hits them alike):

  A    Envoy alone (the shipped envoy.yaml without ext_proc), the same mock upstream;
  W1   one server process;
  W2r  two workers sharing the port (server.worker_listen: reuse_port, envoy.yaml unchanged);
  W2p  two workers on two ports, two endpoints of the extproc cluster (worker_listen: ports).

Figures: req/s and p50/p99 at 16 and 64 connections (wrk -t1), the server's CPU per request (all
workers' /proc/<pid>/stat), and each worker's share of the requests (its own /metrics). The
reuse_port spread depends on which worker the kernel hands each of Envoy's few HTTP/2 connections
when Envoy opens them, so --trials restarts that stack's Envoy and server several times and reports
the share worker 0 got in each trial: in the first 2 s (as the kernel dealt Envoy's connections)
and after 8 s (the supervisor's rebalancing has had time to act).

Prints Markdown and writes DIR/bench-workers.json. Needs wrk and redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc import envoyconf  # noqa: E402
from extproc.devstack import Stack, free_port, free_ports_run, http_ok, stop_process, wait_until  # noqa: E402
from tests.bench.bench_gateway import start_envoy_alone, start_redis, wrk  # noqa: E402
from tests.bench.bench_pii import cpu_seconds  # noqa: E402
from tests.bench.suite import BODY, OVERRIDES, PATH, orders  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, make_stack  # noqa: E402


def worker_pids(stack: Stack) -> list[int]:
    status = httpx.get(f"http://127.0.0.1:{stack.ports.metrics}/status", timeout=5).json()
    if "workers" in status:
        return [int(w["pid"]) for w in status["workers"]]
    return [stack.procs["server"].pid]


def worker_requests(stack: Stack) -> list[float]:
    """Requests each worker has handled so far (its own ops port; one process: the stack's)."""
    status = httpx.get(f"http://127.0.0.1:{stack.ports.metrics}/status", timeout=5).json()
    ports = [w["ops_port"] for w in status["workers"]] if "workers" in status else [stack.ports.metrics]
    out = []
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        out.append(
            sum(
                s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
                if s.name == "gateway_requests_total"
            )
        )
    return out


def start_stack(out: Path, name: str, redis_url: str, mock_port: int, workers: int, mode: str) -> tuple[Stack, str]:
    extproc = free_ports_run(workers) if mode == "ports" else free_port()
    ports = envoyconf.LocalPorts(
        listener=free_port(), admin=free_port(), extproc=extproc, mock=mock_port, metrics=free_port()
    )
    overrides = {**OVERRIDES, "server": {"workers": workers, "worker_listen": mode}}
    stack, admin = make_stack(
        out / name,
        redis_url,
        prefix=f"bw{uuid.uuid4().hex[:6]}:",
        overrides=overrides,
        ports=ports,
        with_mock=False,
        workers=workers,
        extproc_endpoints=workers if mode == "ports" else 1,
    )
    key, _ = admin.key("bench", name)
    stack.start()
    return stack, key


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far (/proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def measure(stack: Stack | None, url: str, headers: dict[str, str], conns: int, duration: int) -> dict[str, Any]:
    pids = worker_pids(stack) if stack else []
    cpu0 = sum(cpu_seconds(p) for p in pids)
    req0 = worker_requests(stack) if stack else []
    busy0, all0 = machine_busy()
    r: dict[str, Any] = wrk(url, BODY, conns, duration, headers)
    busy1, all1 = machine_busy()
    r["machine_busy"] = (busy1 - busy0) / max(all1 - all0, 1)
    if stack:
        r["cpu_us"] = (sum(cpu_seconds(p) for p in pids) - cpu0) / max(r["rps"] * duration, 1) * 1e6
        grew = [a - b for a, b in zip(worker_requests(stack), req0, strict=True)]
        r["share"] = [g / max(sum(grew), 1) for g in grew]
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=6, help="reuse_port restarts for the spread")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs: list[subprocess.Popen[Any]] = []
    stacks: dict[str, Stack] = {}
    keys: dict[str, str] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    trials: list[list[float]] = []
    try:
        redis, redis_url = start_redis()
        procs.append(redis)
        mock_port = free_port()
        mock = subprocess.Popen(
            [sys.executable, "-m", "extproc", "mock-provider", "--port", str(mock_port)],
            env={**os.environ, "MOCK_OPENAI_KEY": PROVIDER_KEYS["OPENAI_API_KEY"]},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(mock)
        wait_until("mock", lambda: http_ok(f"http://127.0.0.1:{mock_port}/_mock/health"), [mock], 30)
        alone, alone_ports = start_envoy_alone(out, mock_port)
        procs.append(alone)
        for name, workers, mode in (("W1", 1, "reuse_port"), ("W2r", 2, "reuse_port"), ("W2p", 2, "ports")):
            stacks[name], keys[name] = start_stack(out, name, redis_url, mock_port, workers, mode)
        provider = {"Authorization": f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"}

        def target(name: str) -> tuple[Stack | None, str, dict[str, str]]:
            if name == "A":
                return None, f"http://127.0.0.1:{alone_ports.listener}{PATH}", provider
            s = stacks[name]
            return s, s.base_url + PATH, {"Authorization": f"Bearer {keys[name]}"}

        names = ["A", "W1", "W2r", "W2p"]
        for conns in (16, 64):
            fig = f"c{conns}"
            results[fig] = {n: [] for n in names}
            for n in names:
                measure(*target(n), conns, 1)  # warm-up
            for order in orders(names, args.repeats):
                for n in order:
                    r = measure(*target(n), conns, args.duration)
                    results[fig][n].append(r)
                    share = " ".join(f"{x:.2f}" for x in r.get("share", []))
                    print(f"{fig} {n:4} {r['rps']:8.0f} req/s p50 {r['p50']:6.2f} p99 {r['p99']:6.2f} shares {share}")
        # The reuse_port spread over restarts of that stack's Envoy and server.
        for i in range(args.trials):
            s = stacks.pop("W2r")
            s.stop()
            stacks["W2r"], keys["W2r"] = start_stack(out, f"W2r-{i}", redis_url, mock_port, 2, "reuse_port")
            first = measure(*target("W2r"), 16, 2)  # as the kernel dealt Envoy's connections
            measure(*target("W2r"), 16, 6)  # the supervisor rebalances meanwhile
            r = measure(*target("W2r"), 16, 3)
            trials.append([first["share"][0], r["share"][0]])
            print(
                f"reuse_port trial {i}: worker 0's share first {first['share'][0]:.2f}, after 8 s {r['share'][0]:.2f}"
            )
    finally:
        for s in stacks.values():
            s.stop()
        for p in procs:
            stop_process(p)

    def med(fig: str, n: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[fig][n]))

    lines = [
        "| stack | c16 req/s | c16 p50 / p99 ms | c64 req/s | c64 p50 / p99 ms "
        "| server CPU µs/req (c16) | machine busy (c16) | worker shares (c16) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "A": "A Envoy alone",
        "W1": "W1 one process",
        "W2r": "W2r 2 workers, reuse_port",
        "W2p": "W2p 2 workers, ports",
    }
    for n in ("A", "W1", "W2r", "W2p"):
        cpu = f"{med('c16', n, 'cpu_us'):.0f}" if n != "A" else "-"
        shares = "-"
        if n != "A":
            per_run = [r["share"] for r in results["c16"][n]]
            shares = "; ".join("/".join(f"{x:.2f}" for x in s) for s in per_run)
        lines.append(
            f"| {labels[n]} | {med('c16', n, 'rps'):.0f} | {med('c16', n, 'p50'):.2f} / {med('c16', n, 'p99'):.2f} | "
            f"{med('c64', n, 'rps'):.0f} | {med('c64', n, 'p50'):.2f} / {med('c64', n, 'p99'):.2f} | {cpu} | "
            f"{med('c16', n, 'machine_busy'):.0%} | {shares} |"
        )
    for fig in ("c16", "c64"):
        w1 = med(fig, "W1", "rps")
        lines.append(
            f"\n{fig}: W2r/W1 = {med(fig, 'W2r', 'rps') / w1:.2f}x, W2p/W1 = {med(fig, 'W2p', 'rps') / w1:.2f}x, "
            f"A/W1 = {med(fig, 'A', 'rps') / w1:.1f}x"
        )
    lines.append(
        f"\nreuse_port, worker 0's share of the requests in the first 2 s after a restart -> 8 s later, "
        f"over {len(trials)} restarts: " + ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in trials)
    )
    report = "\n".join(lines)
    print(report)
    (out / "bench-workers.json").write_text(
        json.dumps({"argv": sys.argv, "date": time.ctime(), "results": results, "reuse_port_trials": trials}, indent=2)
    )
    print(f"wrote {out / 'bench-workers.json'}")


if __name__ == "__main__":
    main()
