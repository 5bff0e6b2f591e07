"""Host memory of long-running processes: hand freed heap pages back to the OS (glibc; no-ops elsewhere).

glibc keeps freed blocks in its heaps and gives every new thread its own heap ("arena", up to 8 per core).
Two places in this project free large, oddly sized temporaries over and over: the streaming 8-bit loader
(float copies of each tensor) and the chat server (activations of prompts of every length, freed by
whichever of Gradio's worker threads ran the reply). Measured: peak RSS of a bnb load of a 445 MB fp32
checkpoint 511 MiB without trimming, 264 MiB with a trim after each tensor. `python bench/soak.py` (bundled
model, 4 clients, 2-core VM), RSS at start → after 1 min → end: default glibc, 10 min: 834 → 1,013 → 1,203
MiB (still +15 MiB/min after Gradio's session cap); 2 arenas, 5 min: 648 → 778 → 856; 2 arenas and a trim
after each reply, 5 min: 642 → 708 → 728 (peak 786, falling after the cap).
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
