"""virtio-blk with ``--aio threads`` and ``--direct``: requests executed by worker
threads, completed out of order (VIRTIO 1.4 §5.2.6, §2.7.8), IN_ORDER kept when
negotiated (§2.7.9), and O_DIRECT with unaligned guest buffers.

Everything is real: image files on a file system that supports O_DIRECT, worker
threads, guest memory and rings (:class:`~pyvirtio.testing.DeviceHarness`).  A
"slow request" is a real one whose worker waits on an event before its I/O
(:class:`GatedDisk`), which makes the completion order deterministic.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import mmap
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.blk import UNALIGNED_KIND, BlockConfig, BlockDevice, _Operation, _Outcome
from pyvirtio.devices.blk_type import BLK_TYPE
from pyvirtio.devices.blkio import DirectAlignment, DirectFile
from pyvirtio.spec.blk import (
    DISCARD_SEGMENT,
    REQUEST_HEADER,
    SECTOR_SIZE,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.testing import (
    NOT_SPLIT_FEATURES,
    DeviceHarness,
    Frontend,
    FrontendFactory,
    InMemoryHost,
    Used,
)
from pyvirtio.virtqueue.chain import DescriptorChain

from .test_blk_device import submit

IMAGE_BYTES = 1 << 20
BLOCK = 4096
GATE_TIMEOUT = 30.0


def _direct_capable(directory: Path) -> bool:
    probe = directory / "o_direct.probe"
    probe.write_bytes(bytes(BLOCK))
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


@pytest.fixture
def image_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system that takes O_DIRECT (tmp_path, else /var/tmp)."""
    if _direct_capable(tmp_path):
        yield tmp_path
        return
    fallback = Path("/var/tmp")
    if not fallback.is_dir() or not _direct_capable(fallback):
        pytest.skip("no file system here supports O_DIRECT")
    folder = fallback / f"pyvirtio-aio-{os.getpid()}-{random.getrandbits(32):08x}"
    folder.mkdir()
    try:
        yield folder
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _image(folder: Path, name: str = "disk.img") -> tuple[Path, bytes]:
    path = folder / name
    data = os.urandom(IMAGE_BYTES)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return path, data


class GatedDisk(BlockDevice):
    """A disk whose worker holds the request for ``gated_sector`` until :attr:`gate`
    opens: a slow request, then the real I/O."""

    def __init__(self, config: BlockConfig, gated_sector: int) -> None:
        super().__init__(config)
        self.gated_sector = gated_sector
        self.gate = threading.Event()
        #: Set when a worker is holding the gated request.
        self.holding = threading.Event()

    def _execute(
        self, queue: int, chain: DescriptorChain, operation: _Operation, sector: int
    ) -> _Outcome:
        worker = threading.current_thread() is not threading.main_thread()
        if sector == self.gated_sector and worker:
            self.holding.set()
            self.gate.wait(GATE_TIMEOUT)
        return super()._execute(queue, chain, operation, sector)


def _config(path: Path, **kwargs: object) -> BlockConfig:
    return BlockConfig(image=path, **kwargs)  # type: ignore[arg-type]


def _read(harness: DeviceHarness, sector: int, length: int = BLOCK, queue: int = 0) -> int:
    header = REQUEST_HEADER.pack(RequestType.IN, 0, sector)
    return harness.post(queue, readable=header, writable=[length, 1])


def _write(harness: DeviceHarness, sector: int, data: bytes, queue: int = 0) -> int:
    header = REQUEST_HEADER.pack(RequestType.OUT, 0, sector)
    return harness.post(queue, readable=[header, data], writable=1)


def _flush(harness: DeviceHarness, queue: int = 0) -> int:
    return harness.post(queue, readable=REQUEST_HEADER.pack(RequestType.FLUSH, 0, 0), writable=1)


def _status(used: Used) -> int:
    """The status byte of a request that wrote all its writable bytes (the harness's
    :attr:`Used.data` holds the first ``length`` of them)."""
    return used.data[-1]


def _run(harness: DeviceHarness, count: int) -> list[Used]:
    """Kick, and wait until ``count`` chains were used (in the order they were)."""
    used = harness.kick()
    return used + harness.wait_used(count=count - len(used))


def _complete(fe: Frontend, count: int) -> dict[int, int]:
    """Kick a bare front-end (:func:`make_frontend`) and run the loop's part until
    ``count`` chains were used; their used lengths by head."""
    used = dict(fe.kick())
    for _ in range(1000):
        if len(used) >= count:
            break
        time.sleep(0.01)
        fe.backend.engine.woken()
        used.update(fe.drivers[0].get_used())
    assert len(used) == count, f"{len(used)} of {count} requests used"
    return used


