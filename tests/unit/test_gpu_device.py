"""virtio-gpu 2D (VIRTIO 1.4 §5.7) against a driver in the same process: the commands a
good driver sends, and hostile ones (huge sizes, overlapping or out-of-memory backing,
out-of-range rectangles and offsets, unknown ids) answered with the right
VIRTIO_GPU_RESP_ERR_* while nothing is read outside the backing or written outside the
resource.

:class:`Driver` and :func:`harness` are shared with the other gpu tests and the fuzz
target."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.devices.gpu import GpuConfig, GpuDevice
from pyvirtio.devices.gpu.png import decode_png
from pyvirtio.devices.gpu.resources import MAX_BACKING_ENTRIES, MAX_DIMENSION
from pyvirtio.spec.gpu import (
    CONFIG,
    CONTROLQ,
    CTRL_HDR,
    CURSORQ,
    DISPLAY_ONE,
    FLAG_FENCE,
    GET_EDID,
    MEM_ENTRY,
    RESOURCE_ATTACH_BACKING,
    RESOURCE_CREATE_2D,
    RESOURCE_FLUSH,
    RESOURCE_ID,
    RESP_EDID,
    SET_SCANOUT,
    TRANSFER_TO_HOST_2D,
    UPDATE_CURSOR,
    CtrlType,
    GpuFormat,
)
from pyvirtio.testing import DeviceHarness

#: Room for the largest response (RESP_EDID: 1056 bytes).
ROOM = 2048


@dataclass(frozen=True)
class Answer:
    """A response header (and what follows it)."""

    type: int
    flags: int
    fence_id: int
    data: bytes
    length: int


def request(ctype: int, body: bytes = b"", *, flags: int = 0, fence_id: int = 0) -> bytes:
    """A controlq or cursorq request: the header, then ``body``."""
    return CTRL_HDR.pack(ctype, flags, fence_id, 0, 0) + body


class Driver:
    """Sends commands to a :class:`GpuDevice` in a harness; owns guest pages for backing."""

    def __init__(self, harness: DeviceHarness) -> None:
        self.h = harness
        self.memory = harness.guest.memory
        #: Backing pages come from the end of guest RAM, away from the request buffers.
        self._top = harness.guest.region_end(harness.frontend.data_gpa)

    @property
    def device(self) -> GpuDevice:
        device = self.h.device
        assert isinstance(device, GpuDevice)
        return device

    def send(self, ctype: int, body: bytes = b"", *, queue: int = CONTROLQ, flags: int = 0,
             fence_id: int = 0, writable: int = ROOM) -> Answer:
        used = self.h.request(queue, request(ctype, body, flags=flags, fence_id=fence_id),
                              writable)
        if used.length < CTRL_HDR.size:
            return Answer(0, 0, 0, used.data, used.length)
        rtype, rflags, fence, _, _ = CTRL_HDR.unpack_from(used.data)
        return Answer(rtype, rflags, fence, used.data[CTRL_HDR.size:], used.length)

    def status(self, ctype: int, body: bytes = b"", **kwargs: int) -> int:
        return self.send(ctype, body, **kwargs).type

    def pages(self, size: int) -> int:
        """Reserve ``size`` bytes of guest memory (page aligned) for backing; their GPA."""
        self._top = (self._top - size) & ~0xFFF
        assert self._top >= self.h.frontend.data_gpa + 0x10000, "guest RAM too small"
        return self._top

    # -- commands ----------------------------------------------------------------------------

    def create(self, resource_id: int, width: int, height: int,
               fmt: int = GpuFormat.B8G8R8X8_UNORM) -> int:
        return self.status(CtrlType.CMD_RESOURCE_CREATE_2D,
                           RESOURCE_CREATE_2D.pack(resource_id, fmt, width, height))

    def attach(self, resource_id: int, entries: list[tuple[int, int]],
               count: int | None = None) -> int:
        body = RESOURCE_ATTACH_BACKING.pack(resource_id, len(entries) if count is None
                                            else count)
        body += b"".join(MEM_ENTRY.pack(addr, length) for addr, length in entries)
        return self.status(CtrlType.CMD_RESOURCE_ATTACH_BACKING, body)

    def detach(self, resource_id: int) -> int:
        return self.status(CtrlType.CMD_RESOURCE_DETACH_BACKING, RESOURCE_ID.pack(resource_id))

    def unref(self, resource_id: int) -> int:
        return self.status(CtrlType.CMD_RESOURCE_UNREF, RESOURCE_ID.pack(resource_id))

    def transfer(self, resource_id: int, *box: int, offset: int = 0) -> int:
        """TRANSFER_TO_HOST_2D of ``box`` (x, y, width, height)."""
        return self.status(CtrlType.CMD_TRANSFER_TO_HOST_2D,
                           TRANSFER_TO_HOST_2D.pack(*box, offset, resource_id))

    def scanout(self, scanout: int, resource_id: int, *box: int) -> int:
        """SET_SCANOUT of ``box`` (x, y, width, height) of the resource."""
        return self.status(CtrlType.CMD_SET_SCANOUT, SET_SCANOUT.pack(*box, scanout, resource_id))

    def flush(self, resource_id: int, x: int, y: int, width: int, height: int) -> int:
        return self.status(CtrlType.CMD_RESOURCE_FLUSH,
                           RESOURCE_FLUSH.pack(x, y, width, height, resource_id))

    def framebuffer(self, resource_id: int, width: int, height: int,
                    pixels: bytes | None = None, pieces: int = 4) -> tuple[int, bytes]:
        """Create a resource, back it with ``pieces`` scattered entries holding ``pixels``
        (default: a pattern), transfer, show it on scanout 0, flush.  Returns the
        backing's GPA and the pixels."""
        size = width * height * 4
        if pixels is None:
            pixels = bytes((i * 7 + i // 4099) & 0xFF for i in range(size))
        gpa = self.pages(size + pieces * 4096)
        # Entries in reverse order with a page hole between each: a scattered backing.
        chunk = -(-size // pieces)
        entries = []
        for n in range(pieces):
            piece = pixels[n * chunk:(n + 1) * chunk]
            if not piece:
                break
            addr = gpa + (pieces - 1 - n) * (chunk + 4096)
            self.memory.write(addr, piece)
            entries.append((addr, len(piece)))
        assert self.create(resource_id, width, height) == CtrlType.RESP_OK_NODATA
        assert self.attach(resource_id, entries) == CtrlType.RESP_OK_NODATA
        assert self.transfer(resource_id, 0, 0, width, height) == CtrlType.RESP_OK_NODATA
        assert self.scanout(0, resource_id, 0, 0, width, height) == CtrlType.RESP_OK_NODATA
        assert self.flush(resource_id, 0, 0, width, height) == CtrlType.RESP_OK_NODATA
        return gpa, pixels


def harness(config: GpuConfig | None = None, **kwargs: object) -> DeviceHarness:
    """A harness with 8 MiB of guest buffer space around a :class:`GpuDevice`."""
    return DeviceHarness(GpuDevice(config), buffer_space=8 << 20, **kwargs)  # type: ignore[arg-type]


def rgb_of_bgrx(pixels: bytes) -> bytes:
    """Packed RGB of blue-green-red-x pixels (what a screenshot holds)."""
    return b"".join(struct.pack("BBB", pixels[i + 2], pixels[i + 1], pixels[i])
                    for i in range(0, len(pixels), 4))


OK = CtrlType.RESP_OK_NODATA
UNSPEC = CtrlType.RESP_ERR_UNSPEC
OOM = CtrlType.RESP_ERR_OUT_OF_MEMORY
BAD_SCANOUT = CtrlType.RESP_ERR_INVALID_SCANOUT_ID
BAD_RESOURCE = CtrlType.RESP_ERR_INVALID_RESOURCE_ID
BAD_PARAMETER = CtrlType.RESP_ERR_INVALID_PARAMETER
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@pytest.fixture
def gpu() -> Iterator[Driver]:
    with harness() as h:
        yield Driver(h)


# -- a good driver ----------------------------------------------------------------------------


def test_display_info_reports_every_output_at_the_configured_size() -> None:
    with harness(GpuConfig(width=1024, height=640, outputs=2)) as h:
        answer = Driver(h).send(CtrlType.CMD_GET_DISPLAY_INFO)
        assert answer.type == CtrlType.RESP_OK_DISPLAY_INFO
        assert answer.length == 24 + 16 * 24
        modes = [DISPLAY_ONE.unpack_from(answer.data, n * 24) for n in range(16)]
        assert modes[:2] == [(0, 0, 1024, 640, 1, 0)] * 2
        assert modes[2:] == [(0, 0, 0, 0, 0, 0)] * 14
        assert CONFIG.unpack(h.read_config(0, 16)) == (0, 0, 2, 0)


def test_default_size_is_1280x800(gpu: Driver) -> None:
    answer = gpu.send(CtrlType.CMD_GET_DISPLAY_INFO)
    assert DISPLAY_ONE.unpack_from(answer.data)[2:5] == (1280, 800, 1)


def test_edid_is_a_valid_block_whose_preferred_mode_is_the_output_size(gpu: Driver) -> None:
    answer = gpu.send(CtrlType.CMD_GET_EDID, GET_EDID.pack(0))
    assert answer.type == CtrlType.RESP_OK_EDID and answer.length == 24 + 8 + 1024
    (size,) = RESP_EDID.unpack_from(answer.data)
    edid = answer.data[8:8 + size]
    assert size == 128 and edid[:8] == bytes.fromhex("00ffffffffffff00")
    assert sum(edid) % 256 == 0
    dtd = edid[54:72]
    assert (dtd[2] | (dtd[4] >> 4) << 8, dtd[5] | (dtd[7] >> 4) << 8) == (1280, 800)
    assert gpu.status(CtrlType.CMD_GET_EDID, GET_EDID.pack(1)) == BAD_PARAMETER


def test_transfer_from_scattered_backing_lands_in_the_scanout_and_the_screenshot(
        gpu: Driver) -> None:
    _, pixels = gpu.framebuffer(1, 64, 48)
    assert bytes(gpu.device.resources.get(1).pixels) == pixels
    width, height, rgb = decode_png(gpu.device.screenshot(0))
    assert (width, height) == (64, 48)
    assert rgb == rgb_of_bgrx(pixels)


def test_partial_transfer_reads_rows_at_offset_plus_stride(gpu: Driver) -> None:
    width, height = 32, 16
    gpa = gpu.pages(width * height * 4)
    source = bytes((i * 13) & 0xFF for i in range(width * height * 4))
    gpu.memory.write(gpa, source)
    assert gpu.create(5, width, height) == OK
    assert gpu.attach(5, [(gpa, len(source))]) == OK
    stride = width * 4
    # a 3x2 box at (4, 5): rows read at offset + n * stride, as Linux sends them
    assert gpu.transfer(5, 4, 5, 3, 2, offset=5 * stride + 4 * 4) == OK
    resource = gpu.device.resources.get(5).pixels
    for row in range(16):
        got = resource[row * stride:(row + 1) * stride]
        if row in (5, 6):
            assert got[16:28] == source[row * stride + 16:row * stride + 28]
            assert got[:16] == bytes(16) and got[28:] == bytes(stride - 28)
        else:
            assert got == bytes(stride)


def test_fenced_command_answers_with_the_flag_and_the_fence_id(gpu: Driver) -> None:
    answer = gpu.send(CtrlType.CMD_RESOURCE_CREATE_2D,
                      RESOURCE_CREATE_2D.pack(1, GpuFormat.B8G8R8A8_UNORM, 64, 64),
                      flags=FLAG_FENCE, fence_id=0x1234_5678_9ABC)
    assert (answer.type, answer.flags, answer.fence_id) == (OK, FLAG_FENCE, 0x1234_5678_9ABC)
    # a failing fenced command too
    answer = gpu.send(CtrlType.CMD_RESOURCE_UNREF, RESOURCE_ID.pack(9), flags=FLAG_FENCE,
                      fence_id=7)
    assert (answer.type, answer.flags, answer.fence_id) == (BAD_RESOURCE, FLAG_FENCE, 7)


def test_other_formats_are_shown_as_the_colours_they_name(gpu: Driver) -> None:
    gpa = gpu.pages(16 * 16 * 4)
    gpu.memory.write(gpa, bytes([10, 20, 30, 40]) * 256)  # R, G, B, X in memory
    assert gpu.create(3, 16, 16, GpuFormat.R8G8B8X8_UNORM) == OK
    assert gpu.attach(3, [(gpa, 1024)]) == OK
    assert gpu.transfer(3, 0, 0, 16, 16) == OK
    assert gpu.scanout(0, 3, 0, 0, 16, 16) == OK
    assert decode_png(gpu.device.screenshot(0))[2] == bytes([10, 20, 30]) * 256


def test_scanout_shows_a_sub_rectangle_of_the_resource(gpu: Driver) -> None:
    _, pixels = gpu.framebuffer(1, 64, 48)
    assert gpu.scanout(0, 1, 8, 4, 32, 20) == OK
    width, height, rgb = decode_png(gpu.device.screenshot(0))
    assert (width, height) == (32, 20)
    expected = b"".join(pixels[(4 + y) * 256 + 32:(4 + y) * 256 + 32 + 128] for y in range(20))
    assert rgb == rgb_of_bgrx(expected)


def test_unref_frees_the_budget_and_blanks_its_scanout(gpu: Driver) -> None:
    gpu.framebuffer(1, 64, 48)
    assert gpu.device.resources.used == 64 * 48 * 4
    assert gpu.unref(1) == OK
    assert gpu.device.resources.used == 0 and gpu.device.scanout_size(0) is None
    with pytest.raises(ValueError, match="shows nothing"):
        gpu.device.screenshot(0)
    assert gpu.unref(1) == BAD_RESOURCE


def test_detach_then_transfer_is_refused_and_reattach_works(gpu: Driver) -> None:
    gpa, _ = gpu.framebuffer(1, 16, 16, pieces=1)
    assert gpu.detach(1) == OK
    assert gpu.detach(1) == UNSPEC
    assert gpu.transfer(1, 0, 0, 16, 16) == UNSPEC
    assert gpu.attach(1, [(gpa, 1024)]) == OK


def test_scanout_disabled_with_resource_0(gpu: Driver) -> None:
    gpu.framebuffer(1, 16, 16)
    assert gpu.scanout(0, 0, 0, 0, 0, 0) == OK
    assert gpu.device.scanout_size(0) is None
    assert 0 not in {s for r in gpu.device.resources for s in r.scanouts}


def test_screenshot_control_command_writes_a_png(gpu: Driver, tmp_path: Path) -> None:
    gpu.framebuffer(1, 32, 16)
    answers: list[dict[str, object]] = []
    target = tmp_path / "a b.png"
    gpu.device.control_commands()["screenshot"]([str(target).replace(" ", "%20")],
                                                answers.append)
    assert answers == [{"ok": True, "path": str(target), "scanout": 0, "width": 32,
                        "height": 16, "bytes": target.stat().st_size}]
    assert decode_png(target.read_bytes())[:2] == (32, 16)
    gpu.device.control_commands()["screenshot"]([str(target), "3"], answers.append)
    assert answers[-1] == {"ok": False, "error": "scanout 3 shows nothing"}


def test_record_keeps_a_png_every_n_flushes(tmp_path: Path) -> None:
    with harness(GpuConfig(record=tmp_path, record_every=2)) as h:
        gpu = Driver(h)
        gpu.framebuffer(1, 16, 16)  # flush 1
        for _ in range(4):  # flushes 2..5
            assert gpu.flush(1, 0, 0, 16, 16) == OK
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "frame-00000002.png", "frame-00000004.png"]


def test_events_clear_write_is_taken(gpu: Driver) -> None:
    gpu.device.events_read = 1
    assert gpu.h.write_config(0, CONFIG.pack(0, 1, 0, 0))
    assert gpu.device.events_read == 0
    assert not gpu.h.write_config(8, b"\1\0\0\0")


def test_cursor_commands_without_response_room_are_used_empty(gpu: Driver) -> None:
    assert gpu.create(7, 64, 64, GpuFormat.B8G8R8A8_UNORM) == OK
    cursor = UPDATE_CURSOR.pack(0, 10, 20, 7, 1, 2)
    used = gpu.h.request(CURSORQ, request(CtrlType.CMD_UPDATE_CURSOR, cursor), 0)
    assert used.length == 0
    assert gpu.status(CtrlType.CMD_MOVE_CURSOR, cursor, queue=CURSORQ) == OK
    assert gpu.status(CtrlType.CMD_UPDATE_CURSOR, UPDATE_CURSOR.pack(0, 0, 0, 8, 0, 0),
                      queue=CURSORQ) == BAD_RESOURCE
    assert gpu.create(8, 32, 32) == OK
    assert gpu.status(CtrlType.CMD_UPDATE_CURSOR, UPDATE_CURSOR.pack(0, 0, 0, 8, 0, 0),
                      queue=CURSORQ) == BAD_PARAMETER
    assert gpu.status(CtrlType.CMD_UPDATE_CURSOR, UPDATE_CURSOR.pack(5, 0, 0, 7, 0, 0),
                      queue=CURSORQ) == BAD_SCANOUT


# -- hostile resource commands ----------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "expected"), [
    (0, 10, BAD_PARAMETER), (10, 0, BAD_PARAMETER),
    (MAX_DIMENSION + 1, 1, BAD_PARAMETER), (1, U32, BAD_PARAMETER), (U32, U32, BAD_PARAMETER),
    (MAX_DIMENSION, MAX_DIMENSION, OOM),  # 1 GiB > the 256 MiB budget
])
def test_create_with_a_bad_or_huge_size_is_refused_and_allocates_nothing(
        gpu: Driver, width: int, height: int, expected: int) -> None:
    assert gpu.create(1, width, height) == expected
    assert gpu.device.resources.used == 0 and len(gpu.device.resources) == 0


