"""Cost of the ring operations alone: driver and device in one process, no I/O.

Split: the driver publishes 128 one-descriptor chains at once, the device pops and
pushes each, the driver reaps them.  Packed: the driver adds 128 buffers, the device
pops and pushes each, the driver collects them.  Split indirect: chains shaped like a 1 MiB
FUSE READ from Linux (an indirect table of two readable and 257 writable buffers, the
last 256 of them 4 KiB pages), popped and pushed one at a time.  Prints microseconds
per buffer (per chain for the indirect case).

Usage: ``python benchmarks/ring_ops.py [--batches N]``.
"""

from __future__ import annotations

import argparse
import time

from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import PackedQueue, PackedRingAddresses
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

SIZE = 256
BATCH = 128
BUFFER = 0x10000
TABLE = 0x8000


def split(memory: GuestMemory, batches: int) -> float:
    """Microseconds per buffer: publish, pop, push, reap."""
    addrs = RingAddresses(0x1000, 0x2000, 0x3000)
    driver, device = DriverSplitQueue(memory, SIZE, addrs), SplitQueue(memory, 0, SIZE, addrs)
    heads = [driver.add([(BUFFER, 64)], publish=False) for _ in range(BATCH)]
    start = time.perf_counter()
    for _ in range(batches):
        driver.publish_many(heads)
        while (chain := device.pop()) is not None:
            device.push(chain.head, 0)
        driver.reap()
    return (time.perf_counter() - start) / (batches * BATCH) * 1e6


def split_indirect(memory: GuestMemory, batches: int) -> float:
    """Microseconds per chain: publish an indirect 259-buffer chain, pop, push, reap."""
    addrs = RingAddresses(0x300000, 0x308000, 0x30A000)  # 1024 entries: a table of 259 fits
    driver = DriverSplitQueue(memory, 1024, addrs)
    device = SplitQueue(memory, 0, 1024, addrs, indirect=True)
    pages = [(BUFFER + 0x2000 * i, 4096) for i in range(256)]  # every other page
    head = driver.add_indirect(TABLE, [(BUFFER, 40), (BUFFER + 64, 40)],
                               [(BUFFER + 128, 16), *pages], publish=False)
    count = batches * 4
    start = time.perf_counter()
    for _ in range(count):
        driver.publish(head)
        chain = device.pop()
        assert chain is not None and chain.writable_len == 16 + (256 << 12)
        device.push(chain.head, 0)
        driver.reap()
    return (time.perf_counter() - start) / count * 1e6


def packed(memory: GuestMemory, batches: int) -> float:
    """Microseconds per buffer: add, pop, push, get_used."""
    addrs = PackedRingAddresses(0x40000, 0x48000, 0x48100)
    driver, device = DriverPackedQueue(memory, SIZE, addrs), PackedQueue(memory, 0, SIZE, addrs)
    start = time.perf_counter()
    for _ in range(batches):
        for _ in range(BATCH):
            driver.add([(BUFFER, 64)])
        while (chain := device.pop()) is not None:
            device.push(chain.head, 0)
        driver.get_used()
    return (time.perf_counter() - start) / (batches * BATCH) * 1e6


def main() -> None:
    """Run both layouts and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    fd = create_memfd(4 << 20, "ring-ops")
    memory = GuestMemory()
    memory.set_table([(RegionSpec(0, 4 << 20, 0, 0), fd)])
    print(f"split  publish+pop+push+reap: {split(memory, args.batches):.2f} us per buffer")
    print(f"split  indirect 1 MiB READ chain: {split_indirect(memory, args.batches):.1f} us "
          "per chain")
    print(f"packed add+pop+push+get_used: {packed(memory, args.batches):.2f} us per buffer")


if __name__ == "__main__":
    main()
