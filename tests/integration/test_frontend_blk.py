"""pyvirtio's front-end and blk driver against pyvirtio's back-end and qemu-storage-daemon.

The same tests run against both: what pyvirtio's driver writes must be on the
image, reads must match, and flush, discard, write-zeroes and get-id must
behave as VIRTIO 1.4 §5.2.6 says.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirtio.errors import BlkError
from pyvirtio.frontend import BlkDriver
from pyvirtio.guestkit.backends import BackendProcess, Daemon
from pyvirtio.spec.blk import Status
from pyvirtio.spec.common import Feature

from .conftest import IMAGE_SIZE, MiB


def _image_bytes(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_config_reports_capacity_and_queues(blk_backend: Daemon) -> None:
    with BlkDriver.open(blk_backend.socket_path) as disk:
        assert disk.info.capacity == IMAGE_SIZE // 512
        assert disk.info.num_queues == 2
        assert len(disk.queues) == 2
        assert disk.info.blk_size == 512


def test_written_data_is_on_the_image_and_reads_back(blk_backend: Daemon, image: Path) -> None:
    data = os.urandom(64 * 1024)
    with BlkDriver.open(blk_backend.socket_path) as disk:
        disk.write(2048, data)
        disk.flush()
        assert disk.read(2048, len(data)) == data
        assert disk.read(2048, len(data), queue=1) == data
    assert _image_bytes(image, 2048 * 512, len(data)) == data


def test_data_written_on_the_host_is_read_by_the_driver(blk_backend: Daemon, image: Path) -> None:
    data = os.urandom(8192)
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(data)
    with BlkDriver.open(blk_backend.socket_path) as disk:
        assert disk.read(5 * MiB // 512, 8192) == data


def test_write_zeroes_zeroes_the_range_only(blk_backend: Daemon, image: Path) -> None:
    data = os.urandom(16 * 1024)
    with BlkDriver.open(blk_backend.socket_path) as disk:
        disk.write(100, data)
        disk.write_zeroes(104, 8)  # bytes 2048..6143 of the written range
        assert disk.read(100, 16 * 1024) == data[:2048] + bytes(4096) + data[6144:]
    assert _image_bytes(image, 100 * 512, 16 * 1024) == data[:2048] + bytes(4096) + data[6144:]


def test_discard_completes_ok_and_leaves_neighbours_intact(
    blk_backend: Daemon, image: Path
) -> None:
    data = os.urandom(3 * MiB)
    with BlkDriver.open(blk_backend.socket_path) as disk:
        for i in range(3):
            disk.write(8192 + i * 2048, data[i * MiB : (i + 1) * MiB])
        disk.discard(8192 + 2048, 2048)  # the middle MiB
        assert disk.read(8192, MiB) == data[:MiB]
        assert disk.read(8192 + 4096, MiB) == data[2 * MiB :]


def test_get_id_answers_a_nul_terminated_string(blk_backend: Daemon) -> None:
    with BlkDriver.open(blk_backend.socket_path) as disk:
        ident = disk.get_id()
    assert ident  # pyvirtio: the --serial; qemu-storage-daemon: its own id
    assert b"\0" not in ident and len(ident) <= 20
    if isinstance(blk_backend, BackendProcess):
        assert ident == b"itest"


def test_read_beyond_capacity_fails_with_ioerr(blk_backend: Daemon) -> None:
    with BlkDriver.open(blk_backend.socket_path) as disk, pytest.raises(BlkError) as info:
        disk.read(IMAGE_SIZE // 512, 4096)
    assert info.value.status == Status.IOERR


def test_unknown_request_type_is_unsupported(blk_backend: Daemon) -> None:
    with BlkDriver.open(blk_backend.socket_path) as disk, pytest.raises(BlkError) as info:
        disk.request(0x55, in_len=512)
    assert info.value.status == Status.UNSUPP


def test_reconnecting_driver_finds_the_data(blk_backend: Daemon) -> None:
    data = os.urandom(4096)
    with BlkDriver.open(blk_backend.socket_path) as disk:
        disk.write(10, data, queue=1)
    with BlkDriver.open(blk_backend.socket_path, queues=1) as disk:
        assert len(disk.queues) == 1
        assert disk.read(10, 4096) == data


def test_packed_ring_driver_reads_and_writes_pyvirtio(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    data = os.urandom(32 * 1024)
    with (
        BackendProcess("blk", tmp_path / "p.sock", ["--image", str(image)]) as backend,
        BlkDriver.open(backend.socket_path, packed=True) as disk,
    ):
        assert disk.frontend.has_feature(Feature.RING_PACKED)
        for i in range(300):  # several laps of the 128-entry ring
            disk.write(i * 64, data[: 512 * (1 + i % 64)])
        disk.write(7, data)
        disk.flush()
        assert disk.read(7, len(data)) == data
    assert _image_bytes(image, 7 * 512, len(data)) == data
