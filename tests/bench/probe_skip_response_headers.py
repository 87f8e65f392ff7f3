"""Probe: can the response-headers round trip be skipped for a buffered JSON response?

A non-streamed request costs the gateway four ext_proc messages; accounting needs only the
response body, so one fewer (switching the response headers to SKIP by `mode_override` and asking
for a BUFFERED body) would save a round trip per request. This probe asks Envoy what happens then:
a minimal Envoy (ext_proc filter, router, an upstream answering JSON with `content-length` and an
`x-ratelimit-limit-requests` header) in front of a grpcio ext_proc server that, on the body,
replaces it, sets a header, removes the upstream's rate-limit header and sets the new length.
Both modes: response headers SEND (what the gateway does today) and SKIP.

    .venv/bin/python tests/bench/probe_skip_response_headers.py

Measured 2026-12-07 (Envoy 1.40.0): with SKIP, Envoy still sends the whole body (end_of_stream,
no attributes) and applies the body mutation, but ignores the body reply's header mutations and
drops `content-length` (the client gets chunked encoding): the gateway's own response headers
(`x-ratelimit-*`, the renamed upstream ones) could not be set that way.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.devstack import free_port, tcp_open, wait_until  # noqa: E402
from extproc.envoyconf import envoy_binary  # noqa: E402
from extproc.wire import core_pb2  # noqa: E402
from extproc.wire import external_processor_pb2 as ep  # noqa: E402
from extproc.wire import external_processor_pb2_grpc as epg  # noqa: E402
from extproc.wire import processing_mode_pb2 as pm  # noqa: E402
from tests.bench.envoy_minimal import ROUTER, bootstrap, cluster  # noqa: E402

UPSTREAM_BODY = json.dumps({"usage": {"prompt_tokens": 3}}).encode()
NEW_BODY = json.dumps({"edited": True}).encode()


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-ratelimit-limit-requests", "100")
        self.send_header("content-length", str(len(UPSTREAM_BODY)))
        self.end_headers()
        self.wfile.write(UPSTREAM_BODY)

    def log_message(self, *args: Any) -> None:
        return None


def header(mutation: ep.HeaderMutation, key: str, value: str) -> None:
    opt = mutation.set_headers.add()
    opt.header.key = key
    opt.header.raw_value = value.encode()
    opt.append_action = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class Probe(epg.ExternalProcessorServicer):
    def __init__(self) -> None:
        self.mode = pm.ProcessingMode.SEND
        self.seen: list[str] = []

    async def Process(self, requests: Any, context: Any) -> Any:
        async for req in requests:
            kind = req.WhichOneof("request")
            resp = ep.ProcessingResponse()
            if kind == "request_headers":
                self.seen.append(kind)
                resp.request_headers.SetInParent()
                resp.mode_override.response_header_mode = self.mode
                resp.mode_override.response_body_mode = pm.ProcessingMode.BUFFERED
            elif kind == "response_headers":
                self.seen.append(kind)
                resp.response_headers.SetInParent()
            elif kind == "response_body":
                body = req.response_body
                self.seen.append(f"response_body ({len(body.body)} bytes, end_of_stream {body.end_of_stream})")
                common = resp.response_body.response
                common.body_mutation.body = NEW_BODY
                header(common.header_mutation, "x-from-body-phase", "yes")
                header(common.header_mutation, "content-length", str(len(NEW_BODY)))
                common.header_mutation.remove_headers.append("x-ratelimit-limit-requests")
            else:
                continue
            yield resp


def envoy_config(listener: int, upstream: int, extproc: int) -> str:
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "xp"}},
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
            },
        },
    }
    return bootstrap(listener, [ext_proc, ROUTER], [cluster("up", upstream), cluster("xp", extproc, h2=True)])


def start_envoy(work: Path) -> subprocess.Popen[bytes]:
    args = [envoy_binary(), "-c", str(work / "envoy.json"), "--log-level", "error", "--disable-hot-restart"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=(work / "envoy.log").open("wb"))


async def main() -> None:
    listener, upstream_port, extproc_port = free_port(), free_port(), free_port()
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    probe = Probe()
    server = grpc.aio.server()
    epg.add_ExternalProcessorServicer_to_server(probe, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{extproc_port}")
    await server.start()
    work = Path(tempfile.mkdtemp(prefix="probe-skip-"))
    (work / "envoy.json").write_text(envoy_config(listener, upstream_port, extproc_port))
    envoy = start_envoy(work)
    try:
        await asyncio.to_thread(wait_until, "envoy", lambda: tcp_open(listener), [envoy], 30)
        columns = (
            "response headers",
            "messages the server got",
            "body the client got",
            "x-from-body-phase",
            "upstream x-ratelimit-limit-requests",
            "content-length",
        )
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for name, mode in (("SEND", pm.ProcessingMode.SEND), ("SKIP", pm.ProcessingMode.SKIP)):
            probe.mode, probe.seen = mode, []

            def get() -> Any:
                with urllib.request.urlopen(f"http://127.0.0.1:{listener}/x", timeout=10) as r:
                    return r.headers, r.read()

            headers, body = await asyncio.to_thread(get)
            edited = "replaced" if body == NEW_BODY else "original"
            print(
                f"| {name} | {'; '.join(probe.seen)} | {edited} | {headers.get('x-from-body-phase', '(absent)')} | "
                f"{headers.get('x-ratelimit-limit-requests', '(removed)')} | "
                f"{headers.get('content-length', '(none: ' + str(headers.get('transfer-encoding')) + ')')} |"
            )
            await asyncio.sleep(0.1)
    finally:
        envoy.terminate()
        envoy.wait(10)
        await server.stop(0)
        upstream.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
