"""Probe: can Envoy 1.40 itself read the usage of a stream nobody edits (`sse_to_metadata`)?

Accounting reads every SSE chunk through ext_proc today: one gRPC message per chunk, ~50-120 µs of
the server's CPU each (README, "What accounting costs"). The issue names a lever for streams no stage
edits: Envoy's `envoy.filters.http.sse_to_metadata` filter extracts JSON fields of SSE events into
dynamic metadata in C++, and the access log (a gRPC access log service, for records) carries them,
one message per request instead of one per chunk. This probe asks Envoy what it extracts: a minimal
Envoy (the filter and the router, no ext_proc) in front of an upstream that sends the real APIs'
stream shapes, a JSON access log with the metadata, and Envoy's own CPU per event with and without
the filter (the price of the extraction).

    .venv/bin/python tests/bench/probe_sse_to_metadata.py [--events 200] [--streams 300]

The filter's config is the JSON content parser (`envoy.content_parsers.json`) with json_to_metadata
rules (a path of keys, a metadata key, a type): its exact fields were read from the descriptors
compiled into the envoy binary (`tests/unit/test_wire_conformance.py: envoy_descriptor`).

Then the gRPC access log service (`envoy.access_loggers.http_grpc`, flush interval 10 ms) to a
Python server in this process (the ALS messages decoded with the descriptors from the binary too):
what a record built from it would have (the extracted usage, status, Envoy's timings) and how long
after the client had the last byte the entry arrives.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from google.protobuf import (  # noqa: E402  # noqa: E402
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

from extproc.devstack import free_port, tcp_open, wait_until  # noqa: E402
from extproc.envoyconf import envoy_binary  # noqa: E402
from tests.bench.envoy_minimal import ROUTER, bootstrap, cluster  # noqa: E402
from tests.unit.test_wire_conformance import envoy_descriptor  # noqa: E402

_JSON_PARSER = "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser"
_TICKS = os.sysconf("SC_CLK_TCK")
NS = "gateway.usage"

# (metadata key, path of JSON keys): OpenAI's last chunk (stream_options.include_usage) and
# Anthropic's message_start / message_delta events.
OPENAI_FIELDS = {
    "input_tokens": ["usage", "prompt_tokens"],
    "output_tokens": ["usage", "completion_tokens"],
    "cached_input_tokens": ["usage", "prompt_tokens_details", "cached_tokens"],
    "reasoning_tokens": ["usage", "completion_tokens_details", "reasoning_tokens"],
}
ANTHROPIC_FIELDS = {
    "a_input_tokens": ["message", "usage", "input_tokens"],
    "a_cache_creation_input_tokens": ["message", "usage", "cache_creation_input_tokens"],
    "a_cache_read_input_tokens": ["message", "usage", "cache_read_input_tokens"],
    "a_output_tokens": ["usage", "output_tokens"],
}


def openai_stream(events: int) -> bytes:
    chunks: list[dict[str, Any]] = [
        {
            "id": "chatcmpl-p",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-5.5",
            "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
            "usage": None,
        }
        for _ in range(events)
    ]
    chunks.append(
        {
            "id": "chatcmpl-p",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-5.5",
            "choices": [],
            "usage": {
                "prompt_tokens": 17,
                "completion_tokens": events,
                "total_tokens": 17 + events,
                "prompt_tokens_details": {"cached_tokens": 5},
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
        }
    )
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def anthropic_stream(events: int) -> bytes:
    def ev(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    usage = {"input_tokens": 25, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11, "output_tokens": 1}
    out = [
        ev("message_start", {"type": "message_start", "message": {"id": "msg_p", "type": "message", "usage": usage}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
    ]
    out += [
        ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}})
        for _ in range(events)
    ]
    out += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": events}},
        ),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(out)


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    events = 200

    def do_GET(self) -> None:
        body = anthropic_stream(self.events) if self.path.startswith("/anthropic") else openai_stream(self.events)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        # One event per write, as a provider streams them (Envoy sees many chunks).
        for part in body.split(b"\n\n")[:-1]:
            self.wfile.write(part + b"\n\n")

    def log_message(self, *args: Any) -> None:
        return None


def rules(fields: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [
        {
            "rule": {
                "selectors": [{"key": k} for k in path],
                "on_present": {"metadata_namespace": NS, "key": key, "type": "NUMBER"},
            }
        }
        for key, path in fields.items()
    ]


def als_message_class() -> Any:
    """StreamAccessLogsMessage from the FileDescriptorProtos compiled into the envoy binary."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for mod in (any_pb2, duration_pb2, timestamp_pb2, struct_pb2, wrappers_pb2, empty_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)
        added.add(fdp.name)

    def add(name: str) -> None:
        if name in added:
            return
        fd = envoy_descriptor(name)
        for dep in fd.dependency:
            add(dep)
        pool.Add(fd)
        added.add(name)

    add("envoy/service/accesslog/v3/als.proto")
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("envoy.service.accesslog.v3.StreamAccessLogsMessage")
    )


