"""What the processor and the stages cost per streamed response chunk, in one process, without
Envoy, the transport or the network: the part of bench_accounting.py's "server CPU per chunk" that
the gateway's own Python code decides, measured where this machine's noise moves it least.

bench_accounting.py measures the floor itself (server CPU per chunk at 64 streams, from /proc), but
its figures swing with the machine (the same code gave 50.8 and 86.9 µs for B on one day), and its
py-spy breakdown rests on a few hundred samples. Here the real pipelines of its configurations
(B0 without accounting, R with a stage that only asks for the response, B with accounting, B' the
same with the stream edited because the client did not ask for usage) are driven by the messages
Envoy would send for one SSE stream of --events events, one event per chunk: request headers and
body, response headers, the chunks. The embedded backend in a temporary directory (its records go
to a SQLite ledger, as `extproc dev` does). Per configuration, the best of --repeats rounds of
--streams streams (the least disturbed), in process CPU time:

    .venv/bin/python tests/bench/chunk_cost.py [--streams 200] [--events 100] [--repeats 7]

Each configuration runs streams of one event and of --events events: the slope between the two is
the cost of one more chunk, the intercept the cost per request (the request's messages, the usage
record, the ledger's commit). Reads: µs per stream, per request and per chunk, and per chunk what
reading the response, accounting and editing the stream add; the transport's share (the gRPC
message in and out, the event loop) is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.wire import external_processor_pb2 as ep  # noqa: E402
from tests.bench.bench_accounting import _CHUNK, MESSAGES, MODEL, baseline_stages  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, Admin, write_config  # noqa: E402

CONFIGS = ("B0", "R", "B", "B'")


def _headers(req: Any, pairs: dict[str, str]) -> None:
    for k, v in pairs.items():
        h = req.headers.headers.add()
        h.key = k
        h.raw_value = v.encode()


def stream_messages(secret: str, events: int, include_usage: bool, n: int) -> list[ep.ProcessingRequest]:
    """What Envoy sends the server for one streamed chat completion (bytes serialized, as they
    arrive: each stream parses its own)."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    out = []
    req = ep.ProcessingRequest()
    _headers(
        req.request_headers,
        {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            ":authority": "bench",
            "content-type": "application/json",
            "x-request-id": f"rid-{n}",
            "authorization": f"Bearer {secret}",
        },
    )
    out.append(req)
    req = ep.ProcessingRequest()
    req.request_body.body = orjson.dumps(body)
    req.request_body.end_of_stream = True
    out.append(req)
    req = ep.ProcessingRequest()
    _headers(req.response_headers, {":status": "200", "content-type": "text/event-stream; charset=utf-8"})
    out.append(req)
    for i in range(events):
        delta = b'{"role":"assistant","content":""}' if i == 0 else b'{"content":"tok"}'
        data = _CHUNK % (n, delta, b"null", b',"usage":null' if include_usage else b"")
        req = ep.ProcessingRequest()
        req.response_body.body = b"data: " + data + b"\n\n"
        out.append(req)
    last = _CHUNK % (n, b"{}", b'"stop"', b',"usage":null' if include_usage else b"")
    tail = b"data: " + last + b"\n\n"
    if include_usage:
        usage = b'{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}' % (events, events + 8)
        tail += b'data: {"id":"chatcmpl-t%d","object":"chat.completion.chunk","created":1767225600,"model":"%s",' % (
            n,
            MODEL.encode(),
        )
        tail += b'"system_fingerprint":"fp_bench","choices":[],"usage":' + usage + b"}\n\n"
    req = ep.ProcessingRequest()
    req.response_body.body = tail + b"data: [DONE]\n\n"
    req.response_body.end_of_stream = True
    out.append(req)
    return [ep.ProcessingRequest.FromString(m.SerializeToString()) for m in out]


async def pipelines(config_path: Path) -> tuple[dict[str, Any], Any]:
    from extproc import server
    from extproc.config import load_config
    from extproc.pipeline import Pipeline

    config = load_config(str(config_path))
    runtime = await server.build_runtime(config, metrics=False)
    plain = Pipeline(baseline_stages(config, runtime.store, probe=False))
    probe = Pipeline(baseline_stages(config, runtime.store, probe=True))
    return {"B0": plain, "R": probe, "B": runtime.pipeline, "B'": runtime.pipeline}, runtime


async def one_round(pipeline: Any, streams: list[list[ep.ProcessingRequest]]) -> tuple[float, int]:
    from extproc.processor import run_stream

    sent = 0

    async def write(resp: ep.ProcessingResponse) -> None:
        nonlocal sent
        resp.SerializeToString()  # as the transport does
        sent += 1

    t0 = time.process_time()
    for msgs in streams:
        it = iter(msgs)

        async def read(it: Any = it) -> ep.ProcessingRequest | None:
            return next(it, None)

        await run_stream(pipeline, read, write)
    # Records and ledger rows of this round, written by the sink's tasks and threads, count too.
    await asyncio.sleep(0.05)
    return time.process_time() - t0, sent


async def main_async(args: argparse.Namespace, config_path: Path, secret: str) -> None:
    pipes, runtime = await pipelines(config_path)
    configs = args.only or CONFIGS
    # Per configuration and stream length (1 event, --events events): CPU per stream of each round.
    results: dict[tuple[str, int], list[float]] = {}
    try:
        n = 0
        for _ in range(args.repeats):
            for c in configs:
                for events in (1, args.events):
                    batch = []
                    for _ in range(args.streams):
                        n += 1
                        batch.append(stream_messages(secret, events, c != "B'", n))
                    cpu, _ = await one_round(pipes[c], batch)
                    results.setdefault((c, events), []).append(cpu / args.streams)
    finally:
        await runtime.close()
    best = {k: min(v) * 1e6 for k, v in results.items()}
    print(f"best of {args.repeats} rounds of {args.streams} streams each, streams of 1 and of {args.events} events")
    print(f"({time.strftime('%Y-%m-%d %H:%M')}, process CPU time, one process, no transport)\n")
    print(f"| config | µs per stream of {args.events + 1} chunks | per request (intercept) | per chunk (slope) |")
    print("|---|---:|---:|---:|")
    slope: dict[str, float] = {}
    for c in configs:
        long, short = best[(c, args.events)], best[(c, 1)]
        # A stream of k events has k + 1 response chunks (the last carries the end): the slope
        # between the two lengths is the cost of one more chunk, the rest is per request.
        slope[c] = (long - short) / (args.events - 1)
        print(f"| {c} | {long:,.0f} | {short - 2 * slope[c]:,.0f} | {slope[c]:.1f} |")
    if set(configs) != set(CONFIGS):
        return
    print(f"\nper chunk: reading the response (R - B0) {slope['R'] - slope['B0']:.1f} µs, ", end="")
    print(f"accounting (B - R) {slope['B'] - slope['R']:.1f} µs, editing the stream (B' - B) ", end="")
    edit = slope["B'"] - slope["B"]
    print(f"{edit:.1f} µs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", type=lambda v: v.split(","), help="comma-separated configs (for a profiler)")
    args = p.parse_args()
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="chunk-cost-"))
    os.environ.update(PROVIDER_KEYS)
    config_path = write_config(work, redis=False)
    secret, _ = Admin(config_path, None).key("bench", "chunk-cost")
    uvloop.run(main_async(args, config_path, secret))


if __name__ == "__main__":
    main()
