"""What a response-cache hit costs, against a miss and against Envoy alone, same run.

One stack on a Redis of this script's own (cache on for tenant `cached`, off for `plain`), and
Envoy alone from the same envoy.yaml without ext_proc, to the same mock provider. wrk at 1
connection, alternating rounds, medians:
- Envoy alone (E): the request goes straight to the mock;
- no cache (M): the gateway with the cache off for the tenant (a miss costs that plus one lookup);
- hit (H): the same request answered from the cache (no provider call), JSON and streamed.
Added latency of a hit = H - E. The server's CPU per request for each.

Run by hand (needs wrk): .venv/bin/python tests/bench/bench_cache.py [--duration 5] [--repeats 3]
Floor (issue: cache): a hit answered in <= 1 ms added over Envoy alone at 1 connection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.devstack import stop_process  # noqa: E402
from tests.bench.bench_gateway import start_envoy_alone, start_redis, wrk  # noqa: E402
from tests.bench.bench_pii import cpu_seconds  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, make_stack  # noqa: E402

JSON_BODY = json.dumps(
    {"model": "gpt-5.5", "temperature": 0, "messages": [{"role": "user", "content": "What is an API gateway?"}]}
)
STREAM_BODY = json.dumps(
    {
        "model": "gpt-5.5",
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "What is an API gateway?"}],
    }
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    redis, redis_url = start_redis()
    overrides = {"tenants": {"cached": {"cache": {"mode": "exact"}}, "plain": {}}}
    stack, admin = make_stack(work, redis_url, overrides=overrides)
    cached, _ = admin.key("cached", "c")
    plain, _ = admin.key("plain", "p")
    stack.start()
    pid = stack.procs["server"].pid
    alone, alone_ports = start_envoy_alone(work, stack.ports.mock)
    rows: list[tuple[str, float, float, float, float, float]] = []
    try:
        envoy_url = f"http://127.0.0.1:{alone_ports.listener}/v1/chat/completions"
        gw_url = stack.base_url + "/v1/chat/completions"
        for name, body in (("JSON", JSON_BODY), ("stream (8 events)", STREAM_BODY)):
            runs = {
                "E": (envoy_url, {"Authorization": f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"}),
                "M": (gw_url, {"Authorization": f"Bearer {plain}"}),
                "H": (gw_url, {"Authorization": f"Bearer {cached}"}),
            }
            res: dict[str, list[float]] = {k: [] for k in runs}
            cpu: dict[str, list[float]] = {k: [] for k in runs}
            for url, hdrs in runs.values():
                wrk(url, body, 1, 2, hdrs)  # warm-up (and the first miss that fills the cache)
            for rnd in range(args.repeats):
                order = list(runs) if rnd % 2 == 0 else list(runs)[::-1]
                for which in order:
                    url, hdrs = runs[which]
                    before = cpu_seconds(pid)
                    r = wrk(url, body, 1, args.duration, hdrs)
                    cpu[which].append((cpu_seconds(pid) - before) / (r["rps"] * args.duration) * 1e6)
                    res[which].append(r["p50"])
            e, m, h = (statistics.median(res[k]) for k in "EMH")
            rows.append((name, e, m, h, statistics.median(cpu["M"]), statistics.median(cpu["H"])))
    finally:
        stop_process(alone)
        stack.stop()
        redis.terminate()
        redis.wait(10)
    print(f"\nwrk, 1 connection, medians of {args.repeats} x {args.duration} s")
    print(
        "| response | p50 Envoy alone (ms) | p50 gateway, no cache (ms) | p50 hit (ms) | hit added over Envoy "
        "| server CPU no cache / hit |"
    )
    print("|---|---|---|---|---|---|")
    for name, e, m, h, cm, ch in rows:
        print(f"| {name} | {e:.2f} | {m:.2f} | {h:.2f} | {h - e:+.2f} ms | {cm:.0f} / {ch:.0f} µs |")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
