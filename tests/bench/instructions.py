"""Instructions Envoy and the ext_proc server execute per request, counted by valgrind's callgrind:
a cost this machine's noise does not move. Throughput comparisons between two stacks here differ
by 4-8% with identical configs (bench_observability.py's OO control), as much as the effects some
floors are about; instruction counts of the same requests repeat to ~1%.

Each variant is the observability bench's stack (`start_variant`: O, M, T01, T1, E01, OO) with
Envoy and the server run under callgrind, counted while --requests sequential chat requests are
served plus a 6 s tail (so the span exporter's 5 s batch is included), less what 10 s with no
request cost them (timers, health checks) scaled to the window's length. Redis, the mock provider
and the OTLP sink run natively and are not counted. Envoy's binary is stripped: totals only.

    .venv/bin/python tests/bench/instructions.py [--variants T01,M] [--requests 400] [--full-batches]

Under valgrind requests run at ~15/s, so the server's span exporter sends a batch of a few dozen
spans every 5 s, and each batch's fixed cost (an HTTP POST) lands on few requests. At production
rates (>= ~100 sampled requests/s) the SDK sends full batches of 512 instead. --full-batches makes
the server do that here (it exports only when 512 spans are queued): with T1 and --requests 512
each window holds one full batch, so T1 - M is one sampled span's cost at production batching.

Reads: instructions per request of Envoy, of the server, and their sum against O's.
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

from tests.bench.bench_observability import LABELS, VARIANTS, start_redis_and_sink, start_variant  # noqa: E402

BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hello there, how are you today?"}]}
TAIL_S = 6.0
IDLE_S = 10.0


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def dumps(out: Path) -> list[int]:
    """Instruction counts of one process's callgrind dumps (`callgrind_control -d`), in order."""
    counts = []
    for f in sorted(out.parent.glob(out.name + ".*"), key=lambda f: int(f.name.rsplit(".", 1)[1])):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                counts.append(int(line.split()[1]))
                break
    return counts


def measure(name: str, work: Path, redis_url: str, otel: dict[str, str], requests: int) -> tuple[float, float]:
    """Per request: (the window's count - the idle rate x the window's length) / requests, where
    the idle rate is counted over IDLE_S with no request (timers, health checks): under valgrind a
    request takes ~50 ms, so a fixed cost per second would otherwise show as a cost per request."""
    outs = {proc: work / f"{name}-{proc}.cg" for proc in ("envoy", "server")}
    stack, key = start_variant(
        name, work / name, redis_url, otel, wrap={p: callgrind(o) for p, o in outs.items()}, slowdown=20
    )
    pids = [str(stack.procs[p].pid) for p in outs]

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, *pids], check=True, capture_output=True)

    try:
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base_url, timeout=120) as client:
            for _ in range(30):  # warm-up: connections, caches, first-use imports
                client.post("/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
            time.sleep(TAIL_S)  # a warm-up span batch goes out before counting starts
            control("-i", "on")
            time.sleep(IDLE_S)
            control("-d")  # dump 1: idle
            started = time.monotonic()
            for _ in range(requests):
                client.post("/v1/chat/completions", json=BODY, headers=headers).raise_for_status()
            time.sleep(TAIL_S)
            control("-d")  # dump 2: the requests
            window = time.monotonic() - started
            control("-i", "off")
        per_request = []
        for proc, out in outs.items():
            counts = dumps(out)
            if len(counts) != 2:
                raise RuntimeError(f"{proc}: expected two callgrind dumps in {out.parent}, found {len(counts)}")
            idle, busy = counts
            per_request.append((busy - idle / IDLE_S * window) / requests)
        return per_request[0], per_request[1]
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="T01", help="comma-separated, besides O (always run)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--full-batches",
        action="store_true",
        help="the server's exporter sends only full 512-span batches (see the module docstring)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    variants = tuple(v for v in VARIANTS if v == "O" or v in args.variants.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    procs, redis_url, otel = start_redis_and_sink()
    if args.full_batches:
        otel["OTEL_BSP_SCHEDULE_DELAY"] = "3600000"  # ms: a batch leaves only when 512 spans wait
    results: dict[str, tuple[float, float]] = {}
    try:
        for name in variants:
            results[name] = measure(name, work, redis_url, otel, args.requests)
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