def test_resources_together_stay_within_the_memory_budget() -> None:
    with harness(GpuConfig(max_memory=1 << 20)) as h:
        gpu = Driver(h)
        assert gpu.create(1, 256, 512) == OK  # 512 KiB
        assert gpu.create(2, 256, 512) == OK  # 1 MiB in all
        assert gpu.create(3, 1, 1) == OOM
        assert gpu.unref(1) == OK
        assert gpu.create(3, 256, 512) == OK
        assert gpu.device.resources.used == 1 << 20


def test_create_with_id_0_a_used_id_or_an_unknown_format_is_refused(gpu: Driver) -> None:
    assert gpu.create(0, 16, 16) == BAD_RESOURCE
    assert gpu.create(1, 16, 16) == OK
    assert gpu.create(1, 16, 16) == BAD_RESOURCE
    assert gpu.create(2, 16, 16, fmt=99) == BAD_PARAMETER


@pytest.mark.parametrize("command", [
    CtrlType.CMD_RESOURCE_UNREF, CtrlType.CMD_RESOURCE_DETACH_BACKING,
])
def test_unknown_resource_ids_are_refused(gpu: Driver, command: int) -> None:
    for resource_id in (0, 1, U32):
        assert gpu.status(command, RESOURCE_ID.pack(resource_id)) == BAD_RESOURCE


