"""Instructions Envoy and the ext_proc server execute per request, counted by valgrind's callgrind:
a cost this machine's noise does not move. Throughput comparisons between two stacks here differ
by 4-8% with identical configs (bench_observability.py's OO control), as much as the effects some
floors are about; instruction counts of the same requests repeat to ~1%.

Each variant is the observability bench's stack (`start_variant`: O, M, T01, T1, E01, OO) with
Envoy (one worker thread) and the server run under callgrind, instrumented only while --requests
sequential chat requests are served plus a 6 s tail (so the span exporter's 5 s batch is
included; every variant gets the same tail). Redis, the mock provider and the OTLP sink run
natively and are not counted. Envoy's binary is stripped: totals only, no functions.

    .venv/bin/python tests/bench/instructions.py [--variants T01,M] [--requests 400]

Reads: instructions per request of Envoy, of the server, and their sum against O's. Fixed costs
while idle (timers) are part of each figure; they shrink as --requests grows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from extproc.devstack import free_port, tcp_open, wait_until  # noqa: E402
from tests.bench.bench_observability import LABELS, SINK, VARIANTS, otlp_env, start_variant  # noqa: E402

BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hello there, how are you today?"}]}
TAIL_S = 6.0


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def total(out: Path) -> int:
    """The instruction count of callgrind's dumps of one process (`callgrind_control -d`)."""
    best = 0
    for f in out.parent.glob(out.name + "*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                best = max(best, int(line.split()[1]))
    return best


def measure(name: str, work: Path, redis_url: str, otel: dict[str, str], requests: int) -> tuple[float, float]:
    outs = {proc: work / f"{name}-{proc}.cg" for proc in ("envoy", "server")}
    stack, key = start_variant(
        name, work / name, redis_url, otel, wrap={p: callgrind(o) for p, o in outs.items()}, slowdown=20
    )
    try:
        pids = [str(stack.procs[p].pid) for p in outs]
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base_url, timeout=120) as client:
            for _ in range(30):  # warm-up: connections, caches, first-use imports
                client.post("/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
            time.sleep(TAIL_S)  # a warm-up span batch goes out before counting starts
            subprocess.run(["callgrind_control", "-i", "on", *pids], check=True, capture_output=True)
            for _ in range(requests):
                client.post("/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
            time.sleep(TAIL_S)
            subprocess.run(["callgrind_control", "-i", "off", *pids], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", *pids], check=True, capture_output=True)
        return total(outs["envoy"]) / requests, total(outs["server"]) / requests
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="T01", help="comma-separated, besides O (always run)")
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    variants = tuple(v for v in VARIANTS if v == "O" or v in args.variants.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    redis_port, sink_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)]),
    ]
    results: dict[str, tuple[float, float]] = {}
    try:
        wait_until("redis", lambda: tcp_open(redis_port), procs, 10)
        wait_until("otlp sink", lambda: tcp_open(sink_port), procs, 10)
        for name in variants:
            results[name] = measure(name, work, f"redis://127.0.0.1:{redis_port}/0", otlp_env(sink_port), args.requests)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    base = sum(results["O"])
    print(f"instructions per request over {args.requests} sequential requests (callgrind)\n")
    print("| | Envoy | server | both | vs O |")
    print("|---|---|---|---|---|")
    for name, (envoy, server) in results.items():
        both = envoy + server
        print(f"| {LABELS[name]} | {envoy / 1e3:.0f}k | {server / 1e3:.0f}k | {both / 1e3:.0f}k | {both / base:.3f} |")


if __name__ == "__main__":
    main()
