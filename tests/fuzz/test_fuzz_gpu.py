"""Fuzz target: virtio-gpu's controlq and cursorq (VIRTIO 1.4 §5.7.6) under a hostile driver.

A case is a list of commands, each a 2D command (or an arbitrary type) whose fields are
drawn near the edges that matter (0, 1, 15, 16, 64, the resource size, 2**31, 2**32-1,
2**64-1), resource ids from a small set so that commands meet each other's resources,
backing entries inside a 64 KiB backing area, outside guest memory, overlapping or
wrapping, a fence flag, and the request cut into descriptors at arbitrary points, with
room for the response or not.  They go through the real back-end and engine
(:class:`~pyvirtio.testing.DeviceHarness`, split or packed rings) into
:class:`~pyvirtio.devices.gpu.GpuDevice` with a 1 MiB resource budget.

Invariants:

- nothing escapes and nothing is logged with a traceback;
- every controlq request with room gets exactly one response header, OK_* or ERR_*,
  which carries FLAG_FENCE and the fence id when the request had them;
- the device writes nothing into guest memory but responses: the backing area is
  unchanged (transfers only read it);
- the resources' memory stays within the budget and matches their sizes;
- the device keeps serving: afterwards a good driver shows a 16x16 picture on scanout 0
  and the screenshot has its pixels.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from pyvirtio.devices.gpu import GpuConfig, GpuDevice
from pyvirtio.devices.gpu.png import decode_png
from pyvirtio.spec.gpu import (
    CONTROLQ,
    CTRL_HDR,
    CURSORQ,
    FLAG_FENCE,
    GET_EDID,
    MEM_ENTRY,
    RESOURCE_ATTACH_BACKING,
    RESOURCE_CREATE_2D,
    RESOURCE_FLUSH,
    RESOURCE_ID,
    SET_SCANOUT,
    TRANSFER_TO_HOST_2D,
    UPDATE_CURSOR,
    CtrlType,
    GpuFormat,
)
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

BACKING = 64 << 10
U32 = 0xFFFFFFFF
EDGES32 = (0, 1, 2, 15, 16, 17, 63, 64, 65, 256, 1 << 31, U32 - 1, U32)
EDGES64 = (0, 1, 1024, 4095, 4096, BACKING - 1, BACKING, 1 << 32, (1 << 64) - 1)


@dataclass(frozen=True)
class GpuCommand:
    """One request: type, queue, the command's fields (as many as it takes), entries."""

    ctype: int
    cursor: bool
    fields: tuple[int, ...]
    entries: tuple[tuple[int, int], ...]
    fence: bool
    cuts: tuple[int, ...]
    room: bool


@dataclass(frozen=True)
class GpuCase:
    packed: bool
    commands: tuple[GpuCommand, ...]


def _u32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGES32), st.integers(0, U32))


def _small() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from((0, 1, 4, 8, 16, 32, 64, 100)), _u32())


