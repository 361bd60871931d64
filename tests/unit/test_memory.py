"""Guest memory: regions, bounds-checked translation, table changes (vhost-user.rst
"Memory regions description", SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import BadMemoryRegion, GuestMemoryError
from pyvirtio.memory import GuestMemory, RegionSpec
from pyvirtio.spec.virtqueue import USED_ELEM
from pyvirtio.testing import (
    REGION_SIZE,
    USER_BASE,
    USER_STRIDE,
    Guest,
    GuestFactory,
    guest_memory,
    make_queue_pair,
)

MemfdFactory = Callable[[int], int]


# -- translation ------------------------------------------------------------------------------


def test_write_lands_at_the_gpa_offset_of_the_backing_memfd(guest: Guest) -> None:
    guest.memory.write(0x1234, b"pyvirtio")
    assert os.pread(guest.fds[0], 8, 0x1234) == b"pyvirtio"


def test_read_sees_what_the_front_end_wrote_into_the_memfd(guest: Guest) -> None:
    os.pwrite(guest.fds[0], b"from the guest", 0x3000)
    assert guest.memory.read(0x3000, 14) == b"from the guest"
    assert bytes(guest.memory.view(0x3000, 14)) == b"from the guest"


def test_view_is_writable_and_backed_by_the_memfd(guest: Guest) -> None:
    view = guest.memory.view(0x100, 4)
    view[:] = b"abcd"
    assert os.pread(guest.fds[0], 4, 0x100) == b"abcd"


def test_region_with_mmap_offset_translates_past_the_offset(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    # An unaligned mmap offset: the region starts 0x1800 bytes into its fd.
    fd = memfds(0x1800 + 0x4000)
    memory = make_guest(()).memory
    memory.set_table([(RegionSpec(0x10000, 0x4000, USER_BASE, 0x1800), fd)])
    memory.write(0x10000, b"first")
    memory.write(0x13FFB, b"last!")
    assert os.pread(fd, 5, 0x1800) == b"first"
    assert os.pread(fd, 5, 0x1800 + 0x3FFB) == b"last!"


def test_last_byte_of_region_is_addressable_and_next_is_not(memory: GuestMemory) -> None:
    memory.write(REGION_SIZE - 1, b"\x7f")
    assert memory.read(REGION_SIZE - 1, 1) == b"\x7f"
    with pytest.raises(GuestMemoryError):
        memory.read(REGION_SIZE - 1, 2)
    with pytest.raises(GuestMemoryError):
        memory.view(REGION_SIZE, 1)


def test_range_spanning_two_adjacent_regions_gives_one_view_per_region(two_regions: Guest) -> None:
    views: list[memoryview] = []
    two_regions.memory.slices(REGION_SIZE - 16, 32, views)
    assert [len(v) for v in views] == [16, 16]


def test_write_across_region_boundary_splits_between_the_two_memfds(two_regions: Guest) -> None:
    data = bytes(range(32))
    two_regions.memory.write(REGION_SIZE - 10, data)
    assert os.pread(two_regions.fds[0], 10, REGION_SIZE - 10) == data[:10]
    assert os.pread(two_regions.fds[1], 22, 0) == data[10:]
    assert two_regions.memory.read(REGION_SIZE - 10, 32) == data


def test_view_refuses_a_range_that_crosses_regions(two_regions: Guest) -> None:
    with pytest.raises(GuestMemoryError) as info:
        two_regions.memory.view(REGION_SIZE - 8, 16)
    assert info.value.address == REGION_SIZE - 8
    assert info.value.length == 16
    assert "one memory region" in str(info.value)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (2 * REGION_SIZE, 1),  # just past the second region
        (2 * REGION_SIZE - 4, 8),  # straddles the end of memory
        (1 << 40, 16),  # nowhere near
    ],
)
def test_out_of_range_access_raises_guest_memory_error(
    two_regions: Guest, gpa: int, length: int
) -> None:
    memory = two_regions.memory
    with pytest.raises(GuestMemoryError) as info:
        memory.read(gpa, length)
    assert (info.value.address, info.value.length) == (gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.write(gpa, bytes(length))
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)


def test_range_into_a_hole_between_regions_raises(make_guest: GuestFactory) -> None:
    memory = make_guest(((0, 0x1000), (0x3000, 0x1000))).memory
    with pytest.raises(GuestMemoryError):
        memory.read(0xFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        memory.read(0x1000, 1)


def test_failed_slices_appends_nothing(two_regions: Guest) -> None:
    views: list[memoryview] = [memoryview(b"sentinel")]
    with pytest.raises(GuestMemoryError):
        two_regions.memory.slices(REGION_SIZE - 8, REGION_SIZE + 16, views)
    assert len(views) == 1


def test_failed_write_changes_no_byte(two_regions: Guest) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.memory.write(2 * REGION_SIZE - 4, b"\xff" * 8)
    assert os.pread(two_regions.fds[1], 4, REGION_SIZE - 4) == bytes(4)


def test_user_to_guest_translates_front_end_addresses(two_regions: Guest) -> None:
    memory = two_regions.memory
    assert memory.user_to_guest(USER_BASE + 0x10, 8) == 0x10
    assert memory.user_to_guest(USER_BASE + USER_STRIDE + 0x20, 8) == REGION_SIZE + 0x20


@pytest.mark.parametrize(
    ("user_addr", "length"),
    [
        (USER_BASE - 1, 2),  # starts before region 0
        (USER_BASE + REGION_SIZE - 4, 8),  # runs off region 0
        (USER_BASE + REGION_SIZE, 1),  # the gap after region 0 in user space
        (0x1000, 8),  # a GPA is not a user address
    ],
)
def test_user_to_guest_refuses_unmapped_user_ranges(
    two_regions: Guest, user_addr: int, length: int
) -> None:
    with pytest.raises(GuestMemoryError) as info:
        two_regions.memory.user_to_guest(user_addr, length)
    assert info.value.address == user_addr


# -- validating regions -----------------------------------------------------------------------


def test_regions_overlapping_in_guest_physical_space_are_rejected(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    memory = make_guest(()).memory
    a, b = memfds(0x2000), memfds(0x2000)
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        memory.set_table(
            [(RegionSpec(0, 0x2000, USER_BASE, 0), a), (RegionSpec(0x1000, 0x2000, 1 << 47, 0), b)]
        )
    assert len(memory) == 0


def test_regions_overlapping_in_user_space_are_rejected(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    memory = make_guest(()).memory
    a, b = memfds(0x2000), memfds(0x2000)
    with pytest.raises(BadMemoryRegion, match="user address"):
        memory.set_table(
            [
                (RegionSpec(0, 0x2000, USER_BASE, 0), a),
                (RegionSpec(0x10000, 0x2000, USER_BASE + 0x1000, 0), b),
            ]
        )


def test_add_region_overlapping_a_mapped_one_is_rejected(
    guest: Guest, memfds: MemfdFactory
) -> None:
    before = guest.memory.generation
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        guest.memory.add_region(
            RegionSpec(REGION_SIZE - 0x1000, 0x2000, 1 << 47, 0), memfds(0x2000)
        )
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        guest.memory.add_region(
            RegionSpec(4 * REGION_SIZE, 0x1000, USER_BASE + REGION_SIZE - 1, 0), memfds(0x1000)
        )
    assert guest.memory.generation == before
    assert len(guest.memory) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RegionSpec(0x1000, 0, USER_BASE, 0), "size 0"),
        (RegionSpec((1 << 64) - 0x1000, 0x2000, USER_BASE, 0), "guest address"),
        (RegionSpec(0, 0x2000, (1 << 64) - 0x1000, 0), "user address"),
        (RegionSpec(0, 0x2000, USER_BASE, (1 << 64) - 0x1000), "mmap offset"),
    ],
)
def test_empty_or_64_bit_overflowing_region_is_rejected(
    make_guest: GuestFactory, memfds: MemfdFactory, spec: RegionSpec, message: str
) -> None:
    memory = make_guest(()).memory
    with pytest.raises(BadMemoryRegion, match=message):
        memory.add_region(spec, memfds(0x4000))
    assert len(memory) == 0


def test_region_larger_than_its_fd_is_rejected(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    # Mapping past the end of a memfd would SIGBUS on first access, not raise.
    memory = make_guest(()).memory
    fd = memfds(0x4000)
    with pytest.raises(BadMemoryRegion, match="needs 0x5000 bytes"):
        memory.add_region(RegionSpec(0, 0x4000, USER_BASE, 0x1000), fd)
    with pytest.raises(BadMemoryRegion):
        memory.add_region(RegionSpec(0, 0x4001, USER_BASE, 0), fd)


def test_region_with_a_closed_fd_is_rejected(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    fd = memfds(0x1000)
    os.close(fd)
    with pytest.raises(BadMemoryRegion, match="cannot stat"):
        make_guest(()).memory.add_region(RegionSpec(0, 0x1000, USER_BASE, 0), fd)


def test_bad_table_leaves_the_old_table_in_place(guest: Guest, memfds: MemfdFactory) -> None:
    memory = guest.memory
    memory.write(0x40, b"still here")
    generation = memory.generation
    good, small = memfds(0x1000), memfds(0x1000)
    with pytest.raises(BadMemoryRegion):
        memory.set_table(
            [
                (RegionSpec(0, 0x1000, USER_BASE, 0), good),
                (RegionSpec(0x1000, 0x2000, USER_BASE + USER_STRIDE, 0), small),  # fd too small
            ]
        )
    assert memory.generation == generation
    assert [(r.guest_addr, r.size, r.user_addr) for r in memory.regions] == [
        (0, REGION_SIZE, USER_BASE)
    ]
    assert memory.read(0x40, 10) == b"still here"


def test_table_with_more_regions_than_the_maximum_is_rejected(memfds: MemfdFactory) -> None:
    memory = GuestMemory(max_regions=2)
    fd = memfds(0x3000)
    table = [
        (RegionSpec(i * 0x1000, 0x1000, USER_BASE + i * 0x1000, i * 0x1000), fd) for i in range(3)
    ]
    with pytest.raises(BadMemoryRegion, match="more than 2"):
        memory.set_table(table)
    memory.set_table(table[:2])
    with pytest.raises(BadMemoryRegion):
        memory.add_region(*table[2])
    assert len(memory) == 2
    memory.clear()


# -- changing the region set ------------------------------------------------------------------


def test_add_region_maps_it_and_remove_region_unmaps_it(guest: Guest, memfds: MemfdFactory) -> None:
    memory = guest.memory
    fd = memfds(0x2000)
    spec = RegionSpec(0x100000, 0x2000, USER_BASE + USER_STRIDE, 0)
    memory.add_region(spec, fd)
    memory.write(0x100010, b"added")
    assert os.pread(fd, 5, 0x10) == b"added"
    assert memory.user_to_guest(USER_BASE + USER_STRIDE + 0x10, 5) == 0x100010
    # REM_MEM_REG identifies the region by GPA, size and user address; the offset is ignored.
    memory.remove_region(RegionSpec(0x100000, 0x2000, USER_BASE + USER_STRIDE, 0x9999))
    with pytest.raises(GuestMemoryError):
        memory.read(0x100010, 5)
    assert memory.read(0, 4) == bytes(4)  # the first region is untouched


def test_regions_are_kept_sorted_by_guest_address(
    make_guest: GuestFactory, memfds: MemfdFactory
) -> None:
    memory = make_guest(((0x10000, 0x1000),)).memory
    memory.add_region(RegionSpec(0x1000, 0x1000, 1 << 46, 0), memfds(0x1000))
    memory.add_region(RegionSpec(0x8000, 0x1000, 1 << 45, 0), memfds(0x1000))
    assert [r.guest_addr for r in memory.regions] == [0x1000, 0x8000, 0x10000]
    memory.write(0x8000, b"x")
    assert memory.read(0x8000, 1) == b"x"


@pytest.mark.parametrize(
    "spec",
    [
        RegionSpec(0x1000, REGION_SIZE, USER_BASE, 0),  # wrong GPA
        RegionSpec(0, REGION_SIZE // 2, USER_BASE, 0),  # wrong size
        RegionSpec(0, REGION_SIZE, USER_BASE + 0x1000, 0),  # wrong user address
    ],
)
def test_removing_a_region_that_is_not_mapped_is_an_error(guest: Guest, spec: RegionSpec) -> None:
    generation = guest.memory.generation
    with pytest.raises(BadMemoryRegion, match="to remove"):
        guest.memory.remove_region(spec)
    assert len(guest.memory) == 1
    assert guest.memory.generation == generation


def test_generation_changes_on_every_change_of_the_region_set(
    guest: Guest, memfds: MemfdFactory
) -> None:
    memory = guest.memory
    seen = [memory.generation]
    spec = RegionSpec(0x100000, 0x1000, USER_BASE + USER_STRIDE, 0)
    memory.add_region(spec, memfds(0x1000))
    seen.append(memory.generation)
    memory.remove_region(spec)
    seen.append(memory.generation)
    memory.set_table([(guest.specs[0], guest.fds[0])])
    seen.append(memory.generation)
    memory.clear()
    seen.append(memory.generation)
    assert len(set(seen)) == len(seen)
    assert len(memory) == 0


def test_old_views_stay_valid_after_their_region_is_replaced(
    guest: Guest, memfds: MemfdFactory
) -> None:
    """A view handed out before a table change keeps its old mapping alive: no use-after-unmap."""
    old_view = guest.memory.view(0, 4)
    guest.memory.set_table([(RegionSpec(0, 0x1000, USER_BASE, 0), memfds(0x1000))])
    old_view[:] = b"safe"
    assert os.pread(guest.fds[0], 4, 0) == b"safe"


def test_split_queue_follows_a_replaced_memory_table(guest: Guest, memfds: MemfdFactory) -> None:
    """SET_MEM_TABLE with a different memfd at the same GPA: a queue created before
    reads its rings from, and writes its used ring into, the new memory."""
    memory = guest.memory
    pair = make_queue_pair(memory, 8)
    head = pair.driver.add(readable=[(pair.put(b"request"), 7)], writable=[(pair.alloc(16), 16)])

    new_fd = memfds(REGION_SIZE)
    os.pwrite(new_fd, os.pread(guest.fds[0], REGION_SIZE, 0), 0)  # the front-end migrated RAM
    memory.set_table([(guest.specs[0], new_fd)])

    chain = pair.device.pop()
    assert chain is not None
    assert chain.head == head
    assert bytes(chain.readable[0]) == b"request"
    chain.writable[0][:5] = b"reply"
    pair.device.push(chain.head, 5)

    used = pair.addrs.used
    assert int.from_bytes(os.pread(new_fd, 2, used + 2), "little") == 1
    assert USED_ELEM.unpack(os.pread(new_fd, 8, used + 4)) == (head, 5)
    # The old memory saw none of it.
    assert int.from_bytes(os.pread(guest.fds[0], 2, used + 2), "little") == 0
    assert os.pread(guest.fds[0], 8, used + 4) == bytes(8)
    assert b"reply" in os.pread(new_fd, REGION_SIZE, 0)
    assert b"reply" not in os.pread(guest.fds[0], REGION_SIZE, 0)


def test_clear_unmaps_everything(guest: Guest) -> None:
    guest.memory.clear()
    assert len(guest.memory) == 0
    with pytest.raises(GuestMemoryError):
        guest.memory.read(0, 1)
    with pytest.raises(GuestMemoryError):
        guest.memory.user_to_guest(USER_BASE, 1)


# -- property: translation agrees with a flat model ---------------------------------------------

PAGE = 0x1000


@settings(max_examples=40, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=4),
    accesses=st.lists(
        st.tuples(st.integers(0, 24 * PAGE), st.integers(0, 3 * PAGE), st.binary(min_size=1)),
        max_size=12,
    ),
)
def test_reads_and_writes_match_a_flat_model_of_the_regions(
    layout: list[tuple[int, int]], accesses: list[tuple[int, int, bytes]]
) -> None:
    """Regions separated by random gaps (or none): an access succeeds iff every byte is
    backed, and then it reads back exactly what a flat model of guest RAM holds."""
    regions: list[tuple[int, int]] = []
    gpa = 0
    for gap, pages in layout:
        gpa += gap * PAGE
        regions.append((gpa, pages * PAGE))
        gpa += pages * PAGE
    backed: set[int] = set()
    for start, size in regions:
        backed.update(range(start, start + size))
    model = dict.fromkeys(backed, 0)
    with guest_memory(regions) as guest:
        memory = guest.memory
        for addr, length, seed in accesses:
            data = (seed * (length // len(seed) + 1))[:length]
            inside = all(a in backed for a in range(addr, addr + length))
            if not inside:
                with pytest.raises(GuestMemoryError):
                    memory.write(addr, data)
                with pytest.raises(GuestMemoryError):
                    memory.read(addr, length)
                continue
            memory.write(addr, data)
            for i, byte in enumerate(data):
                model[addr + i] = byte
            assert memory.read(addr, length) == bytes(model[a] for a in range(addr, addr + length))
            views: list[memoryview] = []
            memory.slices(addr, length, views)
            touched = {r for r, (s, n) in enumerate(regions) if s < addr + length and addr < s + n}
            assert len(views) == (len(touched) if length else int(addr in backed))
        # Every byte, read through the memfds directly, matches the model.
        for (start, size), fd in zip(regions, guest.fds, strict=True):
            assert os.pread(fd, size, 0) == bytes(model[a] for a in range(start, start + size))
