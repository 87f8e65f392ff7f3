"""What the limit check costs in instructions per request, counted by valgrind's callgrind in Envoy,
the ext_proc server and Redis: a yardstick the machine's noise does not move.

bench_limits.py measures the floors themselves (added p50, throughput ratio), but on this shared
2-core machine its figures swing by 2-4x between runs of the same code (the limits' added server CPU
per request was +71 µs and +302 µs for the same configuration an hour apart). Instruction counts of
the same requests repeat to ~1%, so they show whether a change made the limit check cheaper, and how
far it is from the throughput floor: at 16 connections everything runs on the same two cores, so a
configuration that makes the machine execute X% more instructions per request cannot keep more than
about 1 / (1 + X) of the throughput (the floor, >= 0.9x, needs X <= ~11%).

One stack (make_stack: the shipped envoy.yaml, the Redis backend) with Envoy, the server and a
redis-server of its own under callgrind, and the three keys of bench_limits.py:

  B   a key without limits
  L   every limit of the tenant and the key applying (6 checks, two budgets)
  R   only the tenant's requests and tokens per minute

Each key sends --requests sequential chat requests (non-streamed), followed by a 3 s tail (the usage
records' batch, the ledger consumer); per process, the window's count minus what the same length of
idle time costs (timers, health checks, measured first over 10 s), divided by the requests.

    .venv/bin/python tests/bench/limits_instructions.py [--requests 300] [--clients 1]

Reads: instructions per request of Envoy, the server and Redis for B, L and R, and L / B and R / B
of their sum. Under callgrind a request takes ~50 ms, longer than the 20 ms a rate-only request's
token settlement waits for its tenant's next check (RedisLimiter.ended), so here every settlement
goes out on its own call: limiter_cost.py measures that saving. With --clients 4 requests of the
same key overlap (as under load: the next check of the tenant comes before the 20 ms are over).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.devstack import free_port, tcp_open, wait_until  # noqa: E402
from tests.bench.instructions import BODY, callgrind, dumps  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

IDLE_S = 10.0
TAIL_S = 3.0
PROCS = ("envoy", "server", "redis")
KEYS = ("B", "L", "R")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=1, help="requests in flight at once")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    work = Path(tempfile.mkdtemp(prefix="bench-limits-instr-"))
    outs = {proc: work / f"{proc}.cg" for proc in PROCS}
    port = free_port()
    redis = subprocess.Popen(
        [
            *callgrind(outs["redis"]),
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack = None
    try:
        wait_until("redis", lambda: tcp_open(port), [redis], 60)
        stack, admin = make_stack(
            work / "stack",
            f"redis://127.0.0.1:{port}/0",
            wrap={p: callgrind(outs[p]) for p in ("envoy", "server")},
            slowdown=20,
        )
        keys = {
            "B": admin.key("bench-free", "free")[0],
            "R": admin.key("bench-rated", "rated")[0],
        }
        keys["L"], limited = admin.key("bench-limited", "limited")
        for flags in (
            ["--tenant", "bench-rated", "--rpm", "1000000000", "--tpm", "1000000000000"],
            ["--tenant", "bench-limited", "--rpm", "1000000000", "--tpm", "1000000000000", "--budget-usd", "999999999"],
            [
                "--key",
                limited.id,
                "--rpm",
                "1000000000",
                "--concurrency",
                "1000000",
                "--budget-tokens",
                "1000000000000",
            ],
        ):
            done = admin.cli("limits", "set", *flags)
            assert done.returncode == 0, done.stderr
        stack.start()
        pids = [str(stack.procs["envoy"].pid), str(stack.procs["server"].pid), str(redis.pid)]

        def control(*a: str) -> None:
            subprocess.run(["callgrind_control", *a, *pids], check=True, capture_output=True)

        windows: dict[str, float] = {}
        clients = [httpx.Client(base_url=stack.base_url, timeout=120) for _ in range(args.clients)]
        pool = ThreadPoolExecutor(args.clients)

        def send_one(client: httpx.Client, key: str, n: int) -> None:
            for _ in range(n):
                r = client.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
                r.raise_for_status()

        def send(key: str, n: int) -> None:
            """n requests from --clients clients at once (n split among them)."""
            shares = [n // len(clients) + (i < n % len(clients)) for i in range(len(clients))]
            for f in [pool.submit(send_one, c, key, k) for c, k in zip(clients, shares, strict=True)]:
                f.result()

        try:
            for name in KEYS:  # warm-up: connections, caches, scripts loaded, period totals started
                send(keys[name], 30)
            time.sleep(TAIL_S)
            control("-i", "on")
            time.sleep(IDLE_S)
            control("-d")  # dump 1: idle
            for name in KEYS:
                started = time.monotonic()
                send(keys[name], args.requests)
                time.sleep(TAIL_S)
                control("-d")
                windows[name] = time.monotonic() - started
            control("-i", "off")
        finally:
            pool.shutdown()
            for c in clients:
                c.close()
    finally:
        if stack is not None:
            stack.stop()
        redis.terminate()
        redis.wait(30)
    per: dict[str, dict[str, float]] = {name: {} for name in KEYS}
    for proc in PROCS:
        counts = dumps(outs[proc])
        if len(counts) != 1 + len(KEYS):
            raise SystemExit(f"{proc}: expected {1 + len(KEYS)} callgrind dumps in {work}, found {len(counts)}")
        idle_rate = counts[0] / IDLE_S
        for name, count in zip(KEYS, counts[1:], strict=True):
            per[name][proc] = (count - idle_rate * windows[name]) / args.requests
    base = sum(per["B"].values())
    how = "sequential" if args.clients == 1 else f"{args.clients} clients at once"
    print(f"instructions per request over {args.requests} requests, {how} (callgrind)\n")
    print("| | Envoy | server | Redis | all | vs B |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in KEYS:
        p = per[name]
        total = sum(p.values())
        print(
            f"| {name} | {p['envoy'] / 1e3:.0f}k | {p['server'] / 1e3:.0f}k | {p['redis'] / 1e3:.0f}k "
            f"| {total / 1e3:.0f}k | {total / base:.3f} |"
        )


if __name__ == "__main__":
    main()
