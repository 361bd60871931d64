"""The EDID a virtio-gpu scanout reports (VIRTIO 1.4 §5.7.6.8 GET_EDID): VESA E-EDID 1.4.

With VIRTIO_GPU_F_EDID, Linux's virtio-gpu takes a connector's modes from the EDID
alone, so its first detailed timing descriptor, the preferred mode, must be the
scanout's size: that is the mode fbcon and a desktop start with.  The block is the
128-byte base block with no extension: a detailed timing (CVT reduced blanking,
60 Hz, the pixel clock lowered for very large sizes so that it fits the 10 kHz
field), the monitor name, the range limits and a checksum.  The detailed timing's
fields hold up to 4095 pixels a side, the limit of ``--width``/``--height``.
"""

from __future__ import annotations

__all__ = ["MAX_EDID_SIDE", "make_edid"]

#: The largest width or height a base-block detailed timing can describe.
MAX_EDID_SIDE = 4095

_HEADER = bytes([0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00])
#: Manufacturer "PYV" (three 5-bit letters, big-endian).
_MANUFACTURER = ((ord("P") - 64) << 10 | (ord("Y") - 64) << 5 | (ord("V") - 64)).to_bytes(2, "big")
#: sRGB chromaticity, as most monitors report it.
_SRGB = bytes([0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54])
_H_BLANK, _H_FRONT, _H_SYNC = 160, 48, 32
_V_BLANK, _V_FRONT, _V_SYNC = 30, 3, 6


def _detailed_timing(width: int, height: int) -> bytes:
    """An 18-byte detailed timing descriptor for ``width`` x ``height`` at up to 60 Hz."""
    total = (width + _H_BLANK) * (height + _V_BLANK)
    clock = min(0xFFFF, -(-total * 60 // 10000))  # in 10 kHz units
    width_mm, height_mm = width * 254 // 960, height * 254 // 960  # 96 dpi
    return bytes([
        clock & 0xFF, clock >> 8,
        width & 0xFF, _H_BLANK & 0xFF, (width >> 8) << 4 | _H_BLANK >> 8,
        height & 0xFF, _V_BLANK & 0xFF, (height >> 8) << 4 | _V_BLANK >> 8,
        _H_FRONT, _H_SYNC, (_V_FRONT << 4) | _V_SYNC, 0,
        width_mm & 0xFF, height_mm & 0xFF, (width_mm >> 8) << 4 | height_mm >> 8,
        0, 0,
        0x1E,  # digital separate sync, both polarities positive
    ])


def _text_descriptor(tag: int, text: str) -> bytes:
    raw = text.encode("ascii")[:13]
    if len(raw) < 13:
        raw += b"\n" + b" " * (12 - len(raw))
    return bytes([0, 0, 0, tag, 0]) + raw


def make_edid(width: int, height: int, serial: int = 0, name: str = "pyvirtio") -> bytes:
    """The 128-byte EDID of a ``width`` x ``height`` display (1..4095 each).

    Raises:
        ValueError: a side is out of range.
    """
    if not (0 < width <= MAX_EDID_SIDE and 0 < height <= MAX_EDID_SIDE):
        raise ValueError(f"EDID size {width}x{height}: 1..{MAX_EDID_SIDE} each")
    block = bytearray(128)
    block[0:8] = _HEADER
    block[8:10] = _MANUFACTURER
    block[10:12] = (0x1234).to_bytes(2, "little")  # product code
    block[12:16] = serial.to_bytes(4, "little")
    block[16], block[17] = 1, 2026 - 1990  # week, year of manufacture
    block[18], block[19] = 1, 4  # EDID 1.4
    block[20] = 0xA5  # digital input, 8 bits per colour, DisplayPort
    block[21] = max(1, min(255, width * 254 // 9600))  # size in cm
    block[22] = max(1, min(255, height * 254 // 9600))
    block[23] = 120  # gamma 2.2
    block[24] = 0x06  # RGB 4:4:4, sRGB default, preferred timing includes the native mode
    block[25:35] = _SRGB
    block[38:54] = b"\x01" * 16  # no standard timings
    descriptors = (
        _detailed_timing(width, height),
        _text_descriptor(0xFC, name),  # monitor name
        # range limits: 50-70 Hz vertical, 30-255 kHz horizontal, 655 MHz, no formula
        bytes([0, 0, 0, 0xFD, 0, 50, 70, 30, 255, 66, 1, 0x0A]) + b" " * 6,
        _text_descriptor(0xFF, f"{serial:08d}"),  # serial number
    )
    for n, descriptor in enumerate(descriptors):
        block[54 + 18 * n:72 + 18 * n] = descriptor
    block[126] = 0  # no extension
    block[127] = -sum(block[:127]) & 0xFF
    return bytes(block)
