"""Guest memory: regions shared by the front-end, and address translation.

A vhost-user front-end shares the guest's RAM as a set of regions, each an fd
to ``mmap`` plus three addresses (vhost-user.rst, "Memory regions description"):
the guest physical address (GPA) the region starts at, its size, the
front-end's own virtual ("user") address for it, and the offset of the region
in the fd.  Descriptor addresses in the rings are GPAs; ring addresses in
``SET_VRING_ADDR`` are user addresses.

Every translation is bounds checked: an address range that is not entirely
backed by guest memory raises :class:`~pyvirtio.errors.GuestMemoryError`, so a
hostile guest can never make pyvirtio read or write outside the shared memory.

Regions can be replaced at run time (``SET_MEM_TABLE``, ``ADD_MEM_REG``,
``REM_MEM_REG``).  :attr:`GuestMemory.generation` changes whenever they do;
holders of views (the virtqueues) re-translate their addresses on every change,
so no view into an unmapped region is used afterwards.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyvirtio.errors import BadMemoryRegion, GuestMemoryError

__all__ = ["GuestMemory", "MemoryRegion", "RegionSpec", "create_memfd"]

_U64_END = 1 << 64


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """Where a region lives: the fields of a vhost-user memory region description."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def validate(self) -> None:
        """Check the addresses describe a non-empty range that does not wrap.

        Raises:
            BadMemoryRegion: the region is empty or one of its ranges overflows 64 bits.
        """
        if self.size <= 0:
            raise BadMemoryRegion(f"region at GPA {self.guest_addr:#x} has size {self.size}")
        for name, start in (
            ("guest address", self.guest_addr),
            ("user address", self.user_addr),
            ("mmap offset", self.mmap_offset),
        ):
            if start < 0 or start + self.size > _U64_END:
                raise BadMemoryRegion(
                    f"region {name} {start:#x} + size {self.size:#x} overflows 64 bits"
                )


