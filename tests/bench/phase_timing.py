"""Where a sequential request's time goes inside the ext_proc server, per ext_proc message.

The sequential floor (added p50 over Envoy alone at one connection) is latency, not CPU: this
script shows how much of it the server holds each message, and how much is elsewhere (Envoy's
ext_proc hops, the upstream, the client). It starts a stack like the suite's B (the Redis backend, a
tenant with requests and tokens per minute) with a timing hook loaded into the server through a
sitecustomize.py in a temp dir (nothing shipped is edited), sends --requests sequential chat
requests, and prints per message kind the median time from the bytes' arrival (data_received) to
the start of handling (the stream's task getting to it) and the median handling time (the stages
and the reply), skipping the first 100 of each; then per message kind and stage the median time in
the stage's hook (the processor's own per-stage timings), awaits included (the limits check's Redis
round trip shows under limits/request_body).

    .venv/bin/python tests/bench/phase_timing.py [--requests 1000] [--no-limits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import start_redis  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hello there, how are you today?"}]}
KINDS = ("request_headers", "request_body", "response_headers", "response_body")

# Loaded by the server process only (its command line has "serve"); writes OUT at exit.
HOOK = """
import atexit, json, os, time
if b"serve" in open("/proc/self/cmdline", "rb").read():
    from extproc import processor
    from extproc.transport import h2server

    _clock = time.perf_counter
    _last = [0.0]
    _rows = []
    _received = h2server.H2Protocol.data_received

    def data_received(self, data):
        _last[0] = _clock()
        return _received(self, data)

    h2server.H2Protocol.data_received = data_received
    _handle = processor.Processor.handle

    async def handle(self, req):
        arrived, started = _last[0], _clock()
        try:
            return await _handle(self, req)
        finally:
            ctx = getattr(self, "ctx", None)
            stages = dict(ctx.timings) if ctx is not None else {}
            _rows.append((req.WhichOneof("request"), started - arrived, _clock() - started, stages))

    processor.Processor.handle = handle
    atexit.register(lambda: open(os.environ["PHASE_TIMING_OUT"], "w").write(json.dumps(_rows)))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--no-limits", action="store_true", help="a tenant without limits")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-phases-"))
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(HOOK)
    out = work / "rows.json"
    redis, url = start_redis()
    stack, admin = make_stack(
        work / "stack", url, extra_env={"PYTHONPATH": str(work / "hook"), "PHASE_TIMING_OUT": str(out)}
    )
    try:
        key, _ = admin.key("bench", "timing")
        if not args.no_limits:
            done = admin.cli("limits", "set", "--tenant", "bench", "--rpm", "1000000000", "--tpm", "1000000000000")
            assert done.returncode == 0, done.stderr
        stack.start()
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            started = time.perf_counter()
            for _ in range(args.requests):
                r = client.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
                r.raise_for_status()
            per_request = (time.perf_counter() - started) / args.requests
    finally:
        stack.stop()
        redis.terminate()
        redis.wait(10)
    rows = json.loads(out.read_text())
    print(f"{args.requests} sequential requests, {per_request * 1e3:.2f} ms each at the client (httpx)\n")
    print("| message | arrival to handling, µs p50 | handling, µs p50 |")
    print("|---|---:|---:|")
    total = 0.0
    for kind in KINDS:
        waits = [w * 1e6 for k, w, _, _ in rows if k == kind][100:]
        spans = [h * 1e6 for k, _, h, _ in rows if k == kind][100:]
        if not spans:
            continue
        wait, span = statistics.median(waits), statistics.median(spans)
        total += wait + span
        print(f"| {kind} | {wait:.0f} | {span:.0f} |")
    print(f"\nin the server: ~{total:.0f} µs of the {per_request * 1e6:.0f} µs per request")
    print("\n| message | stage | µs p50 (the stage's hook for that message, awaits included) |")
    print("|---|---|---:|")
    for kind, stage, value in stage_medians(rows):
        print(f"| {kind} | {stage} | {value:.0f} |")


def stage_medians(rows: list[list[Any]]) -> list[tuple[str, str, float]]:
    """Per message kind and stage, the median time in the stage's hook (ctx.timings accumulates per
    stage over a request's messages: each message's share is the difference to the one before)."""
    spent: dict[tuple[str, str], list[float]] = {}
    before: dict[str, float] = {}
    for kind, _, _, stages in rows:
        if kind == "request_headers":
            before = {}
        for stage, total in stages.items():
            spent.setdefault((kind, stage), []).append((total - before.get(stage, 0.0)) * 1e6)
        before = stages
    out = []
    for (kind, stage), values in spent.items():
        med = statistics.median(values[100:] or values)
        if med >= 5:
            out.append((kind, stage, med))
    return sorted(out, key=lambda r: (KINDS.index(r[0]) if r[0] in KINDS else 9, -r[2]))


if __name__ == "__main__":
    main()
