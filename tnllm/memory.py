"""Host memory of long-running processes: hand freed heap pages back to the OS (glibc; no-ops elsewhere), and
read what the process holds (`process_rss_bytes`, the one resident-memory reading of the app and benchmarks, and its
peak, `peak_rss_bytes`).

glibc keeps freed blocks in its heaps and gives every new thread its own heap ("arena", up to 8 per core).
The chat server frees large, oddly sized activations from whichever worker thread ran a reply, and the
streaming 8-bit loader frees a float copy of every tensor, so resident memory creeps up without any leak.
Capping the arenas lets threads reuse what others freed; trimming returns the free pages to the OS.
Measurements: docs/reliability.md#host-memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """The highest resident set size of this process so far (Linux /proc VmHWM, reset at exec), or None."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def malloc_trim() -> bool:
    """Return the free pages of every heap to the OS (glibc `malloc_trim(0)`); False where unavailable."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def limit_malloc_arenas(n: int) -> bool:
    """Cap the heaps glibc creates from now on at `n` (`mallopt(M_ARENA_MAX, n)`); True if applied.

    Threads then share heaps, so memory one worker frees is reused by the next instead of idling in a
    heap of its own. Call early, before worker threads start; MALLOC_ARENA_MAX in the environment wins.
    """
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, n))
