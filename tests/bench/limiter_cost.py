"""The Redis limiter alone: CPU of this process (the client side) and of Redis per request, for the
limits of bench_limits.py's L and R keys, at 1 and at 16 requests in flight.

No Envoy, no ext_proc server: each request is what LimitsStage asks of the limiter (acquire, the
end of the response, settle in finish), against a redis-server of this script's own, so the
figures move only with the limiter and its scripts (the whole-stack benches swing by 2-4x between
runs on the shared 2-core machine). CPU from /proc for Redis and process_time for the client,
medians of --repeats rounds of --requests requests each.

  L  tenant: requests + tokens per minute, a USD budget; key: requests per minute, concurrency,
     a token budget (6 checks)
  R  tenant: requests + tokens per minute

    .venv/bin/python tests/bench/limiter_cost.py [--requests 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.limits.engine import Demand, plan  # noqa: E402
from extproc.limits.redis import RedisLimiter  # noqa: E402
from extproc.limits.spec import Rule  # noqa: E402
from extproc.store.redis import RedisBackend  # noqa: E402
from tests.bench.bench_gateway import start_redis  # noqa: E402
from tests.bench.bench_limits import cpu_seconds  # noqa: E402

RULES = {
    "L": (
        Rule("t", "tenant", "", "", 0, rpm=10**9, tpm=10**12, budget_pusd=10**20, alert_at=(0.8, 1.0)),
        Rule("t", "key", "k1", "", 0, rpm=10**9, concurrency=10**6, budget_tokens=10**12, alert_at=(0.8, 1.0)),
    ),
    "R": (Rule("t2", "tenant", "", "", 0, rpm=10**9, tpm=10**12),),
}
# Estimates (a 4,096-token max_tokens default) and what the requests used.
ESTIMATE, USED = (4116, 10**6), (30, 3 * 10**4)


async def run(
    url: str, redis_pid: int, requests: int, repeats: int
) -> dict[tuple[str, int], list[tuple[float, float]]]:
    backend = RedisBackend(url, prefix="bench:")
    limiter = RedisLimiter(backend)

    async def worker(rules: tuple[Rule, ...], n: int) -> None:
        for _ in range(n):
            d = Demand(uuid.uuid4().hex, rules[0].tenant, plan(rules, *ESTIMATE), *ESTIMATE)
            assert (await limiter.acquire(d)).allowed
            await limiter.ended(d, *USED)
            await limiter.settle(d, *USED)

    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for rules in RULES.values():  # warm-up: scripts loaded, period totals started
            await worker(rules, 50)
        for _ in range(repeats):
            for name, rules in RULES.items():
                for conc in (1, 16):
                    c0, r0 = time.process_time(), cpu_seconds(redis_pid)
                    await asyncio.gather(*(worker(rules, requests // conc) for _ in range(conc)))
                    await asyncio.sleep(0.05)  # deferred settlements go out (counted)
                    client = (time.process_time() - c0) / requests * 1e6
                    server = (cpu_seconds(redis_pid) - r0) / requests * 1e6
                    out.setdefault((name, conc), []).append((client, server))
    finally:
        await limiter.close()
        await backend.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    redis, url = start_redis()
    try:
        results = uvloop.run(run(url, redis.pid, args.requests, args.repeats))
    finally:
        redis.terminate()
        redis.wait(10)
    print(f"medians of {args.repeats} rounds of {args.requests} requests (acquire, end of response, settle)\n")
    print("| limits | in flight | client CPU µs/request | Redis CPU µs/request |")
    print("|---|---:|---:|---:|")
    for (name, conc), rows in results.items():
        client = statistics.median(r[0] for r in rows)
        server = statistics.median(r[1] for r in rows)
        print(f"| {name} | {conc} | {client:.0f} | {server:.0f} |")


if __name__ == "__main__":
    main()