def test_unknown_resource_everywhere(gpu: Driver) -> None:
    assert gpu.transfer(4, 0, 0, 1, 1) == BAD_RESOURCE
    assert gpu.flush(4, 0, 0, 1, 1) == BAD_RESOURCE
    assert gpu.scanout(0, 4, 0, 0, 16, 16) == BAD_RESOURCE
    assert gpu.attach(4, [(gpu.pages(4096), 4096)]) == BAD_RESOURCE


def test_overlapping_backing_entries_are_refused(gpu: Driver) -> None:
    gpa = gpu.pages(3 * 4096)
    assert gpu.create(1, 16, 16) == OK
    assert gpu.attach(1, [(gpa, 4096), (gpa + 4095, 4096)]) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa + 8192, 4096), (gpa, 4096), (gpa + 8192, 16)]) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa, 4096), (gpa, 4096)]) == BAD_PARAMETER
    assert gpu.device.resources.get(1).backing is None
    assert gpu.attach(1, [(gpa + 4096, 4096), (gpa, 4096)]) == OK  # adjacent is fine


@pytest.mark.parametrize("entry", [
    (0, 4096),  # below guest RAM
    (1 << 48, 4096),  # far above it
    (U64 - 15, 4096),  # wraps around 2**64
    (None, 8192),  # starts in guest RAM, runs past its end
])
def test_backing_outside_guest_memory_is_refused(gpu: Driver, entry: tuple[int | None, int]
                                                 ) -> None:
    addr, length = entry
    top = gpu.pages(8192)  # the last two pages of guest RAM
    if addr is None:
        addr = top + 4096
    assert gpu.create(1, 16, 16) == OK
    assert gpu.attach(1, [(top, 4096), (addr, length)]) == UNSPEC
    assert gpu.device.resources.get(1).backing is None


