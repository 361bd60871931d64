"""Can another process read a torn ring index while pyvirtio publishes it?

A device publishes used buffers by storing the used index (VIRTIO 1.4 §2.7.8);
the driver, another process, reads it at any moment.  This tool has one process
publish the index ``--pushes`` times and a second process read it as fast as it
can, and counts every read that shows a value the writer never stored.

Two writers are compared:

- ``device``: pyvirtio's own :meth:`SplitQueue.push` over guest memory in a
  memfd, which stores each ring field with one aligned store
  (:mod:`pyvirtio.virtqueue.words`);
- ``pack_into``: ``struct.pack_into`` of the same index, which CPython does by
  clearing the bytes and then writing them one at a time: for an instant the
  reader sees 0 or half a value.

How a read is judged: after each push the writer also stores how many pushes
it has completed in a 64-bit counter.  The reader reads the counter (``a``),
the index (``v``), the counter again (``b``).  Between its two counter reads the
writer completed from ``a`` to ``b + 1`` pushes (the index is stored before the
counter), so ``v`` must be one of ``a .. b + 1`` modulo 2^16; anything else is
torn.  Reads whose window spans 2^15 pushes or more prove nothing and are
skipped (none are expected).

Run ``python tools/shm_coherence.py [--pushes N] [--json]``; exit status 1 when
the ``device`` writer showed a torn value.  tests/unit/test_shared_stores.py
runs it.  On the development VMs (2 vCPUs) the ``pack_into`` writer shows a torn
value in a few percent of reads, the ``device`` writer in none: the memory is
coherent, the old "stale shared memory" was this zero-fill.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import time

from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

SIZE = 0x10000
QUEUE_SIZE = 256
#: Ring parts (split layout) and the writer's bookkeeping, as GPAs = memfd offsets.
RING = RingAddresses(desc=0x1000, avail=0x2000, used=0x3000)
USED_IDX = RING.used + 2
COUNTER = 0x8000  # u64: pushes completed
DONE = 0x8008  # u64: 1 once the writer stopped
READY = 0x8010  # u64: 1 once the reader runs
_U16 = struct.Struct("<H")


def _reader(view: memoryview, out: int) -> None:
    """Read the index until the writer is done; write the counts to fd ``out``."""
    words64 = view[COUNTER : COUNTER + 24].cast("Q")
    index = view[USED_IDX : USED_IDX + 2].cast("H")
    reads = torn = undecided = 0
    example: list[int] = []
    words64[2] = 1
    while not words64[1]:
        a = words64[0]
        v = index[0]
        b = words64[0]
        reads += 1
        span = b + 1 - a
        if span >= 0x8000:
            undecided += 1
        elif (v - a) & 0xFFFF > span:
            torn += 1
            if len(example) < 3:
                example.append(v)
    os.write(out, json.dumps({"reads": reads, "torn": torn, "undecided": undecided,
                              "examples": example}).encode())


def measure(writer: str, pushes: int) -> dict[str, object]:
    """Publish ``pushes`` indices with ``writer`` while a forked reader checks them."""
    fd = create_memfd(SIZE, "shm-coherence")
    shared = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(shared)
    words64 = view[COUNTER : COUNTER + 24].cast("Q")
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(rd)
        try:
            _reader(view, wr)
        finally:
            os._exit(0)
    os.close(wr)
    memory = GuestMemory()
    memory.set_table([(RegionSpec(0, SIZE, 0, 0), fd)])
    queue = SplitQueue(memory, 0, QUEUE_SIZE, RING)
    while not words64[2]:
        time.sleep(0.001)
    start = time.perf_counter()
    if writer == "device":
        push = queue.push
        for i in range(1, pushes + 1):
            push(0, 0)
            words64[0] = i
    else:
        pack = _U16.pack_into
        for i in range(1, pushes + 1):
            pack(view, USED_IDX, i & 0xFFFF)
            words64[0] = i
    elapsed = time.perf_counter() - start
    words64[1] = 1
    with os.fdopen(rd, "rb") as pipe:
        result: dict[str, object] = json.loads(pipe.read())
    os.waitpid(pid, 0)
    del queue
    memory.clear()
    words64.release()
    view.release()
    shared.close()
    os.close(fd)
    result.update(writer=writer, pushes=pushes, seconds=round(elapsed, 3))
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure both writers and print what the reader saw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=2_000_000)
    parser.add_argument("--json", action="store_true", help="one JSON object per writer")
    args = parser.parse_args(argv)
    results = [measure(writer, args.pushes) for writer in ("device", "pack_into")]
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['writer']:>9}: {r['pushes']:,} pushes in {r['seconds']} s, "
                  f"{r['reads']:,} reads, {r['torn']:,} torn (e.g. {r['examples']})")
    return 1 if results[0]["torn"] else 0


if __name__ == "__main__":
    sys.exit(main())
