"""tnllm.memory: freed heap pages really go back to the OS; tnllm.webui.malloc: the arena cap defers to the
environment."""

from __future__ import annotations

import sys

import pytest

from tnllm.memory import malloc_trim, peak_rss_bytes, process_rss_bytes
from tnllm.webui.malloc import limit_malloc_arenas

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or process_rss_bytes() is None,
                                 reason="glibc malloc and /proc needed")


@glibc_linux
def test_malloc_trim_returns_fragmented_free_pages():
    """200 MiB of 64 KiB heap blocks (below the mmap threshold), every 16th kept alive so the heap top
    cannot simply shrink: after free + malloc_trim most of the freed pages leave the process."""
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # zero-filled: the pages are touched
    grown = process_rss_bytes()
    keep = blocks[::16]
    del blocks
    malloc_trim()
    freed = grown - process_rss_bytes()
    assert freed > 120 * 2**20, f"only {freed / 2**20:.0f} MiB of ~188 MiB freed went back to the OS"
    assert len(keep) == 200


@glibc_linux
def test_arena_cap_defers_to_the_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas(2) is True


@glibc_linux
def test_peak_rss_keeps_the_high_water_mark_of_a_fresh_process():
    """A child that touches 300 MiB and frees it reports a peak above 300 MiB while its current RSS falls back;
    a fresh child that touches nothing reports a small peak (the parent's peak is not inherited)."""
    import subprocess

    code = ("from tnllm.memory import peak_rss_bytes, process_rss_bytes; "
            "b = bytearray({n}); del b; print(peak_rss_bytes(), process_rss_bytes())")
    big = subprocess.run([sys.executable, "-c", code.format(n=300 * 2**20)], capture_output=True, text=True,
                         check=True).stdout.split()
    small = subprocess.run([sys.executable, "-c", code.format(n=0)], capture_output=True, text=True,
                           check=True).stdout.split()
    peak, now = map(int, big)
    assert peak > 300 * 2**20 > now
    assert int(small[0]) < peak - 250 * 2**20 and peak_rss_bytes() >= process_rss_bytes()