class MemoryRegion:
    """One mapped region of guest memory.

    The region owns its ``mmap``; :attr:`view` is a writable memoryview of
    exactly the region's bytes.
    """

    __slots__ = (
        "_lead", "_map", "guest_addr", "guest_end", "size", "user_addr", "user_end", "view",
    )

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        """Map ``spec.size`` bytes of ``fd`` starting at ``spec.mmap_offset``.

        The fd is not closed here; the mapping stays valid after the caller closes it.

        Raises:
            BadMemoryRegion: the region is invalid, the fd is too small (mapping it
                would fault on access) or cannot be mapped.
        """
        spec.validate()
        try:
            file_size = os.fstat(fd).st_size
        except OSError as exc:
            raise BadMemoryRegion(f"cannot stat region fd {fd}: {exc}") from exc
        if spec.mmap_offset + spec.size > file_size:
            raise BadMemoryRegion(
                f"region at GPA {spec.guest_addr:#x} needs {spec.mmap_offset + spec.size:#x} "
                f"bytes of its fd, which has only {file_size:#x}"
            )
        aligned = spec.mmap_offset - spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
        lead = spec.mmap_offset - aligned
        try:
            self._map = mmap.mmap(
                fd,
                lead + spec.size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise BadMemoryRegion(f"cannot map region at GPA {spec.guest_addr:#x}: {exc}") from exc
        self.view = memoryview(self._map)[lead : lead + spec.size]
        self._lead = lead
        self.guest_addr = spec.guest_addr
        self.size = spec.size
        self.guest_end = spec.guest_addr + spec.size
        self.user_addr = spec.user_addr
        self.user_end = spec.user_addr + spec.size

    @property
    def spec(self) -> RegionSpec:
        """The addresses this region was mapped with (mmap offset reported as 0)."""
        return RegionSpec(self.guest_addr, self.size, self.user_addr, 0)

    def discard(self, offset: int, length: int) -> int:
        """Give ``length`` bytes at ``offset`` in the region back to the host.

        ``madvise(MADV_REMOVE)`` on the shared mapping frees the backing store
        (a memfd, shmem or tmpfs file: a hole is punched), so the memory is
        released for every process that maps it; the range reads as zeros
        afterwards.  Only whole host pages inside the range are discarded.

        Returns:
            The bytes discarded (0 when no whole page lies in the range).

        Raises:
            OSError: the kernel refused (a backing store without hole punching).
        """
        page = mmap.PAGESIZE
        start = self._lead + max(offset, 0)
        end = self._lead + min(offset + length, self.size)
        first = -(-start // page) * page
        last = end - end % page
        if last <= first:
            return 0
        self._map.madvise(mmap.MADV_REMOVE, first, last - first)
        return last - first

    def release(self) -> None:
        """Drop this region's own view; the mapping goes once no other view holds it.

        Views handed out earlier keep the mapping alive (Python cannot unmap memory
        that is still exported), which is safe: they cannot point outside it.
        """
        self.view.release()
        # While other views still exist, close() refuses; the mmap goes with them.
        with contextlib.suppress(BufferError):
            self._map.close()


class GuestMemory:
    """The guest's memory as a sorted, non-overlapping set of mapped regions."""

    def __init__(self, max_regions: int = 32) -> None:
        self.max_regions = max_regions
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        #: The region :meth:`slices` translated into last (buffers come in runs: a hot
        #: loop may try it first, as :meth:`slices` does).
        self.last_region: MemoryRegion | None = None
        #: Increases on every change of the region set.
        self.generation = 0

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        """The mapped regions, ordered by guest address."""
        return tuple(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    # -- changing the region set -------------------------------------------------

    def set_table(self, table: Iterable[tuple[RegionSpec, int]]) -> None:
        """Replace every region (``SET_MEM_TABLE``).

        All new regions are validated and mapped before the old ones go, so a
        bad table leaves the previous memory in place.

        Raises:
            BadMemoryRegion: a region is invalid, overlaps another or cannot be mapped.
        """
        new: list[MemoryRegion] = []
        try:
            for spec, fd in table:
                self._check_fits(spec, new)
                new.append(MemoryRegion(spec, fd))
        except BadMemoryRegion:
            for region in new:
                region.release()
            raise
        old = self._regions
        self._install(new)
        for region in old:
            region.release()

    def add_region(self, spec: RegionSpec, fd: int) -> None:
        """Map one more region (``ADD_MEM_REG``).

        Raises:
            BadMemoryRegion: the region is invalid, overlaps a mapped one, would
                exceed :attr:`max_regions`, or cannot be mapped.
        """
        self._check_fits(spec, self._regions)
        if len(self._regions) >= self.max_regions:
            raise BadMemoryRegion(f"already {len(self._regions)} regions, the maximum")
        region = MemoryRegion(spec, fd)
        self._install([*self._regions, region])

    def remove_region(self, spec: RegionSpec) -> None:
        """Unmap the region with these guest address, size and user address (``REM_MEM_REG``).

        Raises:
            BadMemoryRegion: no mapped region matches.
        """
        for region in self._regions:
            if (region.guest_addr, region.size, region.user_addr) == (
                spec.guest_addr,
                spec.size,
                spec.user_addr,
            ):
                self._install([r for r in self._regions if r is not region])
                region.release()
                return
        raise BadMemoryRegion(
            f"no region at GPA {spec.guest_addr:#x} size {spec.size:#x} "
            f"user address {spec.user_addr:#x} to remove"
        )

    def clear(self) -> None:
        """Unmap everything (the front-end went away)."""
        old = self._regions
        self._install([])
        for region in old:
            region.release()

    def _check_fits(self, spec: RegionSpec, existing: Sequence[MemoryRegion]) -> None:
        spec.validate()
        if len(existing) >= self.max_regions:
            raise BadMemoryRegion(f"more than {self.max_regions} memory regions")
        end = spec.guest_addr + spec.size
        user_end = spec.user_addr + spec.size
        for region in existing:
            if spec.guest_addr < region.guest_end and region.guest_addr < end:
                raise BadMemoryRegion(
                    f"region GPA {spec.guest_addr:#x}-{end:#x} overlaps region "
                    f"{region.guest_addr:#x}-{region.guest_end:#x}"
                )
            if spec.user_addr < region.user_end and region.user_addr < user_end:
                raise BadMemoryRegion(
                    f"region user address {spec.user_addr:#x}-{user_end:#x} overlaps region "
                    f"{region.user_addr:#x}-{region.user_end:#x}"
                )

    def _install(self, regions: list[MemoryRegion]) -> None:
        regions.sort(key=lambda r: r.guest_addr)
        self._regions = regions
        self._starts = [r.guest_addr for r in regions]
        self.last_region = None
        self.generation += 1

    # -- translation --------------------------------------------------------------

    def _region_at(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return None
        region = self._regions[i]
        return region if gpa < region.guest_end else None

    def view(self, gpa: int, length: int) -> memoryview:
        """A memoryview of ``length`` bytes at ``gpa``, which must lie in one region.

        Rings and headers use this: they must be contiguous in one mapping.

        Raises:
            GuestMemoryError: the range is not entirely inside one region.
        """
        region = self._region_at(gpa)
        if region is None or length < 0 or gpa + length > region.guest_end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is not inside one memory region",
                address=gpa,
                length=length,
            )
        start = gpa - region.guest_addr
        return region.view[start : start + length]

    def slices(self, gpa: int, length: int, out: list[memoryview]) -> None:
        """Append views covering ``length`` bytes at ``gpa`` to ``out``.

        A range that crosses from one region into an adjacent one gives one view
        per region.  Nothing is appended when the range is not fully backed.

        Raises:
            GuestMemoryError: some byte of the range is outside guest memory.
        """
        region = self.last_region
        if region is None or not region.guest_addr <= gpa < region.guest_end:
            region = self._region_at(gpa)
        if region is not None and gpa + length <= region.guest_end:
            self.last_region = region
            start = gpa - region.guest_addr
            out.append(region.view[start : start + length])
            return
        out.extend(region.view[start : start + take]
                   for region, start, take in self._pieces(gpa, length))

    def views_in_region(self, addrs: Sequence[int], ends: Sequence[int]
                        ) -> list[memoryview] | None:
        """Views of many buffers at once (an indirect table's), given their first and
        past-the-end addresses, when every one lies in the region of the first; None
        when one does not (the caller then translates them one by one, with its
        precise errors).  The checks loop in C, the translation is one comprehension.
        """
        if not addrs:
            return []
        region = self.last_region
        first = addrs[0]
        if region is None or not region.guest_addr <= first < region.guest_end:
            region = self._region_at(first)
            if region is None:
                return None
        lo = region.guest_addr
        if min(addrs) < lo or max(ends) > region.guest_end:
            return None
        self.last_region = region
        view = region.view
        if not lo:  # the region at guest address 0 (most buffers)
            return [view[a:e] for a, e in zip(addrs, ends, strict=True)]
        return [view[a - lo : e - lo] for a, e in zip(addrs, ends, strict=True)]

    def _pieces(self, gpa: int, length: int) -> list[tuple[MemoryRegion, int, int]]:
        """The range cut at region boundaries: (region, offset in it, bytes).

        Raises:
            GuestMemoryError: some byte of the range is outside guest memory.
        """
        parts: list[tuple[MemoryRegion, int, int]] = []
        addr, remaining = gpa, length
        while remaining > 0:
            region = self._region_at(addr)
            if region is None:
                raise GuestMemoryError(
                    f"guest range {gpa:#x}+{length:#x}: byte {addr:#x} is not in guest memory",
                    address=gpa,
                    length=length,
                )
            take = min(remaining, region.guest_end - addr)
            parts.append((region, addr - region.guest_addr, take))
            addr += take
            remaining -= take
        return parts

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest memory (may span regions)."""
        views: list[memoryview] = []
        self.slices(gpa, length, views)
        return b"".join(views)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa`` (may span regions)."""
        views: list[memoryview] = []
        self.slices(gpa, len(data), views)
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def discard(self, gpa: int, length: int) -> int:
        """Give the guest pages of ``length`` bytes at ``gpa`` back to the host
        (:meth:`MemoryRegion.discard`: ``MADV_REMOVE``, the pages read as zeros
        afterwards), for a balloon's inflated or reported pages.

        Returns:
            The bytes discarded: whole host pages only.

        Raises:
            GuestMemoryError: some byte of the range is outside guest memory
                (nothing is discarded then).
            OSError: the kernel refused to discard.
        """
        parts = self._pieces(gpa, length)  # all checked before anything is discarded
        return sum(region.discard(offset, take) for region, offset, take in parts)

    def user_to_guest(self, user_addr: int, length: int) -> int:
        """Translate a front-end virtual address range to a GPA (for ring addresses).

        Raises:
            GuestMemoryError: the range is not inside one region's user mapping.
        """
        for region in self._regions:
            if region.user_addr <= user_addr and user_addr + length <= region.user_end:
                return region.guest_addr + (user_addr - region.user_addr)
        raise GuestMemoryError(
            f"user address range {user_addr:#x}+{length:#x} is not inside one memory region",
            address=user_addr,
            length=length,
        )


def create_memfd(size: int, name: str = "pyvirtio-guest") -> int:
    """Create a memfd of ``size`` bytes, as a front-end does for guest RAM."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd
