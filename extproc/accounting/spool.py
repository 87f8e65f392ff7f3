"""The local write-ahead file for usage records: where a record waits while its store (Redis, the
ledger) cannot take it, so that a request that was served is always billed.

Layout of the spool directory (shared by every server process of a host):
  seg-<time_ns>-<pid>-<random>.spool   segments: one record a line, `<crc32 hex8> <json>\\n`
  .tmp-<...>                           a segment being created (locked, renamed before any write)
  dead-<segment name>.lines            lines that failed their CRC or did not parse (kept for a human)
  dead-refused-<pid>-<random>.lines    records the ledger refused as invalid: {"error", "record"}

Why the rules are what they are:
- Each process appends only to its own active segment and holds an exclusive `flock` on it for as
  long as it writes. Replay takes the same lock (non-blocking) before reading a segment, so it can
  never read a segment that is still growing, two replayers never take the same segment, and the
  segments of a process that died (the kernel dropped its locks) are replayed by whoever looks next.
- A segment is created under a temporary name, locked, then renamed: a replayer never sees an
  unlocked, empty segment that is about to be written.
- `append` returns only after write + fsync of the batch holding the record; appends of the same
  moment share one write and one fsync (group commit), in a worker thread.
- A crash can tear only the last line of a segment (its append never returned, so nobody was told
  it was kept); the CRC and the missing newline find it, and only that line is skipped. A failed
  write seals the segment, so a torn line is never followed by good ones.
- A segment is deleted only after `apply` accepted every record in it. A crash between the two
  replays the segment again, which is why every `apply` must be idempotent by request_id (the Redis
  script's seen key, the ledger's primary key).
- The size bound is soft: the directory total is re-read at start and after every replay pass, and
  this process adds what it writes in between (other processes' recent appends are seen late).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..throttle import LogThrottle
from .record import UsageRecord

log = logging.getLogger("extproc.accounting.spool")

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".spool"
TMP_PREFIX = ".tmp-"
DEAD_PREFIX = "dead-"
# A temporary file older than this was left by a process that died while creating a segment.
_STALE_TMP_SECONDS = 60.0
_LOG_INTERVAL = 60.0


T = TypeVar("T")

Apply = Callable[[list[UsageRecord]], Awaitable[Any]]


def record_json(rec: UsageRecord) -> bytes:
    """The record as the ledger and the stream see it."""
    return orjson.dumps(rec.to_dict())


def parse_record(payload: bytes | str) -> UsageRecord:
    """Raises ValueError for anything that is not a whole record, so callers can dead-letter it."""
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if not isinstance(d.get("request_id"), str) or not d["request_id"]:
        raise ValueError("no request_id")
    if not isinstance(d.get("ts"), str):
        raise ValueError("no ts")
    try:
        return UsageRecord.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"not a usage record: {err}") from None


def encode_line(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@dataclass
class DecodedSegment:
    payloads: list[bytes] = field(default_factory=list)
    # Lines that end in a newline but fail their CRC: damage, not a crash (a crash tears the end).
    corrupt: list[bytes] = field(default_factory=list)
    # Bytes after the last newline: the append that was in progress when the writer died.
    torn_tail: bytes = b""


def decode_segment(data: bytes) -> DecodedSegment:
    out = DecodedSegment()
    lines = data.split(b"\n")
    out.torn_tail = lines.pop()
    for line in lines:
        if len(line) < 10 or line[8:9] != b" ":
            out.corrupt.append(line)
            continue
        try:
            crc = int(line[:8], 16)
        except ValueError:
            out.corrupt.append(line)
            continue
        payload = line[9:]
        if zlib.crc32(payload) != crc:
            out.corrupt.append(line)
        else:
            out.payloads.append(payload)
    return out


@dataclass
class SpoolCounters:
    """Process-wide figures (the observability issue exports them as metrics)."""

    appended: int = 0
    # Every record refused because the spool was at spool_max_bytes: lost for billing, so loud.
    dropped_full: int = 0
    # Records whose write or fsync failed twice (disk error): also lost.
    write_errors: int = 0
    flushes: int = 0
    replayed: int = 0
    segments_deleted: int = 0
    torn_tails: int = 0
    corrupt_lines: int = 0
    unparsable_lines: int = 0


@dataclass
class _Claimed:
    path: Path
    fd: int
    size: int
    records: list[UsageRecord]


class Spool:
    """Append-only segments in one directory; see the module docstring for the rules.

    Use from one event loop. Blocking file work runs in worker threads under `_lock`, which the
    event loop never takes."""

    def __init__(
        self, path: str | Path, max_bytes: int, segment_bytes: int = 4 * 1024 * 1024, commit_window: float = 0.002
    ) -> None:
        self.path = Path(path)
        self.commit_window = commit_window
        self.max_bytes = max_bytes
        self.segment_bytes = max(1, min(segment_bytes, max_bytes))
        self.counters = SpoolCounters()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seg_path: Path | None = None
        self._seg_size = 0
        # Directory total as last scanned, plus what this process reserved since (event loop only).
        self._bytes = 0
        self._pending: list[tuple[bytes, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._replay_lock = asyncio.Lock()
        # One error line a minute per kind: a full or broken disk must not flood the log too.
        self._throttle = LogThrottle(_LOG_INTERVAL)
        self._dead_name = f"{DEAD_PREFIX}refused-{os.getpid()}-{secrets.token_hex(4)}.lines"
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def size_bytes(self) -> int:
        """Approximate bytes waiting in the directory (all processes)."""
        return self._bytes

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            await asyncio.to_thread(self.path.mkdir, parents=True, exist_ok=True)
            self._bytes += await asyncio.to_thread(self._scan_sync)
            self._started = True

    async def append(self, rec: UsageRecord) -> bool:
        """True once the record is on disk (fsync'd); False when it could not be kept (spool full
        or disk error: counted and logged here). Never raises."""
        try:
            if not self._started:
                await self.start()
            line = encode_line(record_json(rec))
        except Exception:
            self.counters.write_errors += 1
            if self._throttle.allow("unusable"):
                log.exception(
                    "usage spool %s cannot take usage records (%d lost so far)", self.path, self.counters.write_errors
                )
            return False
        if self._bytes + len(line) > self.max_bytes:
            self.counters.dropped_full += 1
            if self._throttle.allow("full"):
                log.error(
                    "usage spool %s is full (%d of %d bytes): dropping usage records, %d dropped so far",
                    self.path,
                    self._bytes,
                    self.max_bytes,
                    self.counters.dropped_full,
                )
            return False
        self._bytes += len(line)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((line, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # Shielded: a cancelled caller must not cancel the write other callers share.
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        """Group commit: everything queued in the window or while the previous write+fsync ran
        goes in the next (an fsync and a thread hop per record would dominate the request's cost)."""
        if self.commit_window:
            await asyncio.sleep(self.commit_window)
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            ok = True
            try:
                await asyncio.to_thread(self._write_sync, data)
            except Exception as err:
                ok = False
                self._bytes -= len(data)
                self.counters.write_errors += len(batch)
                if self._throttle.allow("write"):
                    log.error(
                        "usage spool %s: write failed (%s): usage records lost, %d so far",
                        self.path,
                        err,
                        self.counters.write_errors,
                    )
            else:
                self.counters.appended += len(batch)
                self.counters.flushes += 1
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(ok)

    async def flush(self) -> None:
        """Wait until every append so far is on disk."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def seal(self) -> None:
        """Close the active segment so it can be replayed (by this process or any other)."""
        await asyncio.to_thread(self._seal_sync)

    async def close(self) -> None:
        await self.flush()
        await self.seal()

    async def replay(self, apply: Apply, batch: int = 500) -> int:
        """Feed every record of every unlocked segment to `apply`, in chunks of `batch`, and
        delete each segment once all of its records were applied. If `apply` raises, the
        segment stays (it will be replayed whole, hence idempotent `apply`) and the error
        propagates. Returns how many records were applied."""
        await self.start()
        async with self._replay_lock:
            await self.seal()
            paths = await asyncio.to_thread(self._list_sync)
            total = 0
            try:
                for path in paths:
                    claimed = await _in_thread_or_release(self._claim_sync, path)
                    if claimed is None:
                        continue
                    handed_over = False
                    try:
                        for i in range(0, len(claimed.records), batch):
                            chunk = claimed.records[i : i + batch]
                            await apply(chunk)
                            total += len(chunk)
                            self.counters.replayed += len(chunk)
                        # From here the thread owns the descriptor (it closes it even on error).
                        handed_over = True
                        await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self._delete_sync, claimed)))
                        self.counters.segments_deleted += 1
                    finally:
                        if not handed_over:
                            # Closing a local file's descriptor does not block; it drops the lock.
                            os.close(claimed.fd)
            finally:
                self._bytes = await asyncio.to_thread(self._scan_sync) + self._queued_bytes()
            return total

    def _queued_bytes(self) -> int:
        return sum(len(line) for line, _ in self._pending)

    async def set_aside(self, items: Sequence[tuple[UsageRecord, str]]) -> None:
        """Keep records their store refused as invalid in `dead-refused-<pid>-<random>.lines`
        (JSON lines: error, record), fsync'd: for a human, never replayed. Raises on a disk
        error, so the caller keeps the segment they came from."""
        lines = [orjson.dumps({"error": err, "record": rec.to_dict()}) + b"\n" for rec, err in items]
        await asyncio.to_thread(self._set_aside_sync, b"".join(lines))
        log.error(
            "usage spool %s: %d usage records were refused as invalid; kept in %s",
            self.path,
            len(items),
            self._dead_name,
        )

    def _set_aside_sync(self, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / self._dead_name, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    # --- worker-thread side -------------------------------------------------------------------

    def _write_sync(self, data: bytes) -> None:
        with self._lock:
            if self._fd is not None and self._seg_size > 0 and self._seg_size + len(data) > self.segment_bytes:
                self._seal_locked()
            try:
                self._write_locked(data)
            except OSError as err:
                # The old segment may now end in a torn line: seal it, retry once in a new one.
                log.warning("usage spool %s: write failed (%s), retrying in a new segment", self.path, err)
                self._seal_locked()
                self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        if self._fd is None:
            self._open_segment_locked()
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            self._seal_locked()
            raise
        self._seg_size += len(data)

    def _open_segment_locked(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.path / f"{TMP_PREFIX}{name}"
        final = self.path / f"{SEGMENT_PREFIX}{name}{SEGMENT_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(tmp, final)
            _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._seg_path, self._seg_size = fd, final, 0

    def _seal_sync(self) -> None:
        with self._lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._seg_path, self._seg_size = None, None, 0

    def _list_sync(self) -> list[Path]:
        """Segments oldest first; removes temporary files abandoned by dead processes."""
        segments: list[Path] = []
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        now = time.time()
        for entry in entries:
            if entry.name.startswith(SEGMENT_PREFIX) and entry.name.endswith(SEGMENT_SUFFIX):
                segments.append(Path(entry.path))
            elif entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                        _unlink_if_unlocked(Path(entry.path))
        return sorted(segments, key=lambda p: p.name)

    def _scan_sync(self) -> int:
        total = 0
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.startswith(SEGMENT_PREFIX) and entry.name.endswith(SEGMENT_SUFFIX):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def _claim_sync(self, path: Path) -> _Claimed | None:
        """Lock, read and parse one segment; None if another process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            st = os.fstat(fd)
            # The previous holder may have replayed and unlinked it between our open and our lock.
            if st.st_nlink == 0:
                os.close(fd)
                return None
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        decoded = decode_segment(data)
        records: list[UsageRecord] = []
        dead: list[bytes] = list(decoded.corrupt)
        for payload in decoded.payloads:
            try:
                records.append(parse_record(payload))
            except ValueError:
                dead.append(payload)
                self.counters.unparsable_lines += 1
        self.counters.corrupt_lines += len(decoded.corrupt)
        if decoded.torn_tail:
            self.counters.torn_tails += 1
            log.warning(
                "usage spool %s: skipped a torn last line (%d bytes) of %s: a write its process never finished",
                self.path,
                len(decoded.torn_tail),
                path.name,
            )
        if dead:
            dead_path = self.path / f"{DEAD_PREFIX}{path.name}.lines"
            # Same name on every claim of this segment: a replay that is retried rewrites, never doubles.
            with open(dead_path, "wb") as f:
                f.write(b"".join(line + b"\n" for line in dead))
                f.flush()
                os.fsync(f.fileno())
            log.error(
                "usage spool %s: %d damaged lines in %s could not be replayed; kept in %s",
                self.path,
                len(dead),
                path.name,
                dead_path.name,
            )
        return _Claimed(path=path, fd=fd, size=st.st_size, records=records)

    def _delete_sync(self, claimed: _Claimed) -> None:
        """Unlink while still holding the lock, so nobody can claim it between the two."""
        try:
            os.unlink(claimed.path)
            _fsync_dir(self.path)
        finally:
            os.close(claimed.fd)


async def _in_thread_or_release(fn: Callable[[Path], _Claimed | None], path: Path) -> _Claimed | None:
    """Run a claim in a thread; if we are cancelled meanwhile, release what the thread claimed,
    or the segment would stay locked (unreplayable by anyone) until this process exits."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, path))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:

        def release(f: asyncio.Future[_Claimed | None]) -> None:
            if not f.cancelled() and f.exception() is None and (claimed := f.result()) is not None:
                os.close(claimed.fd)

        fut.add_done_callback(release)
        raise


def _unlink_if_unlocked(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """A new or removed name survives a power cut only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
