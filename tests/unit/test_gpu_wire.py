"""virtio-gpu wire structures (VIRTIO 1.4 §5.7), the vhost-user-gpu messages, the EDID
block and the PNG/PPM codecs the device and its tests use."""

from __future__ import annotations

import struct
import zlib

import pytest

from pyvirtio.devices.gpu.edid import MAX_EDID_SIDE, make_edid
from pyvirtio.devices.gpu.png import bgrx_to_rgb, decode_png, decode_ppm, encode_png
from pyvirtio.devices.gpu.resources import Rect, to_bgrx
from pyvirtio.spec import gpu


def test_struct_sizes_match_the_spec() -> None:
    sizes = {
        "CONFIG": 16, "CTRL_HDR": 24, "RECT": 16, "DISPLAY_ONE": 24, "GET_EDID": 8,
        "RESP_EDID": 8, "RESOURCE_CREATE_2D": 16, "RESOURCE_ID": 8, "SET_SCANOUT": 24,
        "RESOURCE_FLUSH": 24, "TRANSFER_TO_HOST_2D": 32, "RESOURCE_ATTACH_BACKING": 8,
        "MEM_ENTRY": 16, "UPDATE_CURSOR": 32, "VU_HEADER": 12, "VU_CURSOR_POS": 12,
        "VU_SCANOUT": 12, "VU_UPDATE": 20, "VU_EDID_REQUEST": 4,
    }
    assert {name: getattr(gpu, name).size for name in sizes} == sizes
    assert gpu.RESP_DISPLAY_INFO_SIZE == 408
    assert int(gpu.CtrlType.RESP_ERR_INVALID_PARAMETER) == 0x1205
    assert int(gpu.VuGpuRequest.GET_EDID) == 11


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (1024, 640), (16, 16),
                                               (MAX_EDID_SIDE, MAX_EDID_SIDE), (3840, 2160)])
def test_edid_checksum_header_and_preferred_timing(width: int, height: int) -> None:
    edid = make_edid(width, height, serial=3)
    assert len(edid) == 128 and sum(edid) % 256 == 0
    assert edid[:8] == bytes.fromhex("00ffffffffffff00") and edid[18:20] == b"\x01\x04"
    dtd = edid[54:72]
    clock = dtd[0] | dtd[1] << 8
    assert 0 < clock <= 0xFFFF
    assert dtd[2] | (dtd[4] >> 4) << 8 == width
    assert dtd[5] | (dtd[7] >> 4) << 8 == height
    assert edid[72:77] == b"\0\0\0\xfc\0" and edid[77:86] == b"pyvirtio\n"
    assert edid[0x18] & 0x02  # the first timing is the preferred one


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (MAX_EDID_SIDE + 1, 10)])
def test_edid_refuses_sizes_a_detailed_timing_cannot_hold(width: int, height: int) -> None:
    with pytest.raises(ValueError, match="EDID size"):
        make_edid(width, height)


def test_png_round_trip_and_structure() -> None:
    rgb = bytes((i * 31) & 0xFF for i in range(7 * 5 * 3))
    png = encode_png(7, 5, rgb)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    assert decode_png(png) == (7, 5, rgb)
    with pytest.raises(ValueError, match="not 7x5"):
        encode_png(7, 5, rgb[:-1])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_png_reader_undoes_every_row_filter(kind: int) -> None:
    """A 2x2 RGBA image whose second row is filtered with ``kind`` against the first."""
    row1, row2 = bytes([10, 20, 30, 255, 40, 50, 60, 255]), bytes([70, 80, 90, 255, 1, 2, 3, 255])

    def filtered(line: bytes, prior: bytes) -> bytes:
        out = bytearray()
        for i, value in enumerate(line):
            left = line[i - 4] if i >= 4 else 0
            up, corner = prior[i], prior[i - 4] if i >= 4 else 0
            p = left + up - corner
            paeth = min((abs(p - left), 0, left), (abs(p - up), 1, up),
                        (abs(p - corner), 2, corner))[2]
            predictor = (0, left, up, (left + up) // 2, paeth)[kind]
            out.append((value - predictor) & 0xFF)
        return bytes(out)

    raw = b"\0" + row1 + bytes([kind]) + filtered(row2, row1)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 6, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    assert decode_png(png) == (2, 2, bytes([10, 20, 30, 40, 50, 60, 70, 80, 90, 1, 2, 3]))


def test_ppm_reader_takes_qemu_screendumps() -> None:
    assert decode_ppm(b"P6\n# made by QEMU\n2 1\n255\n\x01\x02\x03\x04\x05\x06") == (
        2, 1, b"\x01\x02\x03\x04\x05\x06")
    with pytest.raises(ValueError, match="truncated"):
        decode_ppm(b"P6\n2 1\n255\n\x01")


def test_pixel_conversions() -> None:
    assert bgrx_to_rgb(bytes([1, 2, 3, 4, 5, 6, 7, 8])) == bytes([3, 2, 1, 7, 6, 5])
    # R8G8B8A8 (67): red, green, blue, alpha in memory
    assert to_bgrx(bytes([1, 2, 3, 4]), gpu.GpuFormat.R8G8B8A8_UNORM) == bytes([3, 2, 1, 255])
    # A8R8G8B8 (3): alpha, red, green, blue
    assert to_bgrx(bytes([4, 1, 2, 3]), gpu.GpuFormat.A8R8G8B8_UNORM) == bytes([3, 2, 1, 255])
    assert to_bgrx(bytes([9, 8, 7, 6]), gpu.GpuFormat.B8G8R8X8_UNORM) == bytes([9, 8, 7, 6])


def test_rect_helpers() -> None:
    assert Rect(0, 0, 16, 16).inside(16, 16) and not Rect(1, 0, 16, 16).inside(16, 16)
    assert not Rect(0xFFFFFFFF, 0, 2, 1).inside(16, 16)
    assert Rect(0, 0, 4, 4).intersect(Rect(2, 2, 4, 4)) == Rect(2, 2, 2, 2)
    assert Rect(0, 0, 2, 2).intersect(Rect(2, 2, 4, 4)) is None
    assert Rect(0, 0, 2, 2).union(Rect(4, 4, 1, 1)) == Rect(0, 0, 5, 5)
