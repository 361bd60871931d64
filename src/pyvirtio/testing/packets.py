"""Reference code for checking packets in tests, written plainly (not pyvirtio's own)."""

from __future__ import annotations

import struct

__all__ = ["ones_complement_sum"]


def ones_complement_sum(data: bytes) -> int:
    """The RFC 1071 one's complement sum of ``data`` as 16-bit big-endian words
    (an odd length padded with a zero byte), folded to 16 bits, the textbook way: a
    checksum over data that includes it sums to 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
