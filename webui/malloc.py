"""The chat server's glibc heap setting (docs/reliability.md#host-memory): a decision for a long-running,
many-threaded server, so it is made here and not by the model package, which a script or another server imports
too. What any process can use, reading its memory and trimming its heaps, stays in `tnllm.memory`."""

from __future__ import annotations

import os

from tnllm.memory import GLIBC

MALLOC_ARENAS = 2  # glibc heaps shared by all threads of the server
_M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


def limit_malloc_arenas(n: int) -> bool:
    """Cap the heaps glibc creates from now on at `n` (`mallopt(M_ARENA_MAX, n)`); True if applied.

    Gradio's worker threads then share heaps, so memory one reply frees is reused by the next instead of idling
    in a heap of its own. Call early, before worker threads start; MALLOC_ARENA_MAX in the environment wins.
    """
    if GLIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(GLIBC.mallopt(_M_ARENA_MAX, n))
