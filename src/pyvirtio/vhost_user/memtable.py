"""The front-end's memory table: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG over
:class:`~pyvirtio.memory.GuestMemory` (vhost-user.rst "Memory access")."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from pyvirtio.memory import GuestMemory, RegionSpec
from pyvirtio.vhost_user.protocol import close_fds

__all__ = ["MAX_MEM_SLOTS", "MemoryTable"]

log = logging.getLogger(__name__)

#: Memory slots offered with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32


def _region_key(spec: RegionSpec) -> tuple[int, int, int]:
    """What identifies a region in ADD_MEM_REG / REM_MEM_REG: GPA, size, user address."""
    return (spec.guest_addr, spec.size, spec.user_addr)


class MemoryTable:
    """Guest memory as the front-end describes it, with each region's add count.

    QEMU keeps one memory table per vhost device, and a multiqueue virtio-net has
    one vhost device per queue pair on the same connection: each adds (and later
    removes) every region itself.  A region identical to a mapped one is counted,
    not mapped again; each REM_MEM_REG takes one count away; the last one unmaps it.
    The fds passed in are always closed (the mappings keep the memory).
    """

    def __init__(self) -> None:
        self.memory = GuestMemory(MAX_MEM_SLOTS)
        self._refs: Counter[tuple[int, int, int]] = Counter()

    def set_table(self, specs: Sequence[RegionSpec], fds: list[int]) -> None:
        """SET_MEM_TABLE: replace every region.

        Raises:
            BadMemoryRegion: a region cannot be used (the old table stays).
        """
        try:
            self.memory.set_table(zip(specs, fds, strict=True))
        finally:
            close_fds(fds)
        self._refs = Counter(_region_key(spec) for spec in specs)
        log.info(
            "memory table: %s",
            ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.memory.regions) or "empty",
        )

    def add(self, spec: RegionSpec, fd: int) -> bool:
        """ADD_MEM_REG; return whether the memory changed (not when counted again).

        Raises:
            BadMemoryRegion: the region cannot be used.
        """
        key = _region_key(spec)
        try:
            if self._refs[key]:
                self._refs[key] += 1
                log.debug("region %#x+%#x added again (%d times)", spec.guest_addr, spec.size,
                          self._refs[key])
                return False
            self.memory.add_region(spec, fd)
        finally:
            close_fds([fd])
        self._refs[key] = 1
        return True

    def remove(self, spec: RegionSpec) -> bool:
        """REM_MEM_REG; return whether the memory changed (not while counts remain).

        Raises:
            BadMemoryRegion: no such region.
        """
        key = _region_key(spec)
        if self._refs[key] > 1:
            self._refs[key] -= 1
            return False
        self.memory.remove_region(spec)
        self._refs.pop(key, None)
        return True

    def clear(self) -> None:
        """Unmap everything (the front-end went away)."""
        self.memory.clear()
        self._refs.clear()
