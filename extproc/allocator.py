"""glibc malloc settings for a server that handles large request bodies.

glibc serves allocations above M_MMAP_THRESHOLD (128 KiB) with mmap and returns them to the OS on
free, but it raises that threshold dynamically to the size of each mmapped block freed, up to
32 MiB. After the first 16 MiB upload every later one comes from the heap arenas, whose freed
space glibc keeps: the soak's large uploads left the server ~100 MB above where it started. A fixed
threshold turns the dynamic adjustment off, so large bodies always go back to the OS; and a trim
threshold returns freed heap tops sooner. Settings already given in the environment (MALLOC_*_)
win; other allocators (musl, jemalloc) are left alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable

log = logging.getLogger("extproc.allocator")

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 1024 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024
# Bodies in flight, or open streams, at their peak since the last check, after which a trim is
# worth its cost (a few ms in a worker thread).
TRIM_AFTER_BYTES = 8 * 1024 * 1024
TRIM_AFTER_STREAMS = 1000
# grpc's threads each get an arena by default (8 x cores): two keep fragmentation down.
ARENA_MAX = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, looked up once: find_library runs ldconfig in a subprocess, too slow to repeat at
    every trim. None on other C libraries (mallopt and malloc_trim are glibc's)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  # glibc only: AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune() -> bool:
    """Apply the settings; False when this is not glibc (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    done = True
    for env, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
    ):
        if env in os.environ:
            continue
        if libc.mallopt(param, value) != 1:
            log.warning("mallopt(%d, %d) was refused", param, value)
            done = False
    return done


def trim() -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim also releases free pages inside the
    heap, not only at its top). Takes a few milliseconds on a large heap: call it off the event loop."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


async def trim_after_peaks(peaks: Callable[[], tuple[int, int]], interval: float = 5.0) -> None:
    """Large request bodies pass through the transport's buffers in many small pieces, and a burst
    of thousands of requests leaves as many contexts, parsed bodies and replies behind: glibc keeps
    their space in its arenas after they are freed (the soak's 16 MiB uploads left ~50 MB behind,
    its burst of 5,000 requests ~70 MB). Once a peak has passed (`peaks` says how many body bytes
    and streams were in flight at most since the last call, and restarts), trim in a worker thread."""
    while True:
        await asyncio.sleep(interval)
        body_bytes, streams = peaks()
        if body_bytes >= TRIM_AFTER_BYTES or streams >= TRIM_AFTER_STREAMS:
            await asyncio.to_thread(trim)