def test_backing_entry_counts_and_empty_entries(gpu: Driver) -> None:
    gpa = gpu.pages(4096)
    assert gpu.create(1, 16, 16) == OK
    assert gpu.attach(1, []) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa, 4096)], count=MAX_BACKING_ENTRIES + 1) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa, 4096)], count=U32) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa, 4096)], count=2) == UNSPEC  # entries missing: too short
    assert gpu.attach(1, [(gpa, 0)]) == BAD_PARAMETER
    assert gpu.attach(1, [(gpa, 4096)]) == OK
    assert gpu.attach(1, [(gpa, 4096)]) == UNSPEC  # has a backing already


@pytest.mark.parametrize("box", [
    (0, 0, 17, 16), (0, 0, 16, 17), (16, 0, 1, 1), (0, 16, 1, 1),
    (U32, 0, 2, 1), (0, U32, 1, 2), (1, 1, U32, U32), (U32, U32, U32, U32),
])
def test_transfer_rectangle_outside_the_resource_is_refused(
        gpu: Driver, box: tuple[int, int, int, int]) -> None:
    gpu.framebuffer(1, 16, 16)
    before = bytes(gpu.device.resources.get(1).pixels)
    assert gpu.transfer(1, *box) == BAD_PARAMETER
    assert gpu.flush(1, *box) == BAD_PARAMETER
    assert gpu.scanout(0, 1, *box) == BAD_PARAMETER
    assert bytes(gpu.device.resources.get(1).pixels) == before


