"""Check that two processes sharing a memfd see each other's writes in order.

vhost-user rests on this: the guest's RAM (QEMU's memfd) is mapped by the
back-end too.  One process increments a 64-bit counter in a shared page as fast
as it can; the other reads it and counts every read that goes *backwards*,
which cache coherence forbids.  Run: ``python tools/shm_coherence.py [seconds]``.
Exit status 1 when any stale read was seen.  See docs/platform-notes.md.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

SIZE = 1 << 20
COUNTER = struct.Struct("<Q")


def main() -> int:
    """Run the writer and the reader; print what the reader saw."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    fd = os.memfd_create("coherence")
    os.ftruncate(fd, SIZE)
    pid = os.fork()
    shared = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(shared)
    end = time.monotonic() + seconds
    if pid == 0:
        value = 0
        while time.monotonic() < end:
            for _ in range(1000):
                value += 1
                COUNTER.pack_into(view, 0x1300, value)
        os._exit(0)
    reads = stale = windows = 0
    last = 0
    longest = 0.0
    window_start: float | None = None
    while time.monotonic() < end:
        value = COUNTER.unpack_from(view, 0x1300)[0]
        reads += 1
        if value < last:
            stale += 1
            if window_start is None:
                window_start = time.perf_counter()
                windows += 1
            continue
        if window_start is not None:
            longest = max(longest, time.perf_counter() - window_start)
            window_start = None
        last = value
    os.waitpid(pid, 0)
    print(f"{reads} reads, {stale} stale reads in {windows} windows, "
          f"longest {longest * 1000:.1f} ms")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
