"""Host memory of any process: hand freed heap pages back to the OS (glibc; a no-op elsewhere), and read what the
process holds (`process_rss_bytes`, the one resident-memory reading of the app and benchmarks, and its peak,
`peak_rss_bytes`).

glibc keeps freed blocks in its heaps. The chat server frees large, oddly sized activations after every reply,
and the streaming 8-bit loader frees a float copy of every tensor, so resident memory creeps up without any
leak; trimming returns the free pages to the OS. The server's own heap setting (shared arenas) is
`tnllm.webui.malloc`. Measurements: docs/reliability.md#host-memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


GLIBC = _glibc()  # the C library when it is glibc (has malloc_trim and mallopt), else None


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
    return bool(GLIBC.malloc_trim(0)) if GLIBC is not None else False
