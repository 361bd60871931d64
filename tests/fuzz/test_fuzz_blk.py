"""Fuzz target: virtio-blk request parsing and execution against a scratch image.

A case is a device (negotiated FLUSH / DISCARD / WRITE_ZEROES, read-only or not) and
a few requests.  Each request is a header (any type, reserved word and sector, cut
short or padded), data (OUT payload, discard / write-zeroes segments, junk), writable
bytes with or without a status byte, cut into descriptors at arbitrary points
(zero-length descriptors included), laid out directly, through an indirect table, or
with a readable descriptor after the writable ones.  Buffers may straddle two memory
regions.  Chains go through the real :class:`~pyvirtio.virtqueue.split.SplitQueue`
into :meth:`BlockDevice.handle_chain`, as the back-end drives them.

The image is 64 sectors plus a 300-byte tail that is not a whole sector.
Invariants, for every request:

- nothing escapes ``handle_chain`` (it must answer, not raise); the queue raises only
  ``VirtqueueError`` and then the request is not executed;
- when the chain has a writable byte, its last one holds OK, IOERR or UNSUPP; the used
  length never exceeds the writable length;
- the image never changes size and its tail (beyond the capacity) never changes;
- a request that does not complete with OK leaves the image untouched;
- the status, the bytes returned and the image agree with a model of VIRTIO 1.4 §5.2.6.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.errors import VirtqueueError
from pyvirtio.spec.blk import (
    DISCARD_SEGMENT,
    GET_ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.spec.virtqueue import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from pyvirtio.spec.virtqueue import VIRTQ_DESC_F_WRITE as WRITE
from pyvirtio.testing import QueuePair, guest_memory, make_queue_pair

from .conftest import fuzz_target

CAPACITY = 64
TAIL = 300
IMAGE_BYTES = CAPACITY * SECTOR_SIZE
SERIAL = "fuzz-serial-0123456"
QUEUE_SIZE = 64
#: Guest RAM: two adjacent regions, so buffers can cross from one memfd into the other.
LAYOUT = ((0, 0x10000), (0x10000, 0x30000))
RING_GPA = 0x1000
#: Buffers start here, or just before the region boundary so that they straddle it.
DATA_STARTS = (0x4000, 0x10000 - 700)
INDIRECT_TABLE = 0x3000
MAX_SEGMENTS = 128  # what the device advertises (max_discard_seg, max_write_zeroes_seg)
FEATURE_BITS = (BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


# -- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    sector: int
    num: int
    flags: int


@dataclass(frozen=True)
class BlkRequest:
    """One request; its readable part is ``header`` (``header_len`` bytes of the packed
    ``type, reserved, sector``, padded with junk), ``out_len`` bytes of data, the
    segments (each given one, the last repeated ``repeat`` more times) and ``junk``."""

    type: int
    reserved: int
    sector: int
    header_len: int
    out_len: int
    segments: tuple[Segment, ...]
    repeat: int
    junk: int
    in_len: int
    status: bool
    readable_cuts: tuple[int, ...]
    writable_cuts: tuple[int, ...]
    layout: int  # 0 direct, 1 indirect table, 2 a readable descriptor after the writable ones
    straddle: bool
    seed: int


@dataclass(frozen=True)
class BlkCase:
    features: int  # bit i: FEATURE_BITS[i] negotiated
    readonly: bool
    requests: tuple[BlkRequest, ...]


TYPES = (BlkCase, BlkRequest, Segment)

in_range_sectors = st.integers(0, CAPACITY + 1)
sectors = st.one_of(
    in_range_sectors,
    in_range_sectors,
    st.sampled_from([CAPACITY - 8, CAPACITY - 1, CAPACITY, CAPACITY + 1, 1 << 32,
                     (1 << 55) - 1, 1 << 55, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
valid_segments = st.builds(
    Segment,
    sector=st.integers(0, CAPACITY - 1),
    num=st.integers(0, 16),
    flags=st.sampled_from([0, WRITE_ZEROES_FLAG_UNMAP]),
)
wild_segments = st.builds(
    Segment,
    sector=sectors,
    num=st.one_of(st.sampled_from([0, 1, 8, CAPACITY, CAPACITY + 1, (1 << 32) - 1]),
                  st.integers(0, CAPACITY)),
    flags=st.one_of(st.sampled_from([0, 0, WRITE_ZEROES_FLAG_UNMAP, 2, 3]),
                    st.integers(0, (1 << 32) - 1)),
)
segments = st.one_of(valid_segments, valid_segments, wild_segments)
lengths = st.one_of(
    st.integers(0, 4).map(lambda n: n * SECTOR_SIZE),
    st.sampled_from([0, 1, 19, 20, 21, 511, 512, 513, 1024, 4096, IMAGE_BYTES]),
    st.integers(0, 9000),
)
request_types = st.one_of(
    st.sampled_from(list(RequestType)),
    st.sampled_from([RequestType.IN, RequestType.OUT, RequestType.DISCARD,
                     RequestType.WRITE_ZEROES]),
    st.integers(0, (1 << 32) - 1),
)
cuts = st.lists(st.integers(0, 20000), max_size=6).map(lambda c: tuple(sorted(c)))


@st.composite
def blk_requests(draw: st.DrawFn) -> BlkRequest:
    type_ = draw(request_types)
    kind = RequestType(type_) if type_ in set(RequestType) else None
    # Mostly the payload the type calls for; sometimes any payload with any type.
    fitting = draw(st.integers(0, 3)) > 0
    out_len = draw(lengths) if not fitting or kind == RequestType.OUT else 0
    has_segments = not fitting or kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES)
    segs = tuple(draw(st.lists(segments, min_size=1 if fitting else 0, max_size=3))
                 if has_segments else ())
    in_len = draw(lengths) if not fitting or kind in (RequestType.IN, RequestType.GET_ID) else 0
    return BlkRequest(
        type=int(type_),
        reserved=draw(st.one_of(st.just(0), st.integers(0, (1 << 32) - 1))),
        sector=draw(sectors),
        header_len=draw(st.one_of(st.just(16), st.just(16), st.integers(0, 24))),
        out_len=out_len,
        segments=segs,
        repeat=draw(st.one_of(st.just(0), st.sampled_from([MAX_SEGMENTS - 1,
                                                           MAX_SEGMENTS]))) if segs else 0,
        junk=draw(st.one_of(st.just(0), st.integers(0, 40))),
        in_len=in_len,
        status=draw(st.integers(0, 15)) > 0,
        readable_cuts=draw(cuts),
        writable_cuts=draw(cuts),
        layout=draw(st.sampled_from([0, 0, 0, 1, 1, 2])),
        straddle=draw(st.booleans()),
        seed=draw(st.integers(0, 255)),
    )


@st.composite
def well_formed_requests(draw: st.DrawFn) -> BlkRequest:
    """Requests a correct driver sends (so that the OK paths are exercised as much as
    the error paths), still cut into arbitrary descriptors."""
    type_ = draw(st.sampled_from([RequestType.IN, RequestType.OUT, RequestType.FLUSH,
                                  RequestType.GET_ID, RequestType.DISCARD,
                                  RequestType.WRITE_ZEROES]))
    sector = draw(st.integers(0, CAPACITY - 1))
    sectors_left = CAPACITY - sector
    data_len = draw(st.integers(0, min(sectors_left, 8))) * SECTOR_SIZE
    segs: tuple[Segment, ...] = ()
    if type_ in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        segs = tuple(draw(st.lists(valid_segments, min_size=1, max_size=3)))
        if type_ == RequestType.DISCARD:
            segs = tuple(Segment(s.sector, s.num, 0) for s in segs)
    return BlkRequest(
        type=int(type_),
        reserved=0,
        sector=sector,
        header_len=16,
        out_len=data_len if type_ == RequestType.OUT else 0,
        segments=segs,
        repeat=draw(st.sampled_from([0, 0, 0, MAX_SEGMENTS - len(segs)])) if segs else 0,
        junk=0,
        in_len=data_len if type_ == RequestType.IN else 20 if type_ == RequestType.GET_ID else 0,
        status=True,
        readable_cuts=draw(cuts),
        writable_cuts=draw(cuts),
        layout=draw(st.sampled_from([0, 1])),
        straddle=draw(st.booleans()),
        seed=draw(st.integers(0, 255)),
    )


blk_cases = st.builds(
    BlkCase,
    features=st.one_of(st.just(7), st.integers(0, 7)),
    readonly=st.integers(0, 5).map(lambda n: n == 0),
    requests=st.lists(st.one_of(well_formed_requests(), blk_requests()), min_size=1,
                      max_size=4).map(tuple),
)


# -- the scratch image ---------------------------------------------------------------------------

_SCRATCH = tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-blk-", dir="/dev/shm"
                                       if os.path.isdir("/dev/shm") else None)
IMAGE = Path(_SCRATCH.name) / "disk.img"
ORIGINAL = bytes((i * 131 + i // 512) & 0xFF for i in range(IMAGE_BYTES + TAIL))
_libc = ctypes.CDLL(None, use_errno=True)


def _punch_zeroes() -> bool:
    """Whether the scratch file system punches holes (else discard may keep the data)."""
    IMAGE.write_bytes(b"\xff" * 8192)
    fd = os.open(IMAGE, os.O_RDWR)
    try:
        ok = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                             ctypes.c_int64(0), ctypes.c_int64(4096)) == 0
        return ok and os.pread(fd, 4096, 0) == bytes(4096)
    finally:
        os.close(fd)


PUNCH_ZEROES = _punch_zeroes()


def pattern(length: int, seed: int) -> bytes:
    """``length`` bytes that differ from the image's and from other requests' data."""
    block = bytes((seed + 97 * i) & 0xFF | 1 for i in range(256))
    return (block * (length // 256 + 1))[:length]


# -- the model: VIRTIO 1.4 §5.2.6 as pyvirtio implements it -------------------------------------


@dataclass
class Outcome:
    status: int | None  # None: no status byte, not executed
    written: int
    image: bytearray
    #: Byte ranges a discard may leave as they were or zero (no hole punching here).
    loose: list[tuple[int, int]]
    data: bytes = b""  # what the first writable bytes must hold (IN, GET_ID)


def model(case: BlkCase, req_readable: bytes, writable_len: int, image: bytes) -> Outcome:
    features = {bit for i, bit in enumerate(FEATURE_BITS) if case.features >> i & 1}
    after = bytearray(image)
    if writable_len < 1:
        return Outcome(None, 0, after, [])
    if len(req_readable) < REQUEST_HEADER.size:
        return Outcome(Status.IOERR, 1, after, [])
    type_, _reserved, sector = REQUEST_HEADER.unpack_from(req_readable)
    data = req_readable[REQUEST_HEADER.size :]

    def in_range(sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= IMAGE_BYTES

    ioerr = Outcome(Status.IOERR, 1, after, [])
    if type_ == RequestType.IN:
        length = writable_len - 1
        if not in_range(sector, length):
            return ioerr
        start = sector * SECTOR_SIZE
        return Outcome(Status.OK, length + 1, after, [], bytes(image[start : start + length]))
    if type_ == RequestType.OUT:
        if case.readonly or not in_range(sector, len(data)):
            return ioerr
        start = sector * SECTOR_SIZE
        after[start : start + len(data)] = data
        return Outcome(Status.OK, 1, after, [])
    if type_ == RequestType.FLUSH and BlkFeature.FLUSH in features:
        return Outcome(Status.OK, 1, after, [])
    if type_ == RequestType.GET_ID:
        n = min(GET_ID_BYTES, writable_len - 1)
        serial = SERIAL.encode().ljust(GET_ID_BYTES, b"\0")
        return Outcome(Status.OK, n + 1, after, [], serial[:n])
    zeroes = type_ == RequestType.WRITE_ZEROES
    if (type_ == RequestType.DISCARD and BlkFeature.DISCARD in features) or (
        zeroes and BlkFeature.WRITE_ZEROES in features
    ):
        count = len(data) // DISCARD_SEGMENT.size
        if case.readonly or len(data) % DISCARD_SEGMENT.size or not 0 < count <= MAX_SEGMENTS:
            return ioerr
        segs = [DISCARD_SEGMENT.unpack_from(data, 16 * i) for i in range(count)]
        for seg_sector, num, flags in segs:  # checked in order: the first bad one answers
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (flags and not zeroes):
                return Outcome(Status.UNSUPP, 1, after, [])
            if not in_range(seg_sector, num * SECTOR_SIZE):
                return ioerr
        loose = []
        for seg_sector, num, flags in segs:
            start, size = seg_sector * SECTOR_SIZE, num * SECTOR_SIZE
            punched = not zeroes or flags & WRITE_ZEROES_FLAG_UNMAP
            if punched and not zeroes and not PUNCH_ZEROES:
                loose.append((start, size))
            else:
                after[start : start + size] = bytes(size)
        return Outcome(Status.OK, 1, after, loose)
    return Outcome(Status.UNSUPP, 1, after, [])


# -- building and running requests ---------------------------------------------------------------


def readable_bytes(req: BlkRequest) -> bytes:
    header = REQUEST_HEADER.pack(req.type, req.reserved, req.sector)
    header = (header + b"\xa5" * 8)[: req.header_len]
    segs = list(req.segments) + [req.segments[-1]] * req.repeat if req.segments else []
    raw_segs = b"".join(DISCARD_SEGMENT.pack(s.sector, s.num, s.flags) for s in segs)
    return header + pattern(req.out_len, req.seed) + raw_segs + b"\x5a" * req.junk


def pieces(total: int, cut_points: tuple[int, ...]) -> list[tuple[int, int]]:
    """(offset, length) of the descriptors ``total`` bytes are cut into (some may be
    empty); no descriptor at all for no bytes and no cuts."""
    if not total and not cut_points:
        return []
    points = [min(c, total) for c in cut_points]
    bounds = [0, *points, total]
    return [(a, b - a) for a, b in itertools.pairwise(bounds)]


def build_chain(pair: QueuePair, req: BlkRequest, readable: bytes, writable_len: int,
                start: int) -> tuple[list[tuple[int, int]], bool]:
    """Write the buffers and descriptors and publish the chain (head 0); return the
    writable buffers (GPA, length) in chain order, and whether a readable descriptor
    follows a writable one."""
    memory = pair.memory
    pair.next_data = start
    descs: list[tuple[int, int, int]] = []
    for offset, length in pieces(len(readable), req.readable_cuts):
        gpa = pair.alloc(length)
        memory.write(gpa, readable[offset : offset + length])
        descs.append((gpa, length, 0))
    writable: list[tuple[int, int]] = []
    for _offset, length in pieces(writable_len, req.writable_cuts):
        gpa = pair.alloc(length)
        memory.write(gpa, b"\xee" * length)
        descs.append((gpa, length, WRITE))
        writable.append((gpa, length))
    if not descs:  # a chain has at least one descriptor: an empty readable one
        descs.append((pair.alloc(0), 0, 0))
    misordered = req.layout == 2 and any(f == 0 for _, _, f in descs) and bool(writable)
    if misordered:
        first = next(i for i, d in enumerate(descs) if d[2] == 0)
        descs.append(descs.pop(first))  # a readable descriptor after the writable ones
    if req.layout == 1:
        table = b"".join(
            DESC.pack(gpa, length, flags | (VIRTQ_DESC_F_NEXT if i < len(descs) - 1 else 0), i + 1)
            for i, (gpa, length, flags) in enumerate(descs)
        )
        memory.write(INDIRECT_TABLE, table)
        pair.driver.write_desc(0, INDIRECT_TABLE, len(table), VIRTQ_DESC_F_INDIRECT)
    else:
        for i, (gpa, length, flags) in enumerate(descs):
            last = i == len(descs) - 1
            pair.driver.write_desc(i, gpa, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                   i + 1)
    pair.driver.publish(0)
    return writable, misordered


def image_now() -> bytes:
    return IMAGE.read_bytes()


def run_request(case: BlkCase, device: BlockDevice, pair: QueuePair, req: BlkRequest) -> None:
    readable = readable_bytes(req)
    writable_len = req.in_len + (1 if req.status else 0)
    start = DATA_STARTS[1] if req.straddle else DATA_STARTS[0]
    writable, misordered = build_chain(pair, req, readable, writable_len, start)
    before = image_now()
    try:
        chain = pair.device.pop()
    except VirtqueueError as exc:
        # The only rule break these chains can make; the request is not executed.
        event(f"blk: chain refused ({type(exc).__name__})")
        assert misordered, exc
        assert exc.head == 0
        pair.device.push(0, 0)
        assert image_now() == before
        return
    assert chain is not None
    assert not misordered, "a readable descriptor after a writable one was accepted"
    written = device.handle_chain(0, chain)  # nothing may escape: any exception is a finding
    assert isinstance(written, int), "--aio sync never defers"
    pair.device.push(chain.head, written)
    after = image_now()
    assert len(after) == IMAGE_BYTES + TAIL, "the image changed size"
    assert after[IMAGE_BYTES:] == ORIGINAL[IMAGE_BYTES:], "the tail beyond the capacity changed"
    assert 0 <= written <= chain.writable_len
    expected = model(case, readable, writable_len, before)
    kind = REQUEST_HEADER.unpack_from(readable)[0] if len(readable) >= 16 else "short"
    kind = RequestType(kind).name if kind in set(RequestType) else kind
    event(f"blk: {kind if isinstance(kind, str) else 'other type'} -> "
          f"{'no status' if expected.status is None else Status(expected.status).name}")
    if expected.status is None:
        assert written == 0
        assert after == before
        return
    last_gpa, last_len = next((g, n) for g, n in reversed(writable) if n)
    status = pair.memory.read(last_gpa + last_len - 1, 1)[0]
    assert status in (Status.OK, Status.IOERR, Status.UNSUPP), f"status byte {status}"
    if status != Status.OK:
        assert after == before, "a failed request modified the image"
    assert (status, written) == (expected.status, expected.written), (
        f"device answered {status} with {written} bytes, the model {expected.status} "
        f"with {expected.written}"
    )
    got = b"".join(pair.memory.read(g, n) for g, n in writable)[: len(expected.data)]
    assert got == expected.data
    for start_, size in expected.loose:
        for i in range(start_, start_ + size):
            assert after[i] in (before[i], 0)
        expected.image[start_ : start_ + size] = after[start_ : start_ + size]
    assert after == bytes(expected.image), "the image differs from the model"


@fuzz_target("blk", blk_cases, types=TYPES, quick_examples=300)
def test_blk_requests_never_escape_and_match_the_model(case: BlkCase) -> None:
    """Whatever chain carries a request, the block device answers it with a valid status,
    touches the image only as the request says, and never outside the capacity."""
    IMAGE.write_bytes(ORIGINAL)
    device = BlockDevice(BlockConfig(image=IMAGE, readonly=case.readonly, serial=SERIAL))
    try:
        assert device.capacity == CAPACITY
        device.start()
        device.set_features(sum(1 << bit for i, bit in enumerate(FEATURE_BITS)
                                if case.features >> i & 1))
        with guest_memory(LAYOUT) as guest:
            pair = make_queue_pair(guest.memory, QUEUE_SIZE, ring_gpa=RING_GPA, indirect=True)
            for req in case.requests:
                run_request(case, device, pair, req)
    finally:
        device.close()