def _bare(device: BlockDevice, make_frontend: FrontendFactory) -> Frontend:
    """``device`` served to a bare front-end, which places every buffer itself."""
    fe = make_frontend(device)
    device.attach(InMemoryHost(fe.backend))
    fe.start(size=64)
    return fe


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} did not happen")


# -- out-of-order completion ----------------------------------------------------------------


def test_a_slow_request_completes_after_the_ones_taken_after_it(image_dir: Path) -> None:
    path, data = _image(image_dir)
    device = GatedDisk(_config(path, aio="threads", aio_workers=4), gated_sector=0)
    with DeviceHarness(device, queue_size=16) as harness:
        try:
            heads = [_read(harness, sector) for sector in (0, 8, 16, 24)]
            first = harness.kick()  # the workers may finish some already
            first += harness.wait_used(count=3 - len(first))
            assert device.holding.is_set()
        finally:
            device.gate.set()
        last = harness.wait_used(count=1)
    used = first + last
    # The three fast ones in any order among themselves; the held one last.
    assert sorted(u.head for u in first) == sorted(heads[1:])
    assert [u.head for u in last] == [heads[0]]
    sectors = dict(zip(heads, (0, 8, 16, 24), strict=True))
    for u in used:
        sector = sectors[u.head]
        assert _status(u) == Status.OK
        assert u.length == BLOCK + 1
        assert u.data[:BLOCK] == data[sector * SECTOR_SIZE : sector * SECTOR_SIZE + BLOCK]


def test_in_order_negotiated_holds_completions_back_until_the_earlier_ones(
    image_dir: Path,
) -> None:
    path, data = _image(image_dir)
    device = GatedDisk(_config(path, aio="threads", aio_workers=4), gated_sector=0)
    with DeviceHarness(device, queue_size=16, in_order=True) as harness:
        try:
            heads = [_read(harness, sector) for sector in (0, 8, 16, 24)]
            assert harness.kick() == []
            # The three later reads are done (their bytes are counted when the loop
            # takes them back, at a round of it)...
            def counted() -> bool:
                harness.flush()
                return device.stats[0].bytes_in == 3 * BLOCK

            _wait_for(counted, "three reads")
            # ...but VIRTIO 1.4 §2.7.9: with IN_ORDER they are used after the first.
            assert harness.used() == []
        finally:
            device.gate.set()
        used = harness.wait_used(count=4)
    assert [u.head for u in used] == heads
    for u, sector in zip(used, (0, 8, 16, 24), strict=True):
        assert _status(u) == Status.OK
        assert u.data[:BLOCK] == data[sector * SECTOR_SIZE : sector * SECTOR_SIZE + BLOCK]


