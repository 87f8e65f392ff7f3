"""Run Envoy + the ext_proc server + the mock provider as one local stack.

Used by `extproc dev` and by the end-to-end tests, so the tests start the stack exactly as a
newcomer does: the real CLI in subprocesses, the real envoy.yaml (provider clusters pointed at the
mock), the real Envoy binary.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import envoyconf

# Ports this process handed out: never twice (two stacks of one test session must not collide).
_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range when there is room: a port the kernel
    hands out for outgoing connections can be taken by one between this check and the server's
    bind (CI saw a mock provider fail to start that way), a port below the range cannot."""
    low = _ephemeral_low()
    if low > 20_100:
        for _ in range(200):
            port = random.randint(20_000, low - 1)
            if port in _GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _GIVEN.add(port)
    return port


def free_ports_run(n: int, host: str = "127.0.0.1") -> int:
    """The first of n consecutive ports free now (workers with server.worker_listen: ports listen
    on port+i)."""
    for _ in range(200):
        first = free_port(host)
        taken = False
        for port in range(first + 1, first + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError:
                    taken = True
                    break
        if not taken and first + n - 1 <= 65535:
            _GIVEN.update(range(first, first + n))
            return first
    raise OSError(f"no {n} consecutive free ports")


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM, up to 10 s to exit, then SIGKILL; nothing for a process already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_until(what: str, check: Callable[[], bool], procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """Poll `check` until true; fail early if any of `procs` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early with code {p.returncode} (args: {p.args!r})")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return bool(r.status == 200)


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


@dataclass
class Stack:
    gateway_config: Path
    envoy_config: Path
    workdir: Path
    ports: envoyconf.LocalPorts
    real_providers: frozenset[str] = frozenset()
    with_mock: bool = True
    with_server: bool = True
    # The mock provider's required keys (MOCK_OPENAI_KEY, MOCK_ANTHROPIC_KEY): environment, not argv.
    mock_env: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # Envoy's random_sampling for traces (gateway.yaml tracing.sampling_ratio), when it traces.
    sampling_ratio: float | None = None
    # The server's metrics port and the metrics behind it (off: as if never configured).
    metrics: bool = True
    # `extproc serve --workers`; with extproc_endpoints > 1 Envoy's extproc cluster lists that many
    # consecutive ports from ports.extproc (gateway.yaml server.worker_listen: ports).
    workers: int | str = 1
    extproc_endpoints: int = 1
    # A command to run a process under, by process name ("envoy", "server"): valgrind, for the
    # instruction-count bench. Readiness waits scale by `slowdown`.
    wrap: dict[str, list[str]] = field(default_factory=dict)
    slowdown: float = 1.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.listener}"

    @property
    def mock_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.mock}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _open_log(self, name: str) -> IO[bytes]:
        log = open(self.log_path(name), "wb")  # noqa: SIM115  # closed in stop()
        self._logs.append(log)
        return log

    def _spawn(
        self, name: str, args: Sequence[str], stdout_log: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process logging to <name>.log; with `stdout_log`, its stdout goes to a file of its
        own (Envoy's JSON access log stays parseable, apart from Envoy's own messages on stderr)."""
        log = self._open_log(name)
        out = self._open_log(stdout_log) if stdout_log else log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        args = [*self.wrap.get(name, ()), *args]
        proc = subprocess.Popen(args, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=full_env)
        self.procs[name] = proc
        return proc

    def start_server(self) -> None:
        py = [sys.executable, "-m", "extproc"]
        listen = f"{self.ports.host}:{self.ports.extproc}"
        metrics = f"{self.ports.host}:{self.ports.metrics or 0}" if self.metrics else "off"
        args = [*py, "serve", "--config", str(self.gateway_config), "--listen", listen, "--metrics-listen", metrics]
        self._spawn("server", [*args, "--workers", str(self.workers)])
        ports = [*range(self.ports.extproc, self.ports.extproc + self.extproc_endpoints)]
        if self.metrics and self.ports.metrics:
            ports.append(self.ports.metrics)  # with workers, the supervisor's opens once all started
        ready = lambda: all(tcp_open(p) for p in ports)  # noqa: E731
        wait_until("ext_proc server", ready, list(self.procs.values()), 30 * self.slowdown)

    def stop_server(self) -> None:
        self._stop("server")

    def start(self, timeout: float = 60) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        derived = envoyconf.derive_local(
            envoyconf.load(self.envoy_config),
            self.ports,
            self.real_providers,
            otlp=envoyconf.OtlpTarget.from_env({**os.environ, **self.env}),
            sampling_ratio=self.sampling_ratio,
            extproc_endpoints=self.extproc_endpoints,
        )
        envoy_yaml = self.workdir / "envoy.yaml"
        envoy_yaml.write_text(envoyconf.dump(derived))
        py = [sys.executable, "-m", "extproc"]
        try:
            if self.with_mock:
                self._spawn(
                    "mock",
                    [*py, "mock-provider", "--host", self.ports.host, "--port", str(self.ports.mock)],
                    env=self.mock_env,
                )
            if self.with_server:
                self.start_server()
            self._spawn(
                "envoy",
                [
                    envoyconf.envoy_binary(),
                    "-c",
                    str(envoy_yaml),
                    "--concurrency",
                    "2",
                    "--log-level",
                    "warn",
                    "--disable-hot-restart",  # lets several stacks (tests, dev) share a machine
                    # Access log lines show up within 0.1 s instead of Envoy's default 10 s.
                    "--file-flush-interval-msec",
                    "100",
                ],
                stdout_log="access",
            )
            procs = list(self.procs.values())
            envoy_ready = f"http://{self.ports.host}:{self.ports.admin}/ready"
            wait_until("envoy", lambda: http_ok(envoy_ready), procs, timeout * self.slowdown)
            if self.with_mock:
                wait_until("mock provider", lambda: http_ok(f"{self.mock_url}/_mock/health"), procs, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _stop(self, name: str) -> None:
        stop_process(self.procs.pop(name, None))

    def stop(self) -> None:
        for name in list(self.procs):
            self._stop(name)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def wait(self) -> int:
        """Block until any process exits (or Ctrl-C); returns its exit code."""
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; see {self.log_path(name)}", file=sys.stderr)
                    return proc.returncode or 1
            time.sleep(0.2)