@pytest.mark.parametrize("offset", [1, 1024, 4096, U32, U64])
def test_transfer_reading_past_the_backing_is_refused_and_writes_nothing(
        gpu: Driver, offset: int) -> None:
    gpu.framebuffer(1, 16, 16, pieces=2)  # a backing of exactly 1024 bytes
    backing = gpu.device.resources.get(1).backing
    assert backing is not None
    gpu.memory.write(backing.entries[0][0], b"\xAA" * 16)
    before = bytes(gpu.device.resources.get(1).pixels)
    assert gpu.transfer(1, 0, 0, 16, 16, offset=offset) == BAD_PARAMETER
    assert gpu.transfer(1, 0, 15, 16, 1, offset=min(offset + 15 * 64, U64)) == BAD_PARAMETER
    assert bytes(gpu.device.resources.get(1).pixels) == before


def test_backing_smaller_than_the_resource_limits_transfers(gpu: Driver) -> None:
    gpa = gpu.pages(4096)
    assert gpu.create(1, 64, 64) == OK  # 16 KiB of pixels
    assert gpu.attach(1, [(gpa, 4096)]) == OK
    assert gpu.transfer(1, 0, 0, 64, 16) == OK  # the first 4 KiB
    assert gpu.transfer(1, 0, 0, 64, 17) == BAD_PARAMETER


