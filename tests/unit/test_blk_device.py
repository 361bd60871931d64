"""virtio-blk over a real image file, driven through the vhost-user back-end
(VIRTIO 1.4 §5.2.6 Device Operation)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.spec.blk import (
    DISCARD_SEGMENT,
    REQUEST_HEADER,
    SECTOR_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.spec.common import Feature
from pyvirtio.testing import Frontend, FrontendFactory
from pyvirtio.vhost_user.protocol import U64, VHOST_USER_F_PROTOCOL_FEATURES, Request

IMAGE_SECTORS = 512  # 256 KiB
SERIAL = "unit-serial-0001"


@dataclass
class Pending:
    """One request in flight: where its data and status live."""

    head: int
    data: int
    data_len: int
    status: int


@dataclass
class Disk:
    fe: Frontend
    path: Path
    original: bytes

    def image(self) -> bytes:
        return self.path.read_bytes()


def make_image(path: Path) -> bytes:
    data = os.urandom(IMAGE_SECTORS * SECTOR_SIZE)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return data


DiskFactory = Callable[..., Disk]


@pytest.fixture
def make_disk(make_frontend: FrontendFactory, tmp_path: Path) -> DiskFactory:
    """A block device on a fresh 256 KiB image of random bytes, fully set up over vhost-user."""

    def make(*, readonly: bool = False, queues: int = 1, features: int | None = None) -> Disk:
        path = tmp_path / f"disk-{len(list(tmp_path.iterdir()))}.img"
        original = make_image(path)
        device = BlockDevice(
            BlockConfig(image=path, readonly=readonly, serial=SERIAL, queues=queues)
        )
        fe = make_frontend(device)
        fe.start(queues=queues, features=features)
        return Disk(fe, path, original)

    return make


@pytest.fixture
def disk(make_disk: DiskFactory) -> Disk:
    return make_disk()


def submit(
    fe: Frontend,
    type_: int,
    sector: int = 0,
    *,
    out: bytes = b"",
    in_len: int = 0,
    queue: int = 0,
    split_header: bool = False,
    split_data: int = 0,
) -> Pending:
    """Build a virtio_blk_req chain: header (+ out data) readable, (in data +) status writable.

    ``split_header`` puts the 16-byte header in two descriptors; ``split_data``
    splits the data buffers at that offset: the device must not assume framing
    (§2.7.4.1).
    """
    header = REQUEST_HEADER.pack(type_, 0, sector)
    if split_header:
        readable = [(fe.put(header[:5]), 5), (fe.put(header[5:]), 11)]
    else:
        readable = [(fe.put(header), 16)]
    writable: list[tuple[int, int]] = []
    data_gpa = data_len = 0
    if out:
        data_gpa, data_len = fe.put(out), len(out)
        readable += _split(data_gpa, data_len, split_data)
    if in_len:
        data_gpa, data_len = fe.alloc(in_len), in_len
        fe.memory.write(data_gpa, b"\xee" * in_len)
        writable += _split(data_gpa, data_len, split_data)
    status = fe.alloc(1)
    fe.memory.write(status, b"\xff")
    writable.append((status, 1))
    head = fe.drivers[queue].add(readable, writable)
    return Pending(head, data_gpa, data_len, status)


def _split(gpa: int, length: int, at: int) -> list[tuple[int, int]]:
    if 0 < at < length:
        return [(gpa, at), (gpa + at, length - at)]
    return [(gpa, length)]


def run(fe: Frontend, request: Pending, queue: int = 0) -> tuple[int, int]:
    """Kick, and return (status, used length) of ``request``."""
    used = dict(fe.kick(queue))
    assert request.head in used, "request was not completed"
    return fe.memory.read(request.status, 1)[0], used[request.head]


def segments(*entries: tuple[int, int, int]) -> bytes:
    return b"".join(DISCARD_SEGMENT.pack(*e) for e in entries)


# -- IN / OUT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("split_header", "split_data"), [(False, 0), (True, 700)])
def test_read_returns_the_image_bytes_at_the_sector(
    disk: Disk, split_header: bool, split_data: int
) -> None:
    req = submit(
        disk.fe,
        RequestType.IN,
        3,
        in_len=4 * SECTOR_SIZE,
        split_header=split_header,
        split_data=split_data,
    )
    status, used_len = run(disk.fe, req)
    assert status == Status.OK
    assert used_len == 4 * SECTOR_SIZE + 1  # data plus the status byte
    expected = disk.original[3 * SECTOR_SIZE : 7 * SECTOR_SIZE]
    assert disk.fe.memory.read(req.data, req.data_len) == expected


@pytest.mark.parametrize(("split_header", "split_data"), [(False, 0), (True, 1000)])
def test_write_lands_in_the_image_file(disk: Disk, split_header: bool, split_data: int) -> None:
    data = os.urandom(3 * SECTOR_SIZE)
    req = submit(
        disk.fe, RequestType.OUT, 100, out=data, split_header=split_header, split_data=split_data
    )
    status, used_len = run(disk.fe, req)
    assert (status, used_len) == (Status.OK, 1)
    image = disk.image()
    assert image[100 * SECTOR_SIZE : 103 * SECTOR_SIZE] == data
    assert image[: 100 * SECTOR_SIZE] == disk.original[: 100 * SECTOR_SIZE]
    assert image[103 * SECTOR_SIZE :] == disk.original[103 * SECTOR_SIZE :]
    stats = disk.fe.backend.device.stats[0]
    assert stats.bytes_out == len(data)


def test_write_then_read_back_round_trips(disk: Disk) -> None:
    data = os.urandom(8 * SECTOR_SIZE)
    assert run(disk.fe, submit(disk.fe, RequestType.OUT, 40, out=data))[0] == Status.OK
    req = submit(disk.fe, RequestType.IN, 40, in_len=len(data), split_data=513)
    assert run(disk.fe, req)[0] == Status.OK
    assert disk.fe.memory.read(req.data, len(data)) == data


def test_last_sector_is_readable(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.IN, IMAGE_SECTORS - 1, in_len=SECTOR_SIZE)
    assert run(disk.fe, req)[0] == Status.OK
    assert disk.fe.memory.read(req.data, SECTOR_SIZE) == disk.original[-SECTOR_SIZE:]


@pytest.mark.parametrize("sector", [IMAGE_SECTORS - 1, IMAGE_SECTORS, 1 << 60])
def test_read_beyond_capacity_is_ioerr(disk: Disk, sector: int) -> None:
    req = submit(disk.fe, RequestType.IN, sector, in_len=2 * SECTOR_SIZE)
    status, used_len = run(disk.fe, req)
    assert (status, used_len) == (Status.IOERR, 1)
    assert disk.fe.memory.read(req.data, req.data_len) == b"\xee" * req.data_len


def test_write_beyond_capacity_is_ioerr_and_does_not_grow_the_image(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.OUT, IMAGE_SECTORS - 1, out=os.urandom(2 * SECTOR_SIZE))
    assert run(disk.fe, req) == (Status.IOERR, 1)
    assert disk.image() == disk.original


def test_transfer_not_a_multiple_of_512_bytes_is_ioerr(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.OUT, 0, out=b"x" * 100)
    assert run(disk.fe, req)[0] == Status.IOERR
    req = submit(disk.fe, RequestType.IN, 0, in_len=100)
    assert run(disk.fe, req)[0] == Status.IOERR
    assert disk.image() == disk.original


# -- FLUSH, GET_ID, unsupported ---------------------------------------------------------------


def test_flush_succeeds_when_negotiated(disk: Disk) -> None:
    assert disk.fe.backend.device.has_feature(BlkFeature.FLUSH)
    assert run(disk.fe, submit(disk.fe, RequestType.FLUSH)) == (Status.OK, 1)


def test_flush_is_unsupported_when_not_negotiated(make_disk: DiskFactory) -> None:
    disk = make_disk(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    assert run(disk.fe, submit(disk.fe, RequestType.FLUSH)) == (Status.UNSUPP, 1)


def test_writes_are_synced_before_completion_when_flush_is_not_negotiated(
    make_disk: DiskFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§5.2.6.2: with FLUSH offered but not negotiated a completed write is stable, so the
    device must commit it before reporting completion (a spy on the OS call records it)."""
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    no_flush = make_disk(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    data = os.urandom(SECTOR_SIZE)
    assert run(no_flush.fe, submit(no_flush.fe, RequestType.OUT, 1, out=data)) == (Status.OK, 1)
    device = no_flush.fe.backend.device
    assert isinstance(device, BlockDevice)
    assert synced == [device.fd]
    assert no_flush.image()[SECTOR_SIZE : 2 * SECTOR_SIZE] == data

    synced.clear()
    with_flush = make_disk()
    assert run(with_flush.fe, submit(with_flush.fe, RequestType.OUT, 1, out=data))[0] == Status.OK
    assert synced == []  # the driver flushes when it needs to


def test_get_id_returns_the_serial_padded_to_20_bytes(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.GET_ID, in_len=20)
    status, used_len = run(disk.fe, req)
    assert (status, used_len) == (Status.OK, 21)
    assert disk.fe.memory.read(req.data, 20) == SERIAL.encode().ljust(20, b"\0")


def test_get_id_into_a_short_buffer_is_truncated(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.GET_ID, in_len=4)
    assert run(disk.fe, req) == (Status.OK, 5)
    assert disk.fe.memory.read(req.data, 4) == SERIAL.encode()[:4]


@pytest.mark.parametrize("type_", [2, 99, RequestType.GET_LIFETIME, RequestType.SECURE_ERASE])
def test_unsupported_request_type_is_unsupp(disk: Disk, type_: int) -> None:
    assert run(disk.fe, submit(disk.fe, type_, in_len=SECTOR_SIZE)) == (Status.UNSUPP, 1)
    assert disk.fe.backend.device.stats[0].errors == 1


# -- DISCARD / WRITE_ZEROES -------------------------------------------------------------------


def test_discard_punches_a_hole_in_the_image(disk: Disk) -> None:
    fd = os.open(disk.path, os.O_RDONLY)
    try:
        blocks_before = os.fstat(fd).st_blocks
        assert os.lseek(fd, 0, os.SEEK_HOLE) == IMAGE_SECTORS * SECTOR_SIZE  # fully allocated
        req = submit(disk.fe, RequestType.DISCARD, out=segments((64, 64, 0)))
        assert run(disk.fe, req) == (Status.OK, 1)
        # Sectors 64..127 = bytes 32 KiB..64 KiB are now a hole.
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 64 * SECTOR_SIZE
        assert os.lseek(fd, 64 * SECTOR_SIZE, os.SEEK_DATA) == 128 * SECTOR_SIZE
        assert os.fstat(fd).st_blocks < blocks_before
        assert os.fstat(fd).st_size == IMAGE_SECTORS * SECTOR_SIZE
    finally:
        os.close(fd)


def test_discard_with_the_unmap_flag_is_unsupp(disk: Disk) -> None:
    """§5.2.6.2: UNSUPP for discard commands if the unmap flag is set."""
    req = submit(disk.fe, RequestType.DISCARD, out=segments((0, 8, WRITE_ZEROES_FLAG_UNMAP)))
    assert run(disk.fe, req) == (Status.UNSUPP, 1)
    assert disk.image() == disk.original


@pytest.mark.parametrize("flags", [0, WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes_makes_the_range_read_zero(disk: Disk, flags: int) -> None:
    req = submit(disk.fe, RequestType.WRITE_ZEROES, out=segments((10, 10, flags), (300, 1, flags)))
    assert run(disk.fe, req) == (Status.OK, 1)
    image = disk.image()
    assert image[10 * SECTOR_SIZE : 20 * SECTOR_SIZE] == bytes(10 * SECTOR_SIZE)
    assert image[300 * SECTOR_SIZE : 301 * SECTOR_SIZE] == bytes(SECTOR_SIZE)
    assert image[: 10 * SECTOR_SIZE] == disk.original[: 10 * SECTOR_SIZE]
    assert (
        image[20 * SECTOR_SIZE : 300 * SECTOR_SIZE]
        == disk.original[20 * SECTOR_SIZE : 300 * SECTOR_SIZE]
    )
    assert image[301 * SECTOR_SIZE :] == disk.original[301 * SECTOR_SIZE :]
    # And a guest read agrees.
    read = submit(disk.fe, RequestType.IN, 10, in_len=10 * SECTOR_SIZE)
    assert run(disk.fe, read)[0] == Status.OK
    assert disk.fe.memory.read(read.data, 10 * SECTOR_SIZE) == bytes(10 * SECTOR_SIZE)


def test_write_zeroes_with_an_unknown_flag_is_unsupp(disk: Disk) -> None:
    req = submit(disk.fe, RequestType.WRITE_ZEROES, out=segments((0, 1, 2)))
    assert run(disk.fe, req) == (Status.UNSUPP, 1)
    assert disk.image() == disk.original


def test_discard_beyond_capacity_is_ioerr_and_changes_nothing(disk: Disk) -> None:
    # The first segment is fine, the second is not: nothing is done (all checked first).
    req = submit(
        disk.fe, RequestType.WRITE_ZEROES, out=segments((0, 8, 0), (IMAGE_SECTORS - 4, 8, 0))
    )
    assert run(disk.fe, req) == (Status.IOERR, 1)
    assert disk.image() == disk.original


@pytest.mark.parametrize("data", [b"", bytes(15), bytes(17)])
def test_discard_payload_not_whole_segments_is_ioerr(disk: Disk, data: bytes) -> None:
    req = (
        submit(disk.fe, RequestType.DISCARD, out=data)
        if data
        else submit(disk.fe, RequestType.DISCARD)
    )
    assert run(disk.fe, req) == (Status.IOERR, 1)


# -- read-only --------------------------------------------------------------------------------


def test_read_only_device_offers_ro_and_answers_writes_with_ioerr(make_disk: DiskFactory) -> None:
    """§5.2.6.2: IOERR for a write if VIRTIO_BLK_F_RO is offered, and no data written."""
    disk = make_disk(readonly=True)
    offered = U64.unpack(disk.fe.call(Request.GET_FEATURES))[0]
    assert offered & (1 << BlkFeature.RO)
    writes = [
        (RequestType.OUT, os.urandom(SECTOR_SIZE)),
        (RequestType.DISCARD, segments((0, 8, 0))),
        (RequestType.WRITE_ZEROES, segments((0, 8, 0))),
    ]
    for type_, out in writes:
        assert run(disk.fe, submit(disk.fe, type_, 0, out=out)) == (Status.IOERR, 1), type_
    assert disk.image() == disk.original
    # Reads still work.
    req = submit(disk.fe, RequestType.IN, 0, in_len=SECTOR_SIZE)
    assert run(disk.fe, req)[0] == Status.OK
    assert disk.fe.memory.read(req.data, SECTOR_SIZE) == disk.original[:SECTOR_SIZE]


# -- malformed requests -----------------------------------------------------------------------


def test_request_without_a_status_byte_is_not_executed(
    disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    fe = disk.fe
    header = fe.put(REQUEST_HEADER.pack(RequestType.OUT, 0, 0))
    data = fe.put(os.urandom(SECTOR_SIZE))
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    head = fe.drivers[0].add(readable=[(header, 16), (data, SECTOR_SIZE)])
    assert fe.kick() == [(head, 0)]
    assert disk.image() == disk.original
    assert fe.backend.device.stats[0].violations == 1
    assert "no writable status byte" in caplog.text


def test_request_with_a_short_header_is_ioerr(disk: Disk) -> None:
    fe = disk.fe
    header = fe.put(bytes(8))
    status = fe.alloc(1)
    head = fe.drivers[0].add(readable=[(header, 8)], writable=[(status, 1)])
    assert fe.kick() == [(head, 1)]
    assert fe.memory.read(status, 1)[0] == Status.IOERR
    assert fe.backend.device.stats[0].violations == 1


def test_second_queue_serves_requests_too(make_disk: DiskFactory) -> None:
    disk = make_disk(queues=2)
    req = submit(disk.fe, RequestType.IN, 7, in_len=SECTOR_SIZE, queue=1)
    assert run(disk.fe, req, queue=1)[0] == Status.OK
    assert (
        disk.fe.memory.read(req.data, SECTOR_SIZE)
        == disk.original[7 * SECTOR_SIZE : 8 * SECTOR_SIZE]
    )
    assert disk.fe.backend.device.stats[1].requests == 1
    assert disk.fe.backend.device.stats[0].requests == 0


def test_block_config_validates_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than 20 bytes"):
        BlockConfig(serial="x" * 21)
    with pytest.raises(ValueError, match="queues"):
        BlockConfig(queues=0)
    with pytest.raises(ValueError, match="multiple of 512"):
        BlockConfig(size=1000)


def test_temporary_image_is_sparse_and_removed_on_close() -> None:
    device = BlockDevice(BlockConfig(size=1 << 20))
    path = device.path
    assert device.capacity == 2048
    assert os.stat(path).st_size == 1 << 20
    device.close()
    assert not path.exists()


def test_image_tail_shorter_than_a_sector_is_not_exposed(
    make_frontend: FrontendFactory, tmp_path: Path
) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * 1000)
    fe = make_frontend(BlockDevice(BlockConfig(image=path)))
    fe.start()
    device = fe.backend.device
    assert isinstance(device, BlockDevice)
    assert device.capacity == 1
    ok = submit(fe, RequestType.IN, 0, in_len=SECTOR_SIZE)
    assert run(fe, ok)[0] == Status.OK
    assert fe.memory.read(ok.data, SECTOR_SIZE) == b"\x11" * SECTOR_SIZE
    assert run(fe, submit(fe, RequestType.IN, 1, in_len=SECTOR_SIZE))[0] == Status.IOERR
