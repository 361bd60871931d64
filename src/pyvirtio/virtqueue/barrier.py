"""A full memory barrier for ring code.

VIRTIO 1.4 asks for a full barrier where a side stores one thing and then loads
another, for example re-enabling notifications and then checking for new
buffers (§2.7.10, §2.8.10). x86 may reorder a store with a later load, and
Python has no fence of its own. Taking and releasing a lock runs locked
instructions, which are full barriers on x86, and the GIL does not provide this
across processes. The other ring accesses rely on the order the code writes
them in (entry before index), which x86 keeps.
"""

from __future__ import annotations

import threading

__all__ = ["full_barrier"]

_lock = threading.Lock()


def full_barrier() -> None:
    """Order every earlier store before every later load."""
    _lock.acquire()
    _lock.release()
