"""Gateway overhead vs Envoy alone, same machine, same run.

Two Envoys from the same envoy.yaml in front of the same mock provider: "envoy" has the ext_proc
filter removed and one route to the provider; "gateway" is the shipped config with the ext_proc
server doing everything it does in production (key check, routing, credential swap). wrk drives
both with identical requests. Run by hand (not part of the test suite):

    .venv/bin/python tests/bench/bench_gateway.py [--duration 10] [--connections 16]

Needs `wrk` (apt-get install wrk). Figures are relative: everything shares 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc import envoyconf  # noqa: E402
from extproc.devstack import free_port, http_ok, stop_process, tcp_open, wait_until  # noqa: E402
from tests.e2e.conftest import PROVIDER_KEYS, make_stack  # noqa: E402

CHAT = '{"model":"gpt-5.5","messages":[{"role":"user","content":"hello there, how are you today?"}]}'
STREAM = '{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"hello there, how are you today?"}]}'


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of the benchmark's own (no persistence), ready; (process, URL)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until("redis", lambda: tcp_open(port), [proc], 10)
    return proc, f"redis://127.0.0.1:{port}/0"


def envoy_alone(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    for hcm in envoyconf._hcms(out):
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
        vh = hcm["route_config"]["virtual_hosts"][0]
        vh["routes"] = [{"match": {"prefix": "/"}, "route": {"cluster": "openai", "timeout": "0s"}}]
    return out


ENVOY_ARGS = ("--concurrency", "2", "--disable-hot-restart", "-l", "warn")


def start_envoy_alone(out: Path, mock_port: int) -> tuple[subprocess.Popen[bytes], envoyconf.LocalPorts]:
    """Envoy alone (envoy_alone) in front of the mock, ready; config written to out/envoy-alone.yaml."""
    ports = envoyconf.LocalPorts(listener=free_port(), admin=free_port(), mock=mock_port)
    cfg = envoy_alone(envoyconf.derive_local(envoyconf.load(ROOT / "envoy" / "envoy.yaml"), ports))
    (out / "envoy-alone.yaml").write_text(envoyconf.dump(cfg))
    proc = subprocess.Popen(
        [envoyconf.envoy_binary(), "-c", str(out / "envoy-alone.yaml"), *ENVOY_ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("envoy alone", lambda: http_ok(f"http://127.0.0.1:{ports.admin}/ready"), [proc], 30)
    except BaseException:
        stop_process(proc)
        raise
    return proc, ports


def wrk(url: str, body: str, connections: int, duration: int, extra_headers: dict[str, str]) -> dict[str, float]:
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in extra_headers.items())
    script = f'wrk.method = "POST"\nwrk.body = {body!r}\nwrk.headers["Content-Type"] = "application/json"\n{headers}'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)  # Lua accepts the single-quoted Python repr of the body
        lua = f.name
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", lua, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx responses:\n{out}")

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%?\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": ms("50"), "p90": ms("90"), "p99": ms("99")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    stack, admin = make_stack(work, None)  # the shipped configs, embedded key store
    secret, _ = admin.key("bench", "wrk")
    stack.start()
    alone, alone_ports = start_envoy_alone(work, stack.ports.mock)
    try:
        targets = {"envoy": f"http://127.0.0.1:{alone_ports.listener}", "gateway": stack.base_url}
        sse = {"x-mock-output-tokens": "20"}
        conns = args.connections
        scenarios = [
            ("chat JSON, 1 connection", CHAT, 1, {}),
            (f"chat JSON, {conns} connections", CHAT, conns, {}),
            ("chat SSE 20 events, 1 connection", STREAM, 1, sse),
            (f"chat SSE 20 events, {conns} connections", STREAM, conns, sse),
        ]
        print(f"{'scenario':42} {'target':8} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, body, n_conns, hdrs in scenarios:
            res = {}
            for target, url in targets.items():
                # Envoy alone is called the way a client calls the provider directly: with the
                # provider key. The gateway gets a virtual key and swaps it.
                key = PROVIDER_KEYS["OPENAI_API_KEY"] if target == "envoy" else secret
                target_hdrs = {**hdrs, "Authorization": f"Bearer {key}"}
                wrk(url + "/v1/chat/completions", body, n_conns, 2, target_hdrs)  # warm-up
                res[target] = wrk(url + "/v1/chat/completions", body, n_conns, args.duration, target_hdrs)
                r = res[target]
                print(f"{name:42} {target:8} {r['rps']:8.0f} {r['p50']:8.2f} {r['p90']:8.2f} {r['p99']:8.2f}")
            e, g = res["envoy"], res["gateway"]
            print(
                f"{'':42} {'ratio':8} {g['rps'] / e['rps']:8.2f} {g['p50'] / e['p50']:8.2f} "
                f"{g['p90'] / e['p90']:8.2f} {g['p99'] / e['p99']:8.2f}   "
                f"(+{g['p50'] - e['p50']:.2f} ms p50)"
            )
    finally:
        stop_process(alone)
        stack.stop()


if __name__ == "__main__":
    main()