def _entry() -> st.SearchStrategy[tuple[int, int]]:
    """(offset in the backing area, or an absolute address when >= 2**63, length)."""
    return st.tuples(
        st.one_of(st.integers(0, BACKING // 4096 - 1).map(lambda p: p * 4096),
                  st.sampled_from((BACKING - 16, 1 << 63, (1 << 64) - 16)),
                  st.integers(0, BACKING)),
        st.sampled_from((0, 1, 16, 4096, 8192, BACKING, U32)),
    )


_SHAPES: dict[int, tuple[str, ...]] = {
    CtrlType.CMD_GET_DISPLAY_INFO: (),
    CtrlType.CMD_GET_EDID: ("small",),
    CtrlType.CMD_RESOURCE_CREATE_2D: ("id", "format", "small", "small"),
    CtrlType.CMD_RESOURCE_UNREF: ("id",),
    CtrlType.CMD_SET_SCANOUT: ("small", "small", "small", "small", "small", "id"),
    CtrlType.CMD_RESOURCE_FLUSH: ("small", "small", "small", "small", "id"),
    CtrlType.CMD_TRANSFER_TO_HOST_2D: ("small", "small", "small", "small", "offset", "id"),
    CtrlType.CMD_RESOURCE_ATTACH_BACKING: ("id", "count"),
    CtrlType.CMD_RESOURCE_DETACH_BACKING: ("id",),
    CtrlType.CMD_UPDATE_CURSOR: ("small", "small", "small", "id", "small", "small"),
    CtrlType.CMD_MOVE_CURSOR: ("small", "small", "small", "id", "small", "small"),
}
_FIELD = {
    "small": _small(),
    "id": st.one_of(st.integers(0, 4), st.just(U32)),
    "format": st.one_of(st.sampled_from(list(GpuFormat)), _u32()),
    "offset": st.one_of(st.sampled_from(EDGES64), st.integers(0, (1 << 64) - 1)),
    "count": st.one_of(st.integers(0, 5), st.sampled_from((16384, 16385, U32))),
}


def _command() -> st.SearchStrategy[GpuCommand]:
    known = st.sampled_from(sorted(_SHAPES)).flatmap(lambda ctype: st.builds(
        GpuCommand, st.just(ctype),
        st.booleans() if ctype in (CtrlType.CMD_UPDATE_CURSOR, CtrlType.CMD_MOVE_CURSOR)
        else st.just(False),
        st.tuples(*(_FIELD[kind] for kind in _SHAPES[ctype])),
        st.lists(_entry(), max_size=5).map(tuple), st.booleans(),
        st.lists(st.integers(1, 60), max_size=3, unique=True).map(lambda c: tuple(sorted(c))),
        st.sampled_from((True, True, True, False))))
    odd = st.builds(GpuCommand, st.integers(0, 0x1300), st.booleans(),
                    st.lists(_u32(), max_size=6).map(tuple), st.just(()), st.booleans(),
                    st.just(()), st.just(True))
    return st.one_of(known, known, known, odd)


def gpu_cases() -> st.SearchStrategy[GpuCase]:
    return st.builds(GpuCase, st.booleans(), st.lists(_command(), max_size=14).map(tuple))


def _body(command: GpuCommand, backing: int) -> bytes:
    f = command.fields
    ctype = command.ctype
    if ctype not in _SHAPES or len(f) != len(_SHAPES[ctype]):  # arbitrary: raw le32 words
        return b"".join(v.to_bytes(4, "little") for v in f)
    structs: dict[int, Callable[[], bytes]] = {
        CtrlType.CMD_GET_EDID: lambda: GET_EDID.pack(*f),
        CtrlType.CMD_RESOURCE_CREATE_2D: lambda: RESOURCE_CREATE_2D.pack(*f),
        CtrlType.CMD_RESOURCE_UNREF: lambda: RESOURCE_ID.pack(*f),
        CtrlType.CMD_RESOURCE_DETACH_BACKING: lambda: RESOURCE_ID.pack(*f),
        CtrlType.CMD_SET_SCANOUT: lambda: SET_SCANOUT.pack(*f),
        CtrlType.CMD_RESOURCE_FLUSH: lambda: RESOURCE_FLUSH.pack(*f),
        CtrlType.CMD_TRANSFER_TO_HOST_2D: lambda: TRANSFER_TO_HOST_2D.pack(*f),
        CtrlType.CMD_UPDATE_CURSOR: lambda: UPDATE_CURSOR.pack(*f),
        CtrlType.CMD_MOVE_CURSOR: lambda: UPDATE_CURSOR.pack(*f),
    }
    if ctype == CtrlType.CMD_RESOURCE_ATTACH_BACKING:
        entries = b"".join(
            MEM_ENTRY.pack(addr if addr >= 1 << 63 else backing + addr, length & U32)
            for addr, length in command.entries)
        return RESOURCE_ATTACH_BACKING.pack(*f) + entries
    return structs[ctype]() if ctype in structs else b""


def _pieces(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@fuzz_target("gpu", gpu_cases(), types=[GpuCase, GpuCommand], quick_examples=150)
def test_gpu_queues_survive_a_hostile_driver(case: GpuCase) -> None:
    device = GpuDevice(GpuConfig(max_memory=1 << 20))
    with DeviceHarness(device, packed=case.packed, queue_size=64,
                       buffer_space=1 << 20) as harness:
        top = harness.guest.region_end(harness.frontend.data_gpa)
        backing = top - BACKING
        content = os.urandom(BACKING)
        harness.guest.memory.write(backing, content)
        for command in case.commands:
            fence = FLAG_FENCE if command.fence else 0
            data = CTRL_HDR.pack(command.ctype, fence, 77 if fence else 0, 0, 0)
            data += _body(command, backing)
            queue = CURSORQ if command.cursor else CONTROLQ
            used = harness.request(queue, _pieces(data, command.cuts),
                                   2048 if command.room else 0)
            if queue == CONTROLQ and command.room:
                assert used.length >= CTRL_HDR.size
                rtype, rflags, fence_id, _, _ = CTRL_HDR.unpack_from(used.data)
                assert 0x1100 <= rtype <= 0x1104 or 0x1200 <= rtype <= 0x1205, hex(rtype)
                assert (rflags, fence_id) == ((FLAG_FENCE, 77) if fence else (0, 0))
            elif not command.room:
                assert used.length == 0
        assert harness.guest.memory.read(backing, BACKING) == content
        resources = list(device.resources)
        assert device.resources.used == sum(len(r.pixels) for r in resources) <= 1 << 20
        for resource in resources:
            assert len(resource.pixels) == resource.width * resource.height * 4
        # Still serving: a good driver shows a picture.
        for resource in resources:
            harness.request(CONTROLQ, CTRL_HDR.pack(CtrlType.CMD_RESOURCE_UNREF, 0, 0, 0, 0)
                            + RESOURCE_ID.pack(resource.resource_id), 64)
        ok = CTRL_HDR.pack(CtrlType.RESP_OK_NODATA, 0, 0, 0, 0)
        steps = [
            (CtrlType.CMD_RESOURCE_CREATE_2D,
             RESOURCE_CREATE_2D.pack(9, GpuFormat.B8G8R8X8_UNORM, 16, 16)),
            (CtrlType.CMD_RESOURCE_ATTACH_BACKING,
             RESOURCE_ATTACH_BACKING.pack(9, 1) + MEM_ENTRY.pack(backing, 1024)),
            (CtrlType.CMD_TRANSFER_TO_HOST_2D, TRANSFER_TO_HOST_2D.pack(0, 0, 16, 16, 0, 9)),
            (CtrlType.CMD_SET_SCANOUT, SET_SCANOUT.pack(0, 0, 16, 16, 0, 9)),
        ]
        for ctype, body in steps:
            used = harness.request(CONTROLQ, CTRL_HDR.pack(ctype, 0, 0, 0, 0) + body, 64)
            assert used.data[:CTRL_HDR.size] == ok, (ctype, used)
        rgb = decode_png(device.screenshot(0))[2]
        expected = bytearray(16 * 16 * 3)
        expected[0::3], expected[1::3], expected[2::3] = (
            content[2:1024:4], content[1:1024:4], content[0:1024:4])
        assert rgb == bytes(expected)
