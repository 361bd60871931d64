"""ChainReader and ChainWriter: a request read and answered however the driver split
its buffers (VIRTIO 1.4 §2.7.4), and a short chain refused without a partial effect."""

from __future__ import annotations

import struct

import pytest

from pyvirtio.errors import RequestTooShort
from pyvirtio.virtqueue.chain import DescriptorChain

HEADER = struct.Struct("<IIQ")


def _chain(readable: list[bytes], writable: list[int]) -> tuple[DescriptorChain, list[bytearray]]:
    out = [bytearray(n) for n in writable]
    chain = DescriptorChain(
        0, [memoryview(bytearray(piece)) for piece in readable], [memoryview(b) for b in out],
        sum(map(len, readable)), sum(writable))
    return chain, out


def test_a_header_split_over_descriptors_reads_whole() -> None:
    data = HEADER.pack(1, 0, 0x1122334455) + b"payload"
    chain, _ = _chain([data[:3], data[3:9], data[9:]], [])
    reader = chain.reader()
    assert reader.read_obj(HEADER) == (1, 0, 0x1122334455)
    assert reader.remaining == 7
    views = reader.take(7)  # zero-copy views, across the descriptor boundary
    assert b"".join(bytes(v) for v in views) == b"payload"
    assert reader.remaining == 0 and reader.offset == len(data)


def test_reading_past_the_end_is_request_too_short_and_the_cursor_stays() -> None:
    chain, _ = _chain([b"abc", b"de"], [])
    reader = chain.reader()
    reader.skip(2)
    with pytest.raises(RequestTooShort) as info:
        reader.read_obj(HEADER)
    assert (info.value.need, info.value.have) == (HEADER.size, 3)
    assert reader.offset == 2
    with pytest.raises(RequestTooShort):
        reader.take(4)
    with pytest.raises(RequestTooShort):
        reader.skip(4)
    assert reader.read() == b"cde"


def test_the_writer_spreads_the_answer_and_counts_the_used_length() -> None:
    chain, out = _chain([], [3, 5, 8])
    writer = chain.writer()
    assert writer.write(b"hello") == 5
    assert writer.write_obj(struct.Struct("<H"), 0xBEEF) == 2
    assert writer.written == 7 and writer.remaining == 9
    assert bytes(out[0]) == b"hel" and bytes(out[1]) == b"lo\xef\xbe\x00"


def test_an_answer_longer_than_the_room_writes_nothing() -> None:
    chain, out = _chain([], [2, 2])
    writer = chain.writer()
    with pytest.raises(RequestTooShort) as info:
        writer.write(b"toolong")
    assert (info.value.need, info.value.have) == (7, 4)
    assert writer.written == 0 and out == [bytearray(2), bytearray(2)]