@pytest.mark.parametrize("box", [(0, 0, 15, 16), (0, 0, 16, 15), (0, 0, 0, 0)])
def test_scanout_smaller_than_16_pixels_is_refused(gpu: Driver, box: tuple[int, ...]) -> None:
    gpu.framebuffer(1, 16, 16)
    assert gpu.scanout(0, 1, *box) == BAD_PARAMETER


def test_scanout_ids_past_the_outputs_are_refused(gpu: Driver) -> None:
    gpu.framebuffer(1, 16, 16)
    for scanout in (1, 15, 16, U32):
        assert gpu.scanout(scanout, 1, 0, 0, 16, 16) == BAD_SCANOUT


def test_short_unknown_and_3d_requests_get_unspec(gpu: Driver) -> None:
    assert gpu.status(CtrlType.CMD_RESOURCE_CREATE_2D, b"\1\0\0\0") == UNSPEC
    assert gpu.status(0x0999) == UNSPEC
    assert gpu.status(0x0207) == UNSPEC  # VIRTIO_GPU_CMD_SUBMIT_3D
    assert gpu.status(CtrlType.CMD_RESOURCE_CREATE_BLOB) == UNSPEC
    assert gpu.status(CtrlType.CMD_MOVE_CURSOR, bytes(24)) == UNSPEC  # cursor on controlq
    assert gpu.status(CtrlType.CMD_GET_DISPLAY_INFO, queue=CURSORQ) == UNSPEC
    used = gpu.h.request(CONTROLQ, b"\0" * 10, ROOM)  # shorter than a header
    assert CTRL_HDR.unpack_from(used.data)[0] == UNSPEC
    stats = gpu.device.stats[CONTROLQ]
    assert stats.errors == 6 and stats.kinds["err_unsupported"] == 4
    assert gpu.device.stats[CURSORQ].kinds["err_unsupported"] == 1


