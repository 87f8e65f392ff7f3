"""The usage spool on real files: durability across SIGKILL, torn lines, the bound, segment locks
shared by processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from extproc.accounting.record import UsageRecord
from extproc.accounting.spool import (
    DEAD_PREFIX,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    TMP_PREFIX,
    Spool,
    encode_line,
    parse_record,
    record_json,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def rec(i: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{i:05d}",
        ts=datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        tenant="acme",
        key_id="key_1",
        model="gpt-4o",
        input_tokens=i,
        output_tokens=2 * i,
        total_tokens=3 * i,
        cost_usd=f"0.{i:06d}",
    )


def line(i: int) -> bytes:
    return encode_line(record_json(rec(i)))


def read_lines(path: str | Path) -> list[bytes]:
    return Path(path).read_bytes().splitlines()


class Collect:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    async def __call__(self, recs: list[UsageRecord]) -> None:
        self.records.extend(recs)

    @property
    def ids(self) -> list[str]:
        return [r.request_id for r in self.records]


def segments(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name.startswith(SEGMENT_PREFIX) and p.name.endswith(SEGMENT_SUFFIX))


async def test_append_then_replay_returns_every_record_and_frees_the_space(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=MIB)
    await spool.start()
    for i in range(10):
        assert await spool.append(rec(i))
    assert spool.size_bytes == sum(len(line(i)) for i in range(10))
    got = Collect()
    assert await spool.replay(got) == 10
    assert [r.to_dict() for r in got.records] == [rec(i).to_dict() for i in range(10)]
    assert segments(tmp_path / "spool") == []
    assert spool.size_bytes == 0
    assert await spool.replay(Collect()) == 0


def _truncate_last(data: bytes, by: int) -> bytes:
    return data[:-by]


def _flip_byte_in_second_line(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[1] = lines[1][:20] + (b"X" if lines[1][20:21] != b"X" else b"Y") + lines[1][21:]
    return b"\n".join(lines)


# name, segment content, replayed ids, torn tails, damaged lines kept in the dead file
DAMAGE_CASES: list[tuple[str, bytes, list[int], int, int]] = [
    ("clean", line(0) + line(1) + line(2), [0, 1, 2], 0, 0),
    ("torn last line", _truncate_last(line(0) + line(1) + line(2), 7), [0, 1], 1, 0),
    ("torn right after its crc", line(0) + line(1)[:9], [0], 1, 0),
    ("only a torn line", line(0)[:30], [], 1, 0),
    ("bad crc in the middle", _flip_byte_in_second_line(line(0) + line(1) + line(2)), [0, 2], 0, 1),
    ("garbage line in the middle", line(0) + b"hello\n" + line(2), [0, 2], 0, 1),
    ("crc fine but not a record", line(0) + encode_line(b'{"x": 1}') + encode_line(b"[1"), [0], 0, 2),
    ("empty segment", b"", [], 0, 0),
]


@pytest.mark.parametrize(
    ("content", "want", "torn", "dead"), [c[1:] for c in DAMAGE_CASES], ids=[c[0] for c in DAMAGE_CASES]
)
async def test_damaged_lines_are_skipped_alone(
    tmp_path: Path, content: bytes, want: list[int], torn: int, dead: int
) -> None:
    (tmp_path / f"{SEGMENT_PREFIX}00000000000000000001-1-abcd{SEGMENT_SUFFIX}").write_bytes(content)
    spool = Spool(tmp_path, max_bytes=MIB)
    got = Collect()
    await spool.replay(got)
    assert got.ids == [rec(i).request_id for i in want]
    assert spool.counters.torn_tails == torn
    dead_files = [p for p in os.scandir(tmp_path) if p.name.startswith(DEAD_PREFIX)]
    if dead:
        assert len(dead_files) == 1
        assert len(read_lines(dead_files[0].path)) == dead
    else:
        assert dead_files == []
    assert segments(tmp_path) == []


async def test_torn_line_from_a_real_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MIB)
    for i in range(4):
        await spool.append(rec(i))
    await spool.close()
    [seg] = segments(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-5])
    got = Collect()
    await Spool(tmp_path, max_bytes=MIB).replay(got)
    assert got.ids == [rec(i).request_id for i in range(3)]


async def test_full_spool_drops_counts_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=len(line(0)) * 3 + 10)
    with caplog.at_level(logging.ERROR, logger="extproc.accounting.spool"):
        results = [await spool.append(rec(i)) for i in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert spool.counters.dropped_full == 7
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1
    got = Collect()
    await spool.replay(got)
    assert len(got.records) == 3
    assert await spool.append(rec(99)), "replay frees the space"


async def test_segments_rotate_and_replay_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MIB, segment_bytes=max(len(line(i)) for i in range(10)) * 2)
    for i in range(10):
        await spool.append(rec(i))
    await spool.seal()
    segs = segments(tmp_path)
    assert len(segs) == 5
    assert all(len(read_lines(s)) == 2 for s in segs)
    got = Collect()
    assert await spool.replay(got) == 10
    assert got.ids == [rec(i).request_id for i in range(10)]
    assert segments(tmp_path) == []


async def test_concurrent_appends_share_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MIB)
    await spool.start()
    assert all(await asyncio.gather(*(spool.append(rec(i)) for i in range(200))))
    assert spool.counters.appended == 200
    assert spool.counters.flushes < 20, "appends of the same tick share one write and fsync"
    got = Collect()
    await spool.replay(got)
    assert sorted(got.ids) == sorted(rec(i).request_id for i in range(200))


async def test_failed_apply_keeps_the_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MIB)
    for i in range(12):
        await spool.append(rec(i))
    seen: list[str] = []

    async def fails_on_second_chunk(recs: list[UsageRecord]) -> None:
        if seen:
            raise ConnectionError("store went away")
        seen.extend(r.request_id for r in recs)

    with pytest.raises(ConnectionError):
        await spool.replay(fails_on_second_chunk, batch=5)
    assert len(segments(tmp_path)) == 1
    got = Collect()
    assert await spool.replay(got, batch=5) == 12, "the whole segment again: apply must be idempotent"
    assert segments(tmp_path) == []


async def test_a_locked_segment_waits_for_its_writer(tmp_path: Path) -> None:
    """Another process's active segment is locked; once that process closes (or dies) it is free."""
    mine, theirs = Spool(tmp_path, max_bytes=MIB), Spool(tmp_path, max_bytes=MIB)
    await mine.append(rec(1))
    await theirs.append(rec(2))
    got = Collect()
    await mine.replay(got)
    assert got.ids == [rec(1).request_id]
    await theirs.close()
    await mine.replay(got)
    assert got.ids == [rec(1).request_id, rec(2).request_id]


