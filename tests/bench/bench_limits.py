"""What the limit check costs per request: the same gateway, the same run, a key without limits vs a
key whose every limit applies (tenant: requests and tokens per minute, a USD budget; key: requests per
minute, concurrency, a token budget; all far above what the run uses, so nothing is refused). The
shared Redis backend (a redis-server of this script's own), as replicas run it: one script round trip
to acquire, one to settle.

  A   Envoy alone (the ext_proc filter removed), for scale
  B   gateway, key without limits
  L   gateway, key with limits
  R   gateway, a key whose tenant has only requests and tokens per minute (two rate checks, no
      budget, no concurrency: what most tenants set), for comparison; the floors are judged on L

wrk, non-streamed chat JSON: added p50 / p99 at 1 connection and req/s at 16 connections, B, L and
R in rotating order in each of --repeats rounds, medians reported; server CPU per request from
/proc/<pid>/stat over each run. Run by hand (not part of the test suite); needs wrk:

    .venv/bin/python tests/bench/bench_limits.py [--duration 8] [--repeats 3]

Floors (issue: quotas): L - B <= 0.3 ms p50 at 1 connection; L >= 0.9 x B req/s at 16 connections.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.devstack import stop_process  # noqa: E402
from tests.bench.bench_gateway import CHAT, start_envoy_alone, start_redis, wrk  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, make_stack  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def measure(pid: int, url: str, key: str, conns: int, duration: int) -> dict[str, float]:
    before = cpu_seconds(pid)
    r = wrk(url, CHAT, conns, duration, {"Authorization": f"Bearer {key}"})
    used = cpu_seconds(pid) - before
    r["cpu_us"] = used / (r["rps"] * duration) * 1e6
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    redis, redis_url = start_redis()
    stack, admin = make_stack(work, redis_url)
    free_key, _ = admin.key("bench-free", "free")
    limited, limited_key = admin.key("bench-limited", "limited")
    rated, _ = admin.key("bench-rated", "rated")
    done = admin.cli("limits", "set", "--tenant", "bench-rated", "--rpm", "1000000000", "--tpm", "1000000000000")
    assert done.returncode == 0, done.stderr
    for scope in (["--tenant", "bench-limited"], ["--key", limited_key.id]):
        flags = (
            ["--rpm", "1000000000", "--tpm", "1000000000000", "--budget-usd", "999999999"]
            if scope[0] == "--tenant"
            else ["--rpm", "1000000000", "--concurrency", "1000000", "--budget-tokens", "1000000000000"]
        )
        done = admin.cli("limits", "set", *scope, *flags)
        assert done.returncode == 0, done.stderr
    stack.start()
    server_pid = stack.procs["server"].pid
    alone, alone_ports = start_envoy_alone(work, stack.ports.mock)
    url = stack.base_url + "/v1/chat/completions"
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        alone_url = f"http://127.0.0.1:{alone_ports.listener}/v1/chat/completions"
        provider = PROVIDER_KEYS["OPENAI_API_KEY"]
        for conns in (1, 16):
            for key in (free_key, limited, rated):
                measure(server_pid, url, key, conns, 2)  # warm-up
            for rnd in range(args.repeats):
                order = [("B", free_key), ("L", limited), ("R", rated)]
                order = order[rnd % 3 :] + order[: rnd % 3]
                results.setdefault(("A", conns), []).append(
                    wrk(alone_url, CHAT, conns, args.duration, {"Authorization": f"Bearer {provider}"})
                )
                for name, key in order:
                    results.setdefault((name, conns), []).append(measure(server_pid, url, key, conns, args.duration))
                time.sleep(1)
        shown = admin.cli("limits", "show", "--key", limited_key.id)
        print(shown.stdout)
    finally:
        stop_process(alone)
        stack.stop()
        redis.terminate()
        redis.wait(10)

    def med(name: str, conns: int, field: str) -> float:
        return statistics.median(r[field] for r in results[(name, conns)])

    print(f"medians of {args.repeats} rounds, {args.duration} s each (2-core machine, everything on it)\n")
    print("| | req/s (1 conn) | p50 / p99 ms (1 conn) | req/s (16 conns) | p50 ms (16) | server CPU µs/req (16) |")
    print("|---|---|---|---|---|---|")
    for name, label in (
        ("A", "A Envoy alone"),
        ("B", "B gateway, no limits"),
        ("L", "L gateway, all limits"),
        ("R", "R gateway, tenant rpm + tpm only"),
    ):
        cpu = "-" if name == "A" else f"{med(name, 16, 'cpu_us'):.0f}"
        print(
            f"| {label} | {med(name, 1, 'rps'):.0f} | {med(name, 1, 'p50'):.2f} / {med(name, 1, 'p99'):.2f} | "
            f"{med(name, 16, 'rps'):.0f} | {med(name, 16, 'p50'):.2f} | {cpu} |"
        )
    added_p50 = med("L", 1, "p50") - med("B", 1, "p50")
    ratio = med("L", 16, "rps") / med("B", 16, "rps")
    cpu_added = med("L", 16, "cpu_us") - med("B", 16, "cpu_us")
    p50_verdict = "met" if added_p50 <= 0.3 else "NOT met"
    rps_verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"\nlimits add {added_p50:+.2f} ms p50 at 1 connection (floor <= 0.3: {p50_verdict})")
    print(f"throughput with limits {ratio:.2f} x without at 16 connections (floor >= 0.90: {rps_verdict})")
    print(f"server CPU added per request: {cpu_added:+.0f} µs")
    r_p50 = med("R", 1, "p50") - med("B", 1, "p50")
    r_ratio = med("R", 16, "rps") / med("B", 16, "rps")
    r_cpu = med("R", 16, "cpu_us") - med("B", 16, "cpu_us")
    print(f"tenant rpm + tpm only (R): {r_p50:+.2f} ms p50 at 1 connection, {r_ratio:.2f} x at 16, {r_cpu:+.0f} µs CPU")
    summary: dict[str, Any] = {
        "added_p50_ms": added_p50,
        "rps_ratio_16": ratio,
        "cpu_added_us": cpu_added,
        "rate_only": {"added_p50_ms": r_p50, "rps_ratio_16": r_ratio, "cpu_added_us": r_cpu},
    }
    print(summary)


if __name__ == "__main__":
    main()