@pytest.mark.parametrize("direct", [False, True])
def test_concurrent_requests_complete_out_of_order_and_read_the_image(
    image_dir: Path, direct: bool
) -> None:
    """No gate: many requests of mixed sizes in flight; the workers finish them in
    their own order, which differs from the submission order at least once."""
    path, data = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads", aio_workers=8, direct=direct))
    rng = random.Random(11)
    reordered = 0
    with DeviceHarness(device, queue_size=128, buffer_space=4 << 20) as harness:
        for _batch in range(40):
            posted: dict[int, tuple[int, int]] = {}
            order = []
            for i in range(32):
                length = 65536 if i % 2 else BLOCK
                sector = rng.randrange(0, (IMAGE_BYTES - length) // SECTOR_SIZE)
                head = _read(harness, sector, length)
                posted[head] = (sector, length)
                order.append(head)
            used = _run(harness, 32)
            for u in used:
                sector, length = posted[u.head]
                assert _status(u) == Status.OK
                assert u.data[:length] == data[sector * SECTOR_SIZE : sector * SECTOR_SIZE + length]
            if [u.head for u in used] != order:
                reordered += 1
                if reordered >= 2:
                    break
        stats = device.stats[0]
    assert reordered >= 1, "the workers never completed requests out of order"
    assert stats.errors == 0


def test_writes_from_workers_land_in_the_image_and_read_back(image_dir: Path) -> None:
    path, data = _image(image_dir)
    image = bytearray(data)
    device = BlockDevice(_config(path, aio="threads", aio_workers=8))
    blocks = {sector: os.urandom(BLOCK) for sector in range(0, 32 * 8, 8)}
    with DeviceHarness(device, queue_size=128, buffer_space=1 << 20) as harness:
        for sector, block in blocks.items():
            _write(harness, sector, block)
        written = _run(harness, len(blocks))
        assert all(_status(u) == Status.OK and u.length == 1 for u in written)
        _flush(harness)
        assert [_status(u) for u in _run(harness, 1)] == [Status.OK]
        heads = {_read(harness, sector): sector for sector in blocks}
        for u in _run(harness, len(blocks)):
            assert u.length == BLOCK + 1 and _status(u) == Status.OK
            assert u.data[:BLOCK] == blocks[heads[u.head]]
        stats = device.stats[0]
    for sector, block in blocks.items():
        image[sector * SECTOR_SIZE : sector * SECTOR_SIZE + BLOCK] = block
    assert path.read_bytes() == bytes(image)
    assert stats.bytes_out == len(blocks) * BLOCK
    assert stats.bytes_in == len(blocks) * BLOCK
    assert stats.kinds["out"] == len(blocks) and stats.kinds["flush"] == 1
    assert stats.errors == 0


def test_requests_without_io_are_answered_at_once_in_threads_mode(
    image_dir: Path, make_frontend: FrontendFactory
) -> None:
    path, _ = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads", serial="aio-serial"))
    fe = _bare(device, make_frontend)
    get_id = submit(fe, RequestType.GET_ID, in_len=20)
    beyond = submit(fe, RequestType.IN, IMAGE_BYTES // SECTOR_SIZE, in_len=BLOCK)
    unsupported = submit(fe, 99)
    used = dict(fe.kick())  # no waiting: all used in the drain
    assert used == {get_id.head: 21, beyond.head: 1, unsupported.head: 1}
    assert fe.memory.read(get_id.data, 10) == b"aio-serial"
    statuses = [fe.memory.read(p.status, 1)[0] for p in (get_id, beyond, unsupported)]
    assert statuses == [Status.OK, Status.IOERR, Status.UNSUPP]


def test_discard_and_write_zeroes_run_in_the_workers_too(image_dir: Path) -> None:
    path, data = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads"))
    with DeviceHarness(device) as harness:
        for type_, sector in ((RequestType.WRITE_ZEROES, 64), (RequestType.DISCARD, 128)):
            segment = DISCARD_SEGMENT.pack(sector, 16, 0)
            harness.post(0, readable=[REQUEST_HEADER.pack(type_, 0, 0), segment], writable=1)
        used = _run(harness, 2)
        stats = device.stats[0]
    assert [_status(u) for u in used] == [Status.OK, Status.OK]
    assert stats.kinds["write_zeroes"] == stats.kinds["discard"] == 1
    image = path.read_bytes()
    assert image[64 * SECTOR_SIZE : 80 * SECTOR_SIZE] == bytes(16 * SECTOR_SIZE)
    assert image[128 * SECTOR_SIZE : 144 * SECTOR_SIZE] == bytes(16 * SECTOR_SIZE)
    assert image[80 * SECTOR_SIZE : 128 * SECTOR_SIZE] == data[80 * SECTOR_SIZE : 128 * SECTOR_SIZE]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aio", ["sync", "threads"])
def test_a_failing_image_fd_answers_ioerr_and_nothing_escapes(
    image_dir: Path, make_frontend: FrontendFactory, aio: str
) -> None:
    """An image descriptor that fails every I/O (an O_PATH fd put in its place):
    reads, writes and flushes get VIRTIO_BLK_S_IOERR (§5.2.6), counted as errors,
    the same in both modes."""
    path, _ = _image(image_dir)
    device = BlockDevice(_config(path, aio=aio))
    broken = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        os.dup2(broken, device.fd)
    finally:
        os.close(broken)
    fe = _bare(device, make_frontend)
    requests = [
        submit(fe, RequestType.IN, 0, in_len=BLOCK),
        submit(fe, RequestType.OUT, 8, out=os.urandom(BLOCK)),
        submit(fe, RequestType.FLUSH),
    ]
    used = _complete(fe, 3)
    assert [fe.memory.read(p.status, 1)[0] for p in requests] == [Status.IOERR] * 3
    assert [used[p.head] for p in requests] == [1, 1, 1]  # only the status byte
    stats = device.stats[0]
    assert stats.errors == 3
    assert stats.bytes_in == stats.bytes_out == 0


# -- a ring stop with requests in flight ---------------------------------------------------


def test_get_vring_base_returns_only_after_the_requests_in_flight_completed(
    image_dir: Path,
) -> None:
    path, data = _image(image_dir)
    device = GatedDisk(_config(path, aio="threads", aio_workers=2), gated_sector=0)
    released: list[bool] = []
    with DeviceHarness(device, queue_size=16) as harness:
        heads = [_read(harness, 0), _read(harness, 8)]
        early = harness.kick()  # the read of sector 8 may be used already
        assert device.holding.wait(GATE_TIMEOUT)

        def release() -> None:
            released.append(True)
            device.gate.set()

        opener = threading.Timer(0.2, release)
        opener.start()
        try:
            harness.stop_queue(0)  # GET_VRING_BASE: waits for both requests
            stopped_after_release = bool(released)
        finally:
            opener.cancel()
            device.gate.set()
        used = {u.head: u for u in early + harness.used()}
    assert stopped_after_release
    assert sorted(used) == sorted(heads)
    assert _status(used[heads[0]]) == Status.OK
    assert used[heads[0]].data[:BLOCK] == data[:BLOCK]


def test_close_finishes_requests_the_workers_hold(image_dir: Path) -> None:
    path, _ = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads", aio_workers=2))
    block = os.urandom(BLOCK)
    with DeviceHarness(device) as harness:
        _write(harness, 16, block)
        harness.kick()
    # The harness closed: the ring stopped (the write was waited for), the pool and
    # the image were closed; the data is in the file.
    assert device.workers is None
    assert _read_file(path, 16 * SECTOR_SIZE, BLOCK) == block


def _read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- O_DIRECT -------------------------------------------------------------------------------


def test_direct_opens_the_image_with_o_direct(image_dir: Path) -> None:
    path, _ = _image(image_dir)
    device = BlockDevice(_config(path, direct=True))
    try:
        assert fcntl.fcntl(device.fd, fcntl.F_GETFL) & os.O_DIRECT
        assert device.direct is not None
        alignment = device.direct.alignment
        assert alignment.offset >= SECTOR_SIZE and alignment.offset % SECTOR_SIZE == 0
        assert alignment.memory >= 1
    finally:
        device.close()


@pytest.mark.parametrize("aio", ["sync", "threads"])
def test_unaligned_guest_buffers_with_direct_are_correct_and_counted(
    image_dir: Path, aio: str
) -> None:
    """The harness's buffers sit 16 bytes past a 512-byte boundary: direct I/O cannot
    take them, so they go through an aligned bounce buffer, and are counted."""
    path, data = _image(image_dir)
    image = bytearray(data)
    device = BlockDevice(_config(path, aio=aio, direct=True))
    block = os.urandom(2 * BLOCK)
    with DeviceHarness(device, queue_size=16) as harness:
        w = _write(harness, 40, block)
        assert [(u.head, _status(u)) for u in _run(harness, 1)] == [(w, Status.OK)]
        r = _read(harness, 40, 2 * BLOCK)
        r2 = _read(harness, 1, 1024)  # one sector in, not page-sized
        used = {u.head: u for u in _run(harness, 2)}
        stats = device.stats[0]
    assert used[r].data[: 2 * BLOCK] == block and _status(used[r]) == Status.OK
    assert used[r2].data[:1024] == data[512 : 512 + 1024] and _status(used[r2]) == Status.OK
    image[40 * SECTOR_SIZE : 40 * SECTOR_SIZE + 2 * BLOCK] = block
    assert path.read_bytes() == bytes(image)
    assert stats.kinds[UNALIGNED_KIND] == 3
    assert stats.errors == 0


def _aligned(fe: Frontend, length: int, align: int = BLOCK) -> int:
    gpa = fe.alloc(length + align)
    return (gpa + align - 1) & ~(align - 1)


def test_aligned_guest_buffers_go_straight_to_the_o_direct_image(
    image_dir: Path, make_frontend: FrontendFactory
) -> None:
    path, data = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads", direct=True))
    fe = _bare(device, make_frontend)
    header = fe.put(REQUEST_HEADER.pack(RequestType.IN, 0, 64))
    buf = _aligned(fe, 2 * BLOCK)
    status = fe.alloc(1)
    head = fe.drivers[0].add([(header, 16)], [(buf, BLOCK), (buf + BLOCK, BLOCK), (status, 1)])
    assert _complete(fe, 1) == {head: 2 * BLOCK + 1}
    assert fe.memory.read(status, 1)[0] == Status.OK
    assert fe.memory.read(buf, 2 * BLOCK) == data[64 * SECTOR_SIZE : 64 * SECTOR_SIZE + 2 * BLOCK]
    assert UNALIGNED_KIND not in device.stats[0].kinds


def test_offsets_not_aligned_for_the_device_go_through_the_page_cache(image_dir: Path) -> None:
    """Where direct I/O needs more than 512 bytes (a 4Kn disk), a one-sector request
    cannot be bounced: it goes through the buffered descriptor of the same file."""
    path, data = _image(image_dir)
    direct = DirectFile(path, os.O_RDWR)
    try:
        direct.alignment = DirectAlignment(BLOCK, BLOCK, "test")
        into = bytearray(SECTOR_SIZE)
        done, unaligned = direct.transfer([memoryview(into)], 3 * SECTOR_SIZE, write=False)
        assert (done, unaligned) == (SECTOR_SIZE, True)
        assert bytes(into) == data[3 * SECTOR_SIZE : 4 * SECTOR_SIZE]
        new = os.urandom(SECTOR_SIZE)
        assert direct.transfer([memoryview(new)], 5 * SECTOR_SIZE, write=True) == (
            SECTOR_SIZE, True)
        os.fdatasync(direct.fd)
    finally:
        direct.close()
    assert _read_file(path, 5 * SECTOR_SIZE, SECTOR_SIZE) == new


def test_direct_alignment_checks_offset_length_and_every_buffer() -> None:
    alignment = DirectAlignment(512, 512, "test")
    with mmap.mmap(-1, 3 * BLOCK) as buf:
        view = memoryview(buf)
        try:
            assert alignment.fits([view[:BLOCK]], 0, BLOCK)
            assert alignment.fits([view[:512], view[BLOCK : BLOCK + 512]], 512, 1024)
            assert not alignment.fits([view[:BLOCK]], 256, BLOCK)  # offset
            assert not alignment.fits([view[16 : 16 + BLOCK]], 0, BLOCK)  # address
            assert not alignment.fits([view[:256], view[256:768]], 0, 768)  # lengths
            assert not alignment.fits([view[:BLOCK].toreadonly()], 0, BLOCK)
        finally:
            view.release()


def test_direct_on_a_file_system_without_o_direct_fails_at_start_up() -> None:
    """procfs refuses O_DIRECT on every kernel (tmpfs did before Linux 6.6)."""
    with pytest.raises(OSError) as info:
        BlockDevice(BlockConfig(image=Path("/proc/version"), readonly=True, direct=True))
    assert info.value.errno == errno.EINVAL
    assert "does not support O_DIRECT" in str(info.value)
    assert "/proc/version" in str(info.value)


# -- configuration ---------------------------------------------------------------------------


def test_block_config_validates_the_aio_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aio must be one of sync, threads"):
        BlockConfig(aio="uring")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aio_workers"):
        BlockConfig(aio="threads", aio_workers=0)


def test_serve_options_reach_the_device(image_dir: Path) -> None:
    path, _ = _image(image_dir)
    parser = argparse.ArgumentParser()
    BLK_TYPE.add_arguments(parser)
    args = parser.parse_args(["--image", str(path), "--aio", "threads", "--aio-workers", "3",
                              "--direct"])
    device, _options = BLK_TYPE.factory(args)
    try:
        assert isinstance(device, BlockDevice)
        assert device.config.aio == "threads" and device.config.direct
        assert device.workers is not None and device.workers.workers == 3
    finally:
        device.close()
    defaults = parser.parse_args(["--image", str(path)])
    assert (defaults.aio, defaults.direct) == ("sync", False)


def test_sync_mode_executes_requests_in_the_drain(image_dir: Path) -> None:
    """The default: every request runs in handle_chain, nothing is deferred."""
    path, data = _image(image_dir)
    device = BlockDevice(_config(path))
    with DeviceHarness(device) as harness:
        head = _read(harness, 2)
        used = harness.kick()  # used in the drain: no waiting
    assert [u.head for u in used] == [head]
    assert used[0].data[:BLOCK] == data[1024 : 1024 + BLOCK]
    assert device.workers is None


def test_flush_feature_still_gates_flush_requests_in_threads_mode(image_dir: Path) -> None:
    path, _ = _image(image_dir)
    device = BlockDevice(_config(path, aio="threads"))
    offered = device.offered_features()
    features = offered & ~NOT_SPLIT_FEATURES & ~(1 << BlkFeature.FLUSH)
    with DeviceHarness(device, features=features) as harness:
        head = _flush(harness)
        used = harness.kick()
    assert [(u.head, _status(u)) for u in used] == [(head, Status.UNSUPP)]
