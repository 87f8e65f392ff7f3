"""CPU the ext_proc server spends per request, measured from /proc (independent of machine noise
in a way latency is not). Drives the real stack with wrk at one connection for a fixed time and
divides the server process's user+system CPU by the requests served.

    .venv/bin/python tests/bench/bench_server_cpu.py [--duration 10] [--connections 1] [--redis] [--limits]
        [--profile OUT]

--redis: the Redis backend (a redis-server of its own), where records go through a Redis stream and
the server's ledger consumer moves them into the SQLite ledger.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import start_redis  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

BODY = '{"model":"gpt-5.5","messages":[{"role":"user","content":"hello there, how are you today?"}]}'


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--redis", action="store_true", help="the Redis backend instead of the embedded one")
    parser.add_argument("--limits", action="store_true", help="the tenant has requests and tokens per minute")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the server over the measured run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    redis, url = start_redis() if args.redis else (None, None)
    stack, admin = make_stack(work, url)
    secret, _ = admin.key("bench", "cpu")
    if args.limits:
        done = admin.cli("limits", "set", "--tenant", "bench", "--rpm", "1000000000", "--tpm", "1000000000000")
        assert done.returncode == 0, done.stderr
    stack.start()
    try:
        pid = stack.procs["server"].pid
        lua = work / "post.lua"
        lua.write_text(
            f'wrk.method = "POST"\nwrk.body = {BODY!r}\nwrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {secret}"\n'
        )
        url = stack.base_url + "/v1/chat/completions"
        subprocess.run(["wrk", "-t1", "-c1", "-d2s", "-s", str(lua), url], capture_output=True, check=True)
        spy = None
        if args.profile:
            py_spy = Path(sys.executable).with_name("py-spy")
            cmd = [str(py_spy), "record", "-r", "500", "-f", "raw", "-o", str(args.profile), "-p", str(pid)]
            spy = subprocess.Popen(
                [*cmd, "-d", str(args.duration)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        before = cpu_seconds(pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(lua), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        used = cpu_seconds(pid) - before
        if spy is not None:
            spy.wait(30)
        m = re.search(r"(\d+) requests in", out)
        assert m and "Non-2xx" not in out, out
        n = int(m.group(1))
        print(f"{n} requests, server CPU {used:.2f} s -> {used / n * 1e6:.0f} us CPU per request")
    finally:
        stack.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)


if __name__ == "__main__":
    main()