class AccessLogs:
    """The ALS server's side: every HTTP entry as a dict, with the time it arrived."""

    def __init__(self) -> None:
        self.cls = als_message_class()
        self.entries: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        def stream(requests: Any, context: Any) -> bytes:
            for msg in requests:
                now = time.monotonic()
                for entry in msg.http_logs.log_entry:
                    with self.lock:
                        self.entries.append((now, json_format.MessageToDict(entry)))
            return b""

        return grpc.method_handlers_generic_handler(
            "envoy.service.accesslog.v3.AccessLogService",
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    stream, request_deserializer=self.cls.FromString, response_serializer=lambda r: r
                )
            },
        )


def envoy_config(listener: int, upstream: int, admin: int, log: Path, with_filter: bool, als: int | None = None) -> str:
    filters: list[dict[str, Any]] = []
    if with_filter:
        filters.append(
            {
                "name": "envoy.filters.http.sse_to_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                    "response_rules": {
                        "content_parser": {
                            "name": "envoy.content_parsers.json",
                            "typed_config": {
                                "@type": _JSON_PARSER,
                                "rules": rules(OPENAI_FIELDS) + rules(ANTHROPIC_FIELDS),
                            },
                        }
                    },
                },
            }
        )
    filters.append(ROUTER)
    fmt = {"path": "%REQ(:PATH)%", **{k: f"%DYNAMIC_METADATA({NS}:{k})%" for k in (*OPENAI_FIELDS, *ANTHROPIC_FIELDS)}}
    access_logs: list[dict[str, Any]] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(log),
                "log_format": {"json_format": fmt},
            },
        }
    ]
    if als is not None:
        access_logs.append(
            {
                "name": "envoy.access_loggers.http_grpc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                    "common_config": {
                        "log_name": "gateway",
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
                        "buffer_flush_interval": "0.010s",
                    },
                },
            }
        )
    clusters = [cluster("up", upstream), *([cluster("als", als, h2=True)] if als is not None else [])]
    return bootstrap(listener, filters, clusters, access_log=access_logs, admin=admin)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def run(with_filter: bool, upstream_port: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="probe-sse-meta-"))
    listener, admin = free_port(), free_port()
    log = work / "access.log"
    (work / "envoy.json").write_text(envoy_config(listener, upstream_port, admin, log, with_filter))
    cmd = [envoy_binary(), "-c", str(work / "envoy.json"), "--log-level", "error", "--disable-hot-restart"]
    cmd += ["--concurrency", "1", "--file-flush-interval-msec", "50"]
    envoy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(work / "envoy.log").open("wb"))
    try:
        wait_until("envoy", lambda: tcp_open(listener), [envoy], 30)
        for path in ("/openai", "/anthropic"):  # warm-up, and the records checked below
            with urllib.request.urlopen(f"http://127.0.0.1:{listener}{path}", timeout=10) as r:
                r.read()
        time.sleep(0.3)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        c0, t0 = cpu_seconds(envoy.pid), time.monotonic()
        for i in range(args.streams):
            with urllib.request.urlopen(
                f"http://127.0.0.1:{listener}/{('openai', 'anthropic')[i % 2]}", timeout=10
            ) as r:
                r.read()
        used = cpu_seconds(envoy.pid) - c0
        wall = time.monotonic() - t0
        events = args.streams * (args.events + 3)
        return {"records": records, "envoy_us_per_event": used / events * 1e6, "wall_s": wall}
    finally:
        envoy.terminate()
        envoy.wait(10)