async def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    stale, fresh = tmp_path / f"{TMP_PREFIX}old", tmp_path / f"{TMP_PREFIX}new"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    await Spool(tmp_path, max_bytes=MIB).replay(Collect())
    assert not stale.exists()
    assert fresh.exists()


APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from extproc.accounting.record import UsageRecord
    from extproc.accounting.spool import Spool

    async def main() -> None:
        spool = Spool(sys.argv[1], max_bytes=1 << 30, segment_bytes=4096)
        await spool.start()

        async def one(i: int) -> None:
            if await spool.append(UsageRecord(request_id=f"r{i}", ts=datetime.now(UTC), input_tokens=i)):
                print(f"ok r{i}", flush=True)

        i = 0
        while True:
            await asyncio.gather(*(one(i + j) for j in range(25)))
            i += 25

    asyncio.run(main())
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _read_acks_then_kill(proc: subprocess.Popen[bytes], at_least: int) -> set[str]:
    assert proc.stdout is not None
    acked: set[str] = set()
    while len(acked) < at_least:
        raw = proc.stdout.readline()
        assert raw, f"appender exited: {proc.stderr.read().decode() if proc.stderr else ''}"
        acked.add(raw.decode().split()[1])
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    # Lines written before the kill: acknowledged too. A torn last stdout line is not an ack.
    acked |= {ln.split()[1] for ln in out.decode().splitlines() if ln.startswith("ok ") and len(ln.split()) == 2}
    return acked


