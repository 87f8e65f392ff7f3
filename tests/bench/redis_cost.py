"""What each request costs Redis: commands per request and Redis CPU (INFO commandstats), for a key
without limits and for a key with every limit of tests/bench/bench_limits.py (5 checks, two
budgets), at 16 connections through the full gateway.

    .venv/bin/python tests/bench/redis_cost.py [--duration 5]

Why: on a small machine Redis shares the cores with Envoy and the server, so its CPU per request
is part of the gateway's throughput; Lua scripts run in Redis' only thread. Prints a table per key.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from redis import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import CHAT, start_redis, wrk  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

TENANT_LIMITS = ["--rpm", "1000000000", "--tpm", "1000000000000", "--budget-usd", "999999999"]
KEY_LIMITS = ["--rpm", "1000000000", "--concurrency", "1000000", "--budget-tokens", "1000000000000"]


def cpu_seconds(client: Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="redis-cost-"))
    redis, url = start_redis()
    stack, admin = make_stack(work, url)
    try:
        free, _ = admin.key("bench-free", "free")
        limited, key = admin.key("bench-limited", "limited")
        for scope, flags in ((["--tenant", "bench-limited"], TENANT_LIMITS), (["--key", key.id], KEY_LIMITS)):
            done = admin.cli("limits", "set", *scope, *flags)
            assert done.returncode == 0, done.stderr
        stack.start()
        client = Redis.from_url(url)
        chat = stack.base_url + "/v1/chat/completions"
        for name, secret in (("key without limits", free), ("key with all limits", limited)):
            wrk(chat, CHAT, 16, 2, {"Authorization": f"Bearer {secret}"})  # warm-up
            client.config_resetstat()
            cpu0 = cpu_seconds(client)
            r = wrk(chat, CHAT, 16, args.duration, {"Authorization": f"Bearer {secret}"})
            n = r["rps"] * args.duration
            total = (cpu_seconds(client) - cpu0) / n * 1e6
            stats = client.info("commandstats")
            print(f"\n{name}: {r['rps']:.0f} req/s, Redis CPU {total:.0f} µs per request (its process)")
            print("(evalsha's time includes the commands its script runs, which are also listed)")
            print("| command | calls per request | µs per call | µs per request |\n|---|---:|---:|---:|")
            for cmd, s in sorted(stats.items(), key=lambda kv: -kv[1]["usec"]):
                if s["usec"] / n >= 0.5:
                    name_ = cmd.removeprefix("cmdstat_")
                    print(f"| {name_} | {s['calls'] / n:.2f} | {s['usec_per_call']:.1f} | {s['usec'] / n:.1f} |")
    finally:
        stack.stop()
        redis.terminate()


if __name__ == "__main__":
    main()
