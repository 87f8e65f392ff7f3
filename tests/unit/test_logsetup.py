"""The server's logging setup: the stdlib's speed switches leave the lines it prints intact."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from extproc.logsetup import configure_logging
configure_logging("info", "%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("extproc.usage")
log.info("%s", '{"request_id":"r1"}')
log.debug("not shown")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("extproc.processor").exception("stage %s failed", "pii")
"""


def test_lines_and_tracebacks_survive_the_switches() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    lines = r.stderr.splitlines()
    assert lines[0] == 'INFO extproc.usage: {"request_id":"r1"}'
    assert lines[1] == "ERROR extproc.processor: stage pii failed"
    assert lines[2] == "Traceback (most recent call last):" and lines[-1].startswith("ZeroDivisionError")
    assert "not shown" not in r.stderr
