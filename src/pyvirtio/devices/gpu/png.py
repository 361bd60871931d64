"""A small PNG writer and reader (8-bit RGB, no interlace), with the standard library.

The writer is what ``pyvirtio screenshot`` and ``--record`` produce: each row with
filter type 0 (None), compressed by zlib.  The reader takes any 8-bit RGB or RGBA
PNG without interlace (all five row filters), enough to read back our own files and
most others in tests; it also reads binary PPM (P6), QEMU's ``screendump`` format.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["bgrx_to_rgb", "decode_png", "decode_ppm", "encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">IIBBBBB")
#: Refuse to decode images with more pixels than this (a 16384 x 16384 screen).
_MAX_PIXELS = 1 << 28


def bgrx_to_rgb(pixels: bytes | bytearray | memoryview) -> bytes:
    """Blue, green, red, unused (QEMU's ``x8r8g8b8`` in memory) to packed RGB."""
    count = len(pixels) // 4
    out = bytearray(count * 3)
    out[0::3] = pixels[2::4]
    out[1::3] = pixels[1::4]
    out[2::3] = pixels[0::4]
    return bytes(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes, level: int = 6) -> bytes:
    """A PNG of ``width`` x ``height`` pixels given as packed RGB rows.

    Raises:
        ValueError: ``rgb`` is not ``width * height * 3`` bytes.
    """
    row = width * 3
    if len(rgb) != row * height or width <= 0 or height <= 0:
        raise ValueError(f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
    view = memoryview(rgb)
    raw = b"".join(b"\0" + view[n * row:(n + 1) * row] for n in range(height))
    return (_SIGNATURE
            + _chunk(b"IHDR", _IHDR.pack(width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, level))
            + _chunk(b"IEND", b""))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(kind: int, line: bytearray, prior: bytes | bytearray, bpp: int) -> None:
    if kind == 0:
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = prior[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = prior[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + _paeth(left, up, corner)) & 0xFF
        else:
            raise ValueError(f"PNG row filter {kind}")


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """``(width, height, packed RGB)`` of an 8-bit RGB or RGBA PNG (alpha dropped).

    Raises:
        ValueError: not such a PNG, or damaged.
    """
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG")
    at, header, idat = len(_SIGNATURE), None, bytearray()
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        body = data[at + 8:at + 8 + length]
        if len(body) != length:
            raise ValueError("truncated PNG chunk")
        if kind == b"IHDR":
            header = _IHDR.unpack(body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        at += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace or width * height > _MAX_PIXELS:
        raise ValueError(f"unsupported PNG: depth {depth}, colour {colour}, "
                         f"interlace {interlace}, {width}x{height}")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(bytes(idat))
    row = width * bpp
    if len(raw) != (row + 1) * height:
        raise ValueError("PNG image data has the wrong size")
    out = bytearray()
    prior = bytearray(row)
    for n in range(height):
        start = n * (row + 1)
        line = bytearray(raw[start + 1:start + 1 + row])
        _unfilter(raw[start], line, prior, bpp)
        out += line
        prior = line
    if bpp == 4:
        rgb = bytearray(width * height * 3)
        rgb[0::3], rgb[1::3], rgb[2::3] = out[0::4], out[1::4], out[2::4]
        out = rgb
    return width, height, bytes(out)


def decode_ppm(data: bytes) -> tuple[int, int, bytes]:
    """``(width, height, packed RGB)`` of a binary PPM (P6, maxval 255).

    Raises:
        ValueError: not such a PPM.
    """
    fields: list[bytes] = []
    at = 0
    while len(fields) < 4:
        while at < len(data) and data[at:at + 1].isspace():
            at += 1
        if data[at:at + 1] == b"#":
            at = data.index(b"\n", at)
            continue
        end = at
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        if end == at:
            raise ValueError("truncated PPM header")
        fields.append(data[at:end])
        at = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"not a P6 PPM with maxval 255: {magic!r} {maxval}")
    pixels = data[at + 1:at + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError("truncated PPM pixels")
    return width, height, pixels
