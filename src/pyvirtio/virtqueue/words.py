"""Single aligned stores into memory that another process reads while we write.

The rings (VIRTIO 1.4 §2.7, §2.8) and the vhost-user inflight buffer are shared
with the other side, which reads their fields at any moment.  Each store into
them must therefore be one machine store of the field's width: the reader sees
the old value or the new one, never a mix.

``struct.Struct.pack_into`` does not give that: CPython clears the target bytes
before it writes the value, so for an instant a used index, a flags word or an
event offset reads as 0 in the other process (with DPDK and qemu-storage-daemon
that showed up as "available index moved 24708 entries ahead" and "virtqueue
size exceeded").  A memoryview cast to the field's format stores an item with
one fixed-size copy, which compiles to a single store of that width; aligned
to its width, such a store is atomic on x86-64 and arm64.

:class:`Words` holds those typed views of one ring part.  ``pack_into`` stays
for buffers nobody reads concurrently (a request header before it is
published, an indirect table built in private memory).

The views store in native byte order, and VIRTIO 1.x rings are little-endian:
pyvirtio runs on little-endian hosts only, which this module checks on import.
"""

from __future__ import annotations

import ctypes
import sys

from pyvirtio.errors import RingMisaligned

__all__ = ["Words", "host_address"]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("pyvirtio needs a little-endian host: VIRTIO 1.x rings are little-endian")


def host_address(view: memoryview) -> int:
    """The host address of a non-empty writable view's first byte.

    The ctypes object that exports the buffer is dropped at once, so the view
    can be released afterwards (guest memory releases its views on unmap).
    """
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class Words:
    """16-, 32- and 64-bit views of one shared memory area, for single stores.

    ``u16[i]`` is the 16-bit field at byte offset ``2 * i``, ``u32[i]`` the one
    at ``4 * i``, ``u64[i]`` the one at ``8 * i``; only widths up to ``align``
    are made (a part aligned to 4 gets no ``u64``).  Reading them is a single
    load too, and cheaper than ``unpack_from``.

    Args:
        view: the area (a ring part or an inflight region), writable.
        align: the alignment the area's layout guarantees (2, 4, 8 or 16).
        what: names the area in errors ("queue 0 used ring").

    Raises:
        RingMisaligned: the area's host address is not a multiple of ``align``,
            so a store could straddle two words.
    """

    __slots__ = ("u16", "u32", "u64", "view")

    def __init__(self, view: memoryview, align: int, what: str) -> None:
        address = host_address(view) if len(view) else 0
        if address % align:
            raise RingMisaligned(
                f"{what} is at host address {address:#x}, not {align}-aligned"
            )
        self.view = view
        self.u16 = view[: len(view) & ~1].cast("H")
        empty = memoryview(b"").cast("B")
        self.u32 = view[: len(view) & ~3].cast("I") if align >= 4 else empty.cast("I")
        self.u64 = view[: len(view) & ~7].cast("Q") if align >= 8 else empty.cast("Q")
