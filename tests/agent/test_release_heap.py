"""release_free_heap: free glibc heap pages go back to the OS."""

from __future__ import annotations

import platform
import sys

import pytest

from agent.priority import release_free_heap


def anonymous_rss_mib() -> float:
    """Return this process's RssAnon from /proc/self/status, in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("/proc/self/status has no RssAnon line")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is a glibc function",
)
def test_freed_heap_returned_to_os() -> None:
    # 80 MiB of 4,000-byte objects come from glibc's heap (they are above
    # pymalloc's 512-byte limit and below glibc's 128 KiB mmap threshold). The
    # object allocated after them keeps glibc from trimming the heap top.
    blocks = [bytes(4000) for _ in range(20_000)]
    later = bytes(4000)
    del blocks
    before = anonymous_rss_mib()

    assert release_free_heap() is True

    after = anonymous_rss_mib()
    assert before - after > 40, f"RssAnon {before:.1f} MiB before, {after:.1f} after"
    assert len(later) == 4000


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is a glibc function",
)
def test_release_repeats_safely() -> None:
    assert release_free_heap() is True
    assert release_free_heap() is True