def probe_als(upstream_port: int) -> None:
    """One stream of each API through Envoy with the filter and the gRPC access log."""
    logs = AccessLogs()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((logs.handler(),))
    als_port = free_port()
    server.add_insecure_port(f"127.0.0.1:{als_port}")
    server.start()
    work = Path(tempfile.mkdtemp(prefix="probe-sse-als-"))
    listener, admin = free_port(), free_port()
    (work / "envoy.json").write_text(envoy_config(listener, upstream_port, admin, work / "a.log", True, als_port))
    cmd = [envoy_binary(), "-c", str(work / "envoy.json"), "--log-level", "error", "--disable-hot-restart"]
    envoy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(work / "envoy.log").open("wb"))
    try:
        wait_until("envoy", lambda: tcp_open(listener), [envoy], 30)
        delays: list[float] = []
        missing = 0
        for path in ("/openai", "/anthropic") * 10:
            with urllib.request.urlopen(f"http://127.0.0.1:{listener}{path}", timeout=10) as r:
                r.read()
            done = time.monotonic()
            before = len(logs.entries)
            deadline = done + 2
            while len(logs.entries) == before and time.monotonic() < deadline:
                time.sleep(0.001)
            if len(logs.entries) == before:
                missing += 1  # not within 2 s: counted, the next request's wait starts afresh
            else:
                delays.append((logs.entries[-1][0] - done) * 1000)
        time.sleep(1)
        stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5).read().decode()
        als_stats = [line for line in stats.splitlines() if line.startswith("cluster.als.upstream_rq_total")]
        print("gRPC access-log entries (the last of each API), the fields a record would use:")
        for _, entry in logs.entries[-2:]:
            common = entry.get("commonProperties", {})
            print(
                "  ",
                json.dumps(
                    {
                        "path": entry.get("request", {}).get("path"),
                        "status": entry.get("response", {}).get("responseCode"),
                        "usage": common.get("metadata", {}).get("filterMetadata", {}).get(NS),
                        "time_to_first_upstream_rx_byte": common.get("timeToFirstUpstreamRxByte"),
                        "time_to_last_downstream_tx_byte": common.get("timeToLastDownstreamTxByte"),
                        "response_body_bytes": entry.get("response", {}).get("responseBodyBytes"),
                    }
                ),
            )
        print(
            f"entries: {len(logs.entries)} for 20 requests; {missing} not within 2 s of the response's end; "
            f"{'; '.join(als_stats)}"
        )
        if delays:
            print(
                f"an entry arrived after the client had the last byte: median {statistics.median(delays):.1f} ms, "
                f"max {max(delays):.1f} ms (buffer_flush_interval 10 ms)"
            )
    finally:
        envoy.terminate()
        envoy.wait(10)
        server.stop(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    Upstream.events = args.events
    upstream_port = free_port()
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for with_filter in (False, True):
                results[with_filter].append(run(with_filter, upstream_port, args))
        first = results[True][0]["records"]
        print("metadata in the access log with the filter (what an access-log record would carry):")
        for rec in first:
            print("  ", json.dumps(rec))
        print("without the filter:")
        for rec in results[False][0]["records"]:
            print("  ", json.dumps(rec))
        for with_filter in (False, True):
            per = [r["envoy_us_per_event"] for r in results[with_filter]]
            print(
                f"Envoy CPU per event {'with' if with_filter else 'without'} the filter: "
                f"median {statistics.median(per):.2f} µs ({', '.join(f'{v:.2f}' for v in per)})"
            )
        probe_als(upstream_port)
    finally:
        upstream.shutdown()


if __name__ == "__main__":
    main()