async def test_every_acknowledged_append_survives_sigkill(tmp_path: Path) -> None:
    proc = _spawn(APPENDER, str(tmp_path))
    acked = await asyncio.to_thread(_read_acks_then_kill, proc, 400)
    assert proc.returncode == -signal.SIGKILL
    got = Collect()
    await Spool(tmp_path, max_bytes=1 << 30).replay(got)
    assert len(got.ids) == len(set(got.ids)), "no record twice"
    assert acked <= set(got.ids), f"lost: {sorted(acked - set(got.ids))[:5]}"
    # Replayed beyond the acks: appends fsync'd just before the kill, never more than one batch.
    assert len(set(got.ids) - acked) <= 25
    assert segments(tmp_path) == []


REPLAYER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from extproc.accounting.spool import Spool

    async def main() -> None:
        directory, out, go = sys.argv[1], sys.argv[2], sys.argv[3]
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.005)
        with open(out, "w") as f:
            async def apply(recs):
                for r in recs:
                    f.write(r.request_id + "\\n")
                f.flush()
                await asyncio.sleep(0.002)
            await Spool(directory, max_bytes=1 << 30).replay(apply)

    asyncio.run(main())
    """
)


async def test_two_processes_replaying_one_directory_apply_each_record_once(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, max_bytes=1 << 30, segment_bytes=len(line(0)) * 10)
    n = 2000
    for start in range(0, n, 10):
        await asyncio.gather(*(spool.append(rec(i)) for i in range(start, start + 10)))
    await spool.close()
    assert len(segments(spool_dir)) >= 150
    outs = [tmp_path / "a.out", tmp_path / "b.out"]
    go = tmp_path / "go"
    procs = [_spawn(REPLAYER, str(spool_dir), str(out), str(go)) for out in outs]

    def run() -> None:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline() == b"ready\n"
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()

    await asyncio.to_thread(run)
    a, b = (out.read_text().split() for out in outs)
    assert a and b, "both processes took segments"
    assert not set(a) & set(b)
    assert len(a) + len(b) == n
    assert set(a) | set(b) == {rec(i).request_id for i in range(n)}
    assert segments(spool_dir) == []


_FULL = UsageRecord(
    request_id="r-full",
    ts=datetime(2026, 12, 7, 16, 0, 0, 123000, tzinfo=UTC),
    tenant="acme",
    key_id="k1",
    model="gpt-5.5",
    status=200,
    stream=True,
    ttft_ms=12.5,
    input_tokens=10,
    cached_input_tokens=4,
    output_tokens=3,
    total_tokens=13,
    cost_usd="0.000123",
    pii={"EMAIL": 2},
    attempts=2,
)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # Every field, as the sink writes it: the same record back.
        (record_json(_FULL), _FULL),
        # Only the required fields: the rest take their defaults.
        (
            b'{"request_id":"r1","ts":"2026-12-07T16:00:00.000Z"}',
            UsageRecord("r1", datetime(2026, 12, 7, 16, tzinfo=UTC)),
        ),
        # Keys that are not fields (a newer writer) are ignored.
        (
            b'{"request_id":"r1","ts":"2026-12-07T16:00:00.000Z","future":1,"tenant":"t"}',
            UsageRecord("r1", datetime(2026, 12, 7, 16, tzinfo=UTC), tenant="t"),
        ),
        # A timestamp without a zone is UTC.
        (b'{"request_id":"r1","ts":"2026-12-07T16:00:00"}', UsageRecord("r1", datetime(2026, 12, 7, 16, tzinfo=UTC))),
    ],
)
def test_parse_record_reads_what_the_sink_writes(payload: bytes, expected: UsageRecord) -> None:
    assert parse_record(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b"[]",
        b'{"ts":"2026-12-07T16:00:00Z"}',
        b'{"request_id":"r1"}',
        b'{"request_id":"","ts":"x"}',
        b'{"request_id":"r1","ts":"yesterday"}',
    ],
)
def test_parse_record_refuses_what_is_not_a_record(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_record(payload)