def test_no_room_for_the_response_writes_nothing(gpu: Driver) -> None:
    used = gpu.h.request(CONTROLQ, request(CtrlType.CMD_GET_DISPLAY_INFO), 100)
    assert used.length == 0
    assert gpu.device.stats[CONTROLQ].kinds["err_no_room"] == 1


def test_a_new_front_end_gets_a_fresh_device(gpu: Driver) -> None:
    gpu.framebuffer(1, 16, 16)
    gpu.device.start()  # what the back-end does for each new connection
    assert len(gpu.device.resources) == 0 and gpu.device.resources.used == 0
    assert gpu.device.scanout_size(0) is None
    assert gpu.create(1, 16, 16) == OK  # the id is free again


def test_refusals_are_counted_by_name(gpu: Driver) -> None:
    assert gpu.create(0, 16, 16) == BAD_RESOURCE
    assert gpu.create(1, 0, 16) == BAD_PARAMETER
    assert gpu.create(2, MAX_DIMENSION, MAX_DIMENSION) == OOM
    kinds = gpu.device.stats[CONTROLQ].kinds
    assert (kinds["err_invalid_resource_id"], kinds["err_invalid_parameter"],
            kinds["err_out_of_memory"]) == (1, 1, 1)
    assert gpu.device.stats[CONTROLQ].errors == 3
