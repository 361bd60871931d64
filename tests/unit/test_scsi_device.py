"""virtio-scsi in-process (VIRTIO 1.4 §5.6): requests, task management with requests in
flight, the event queue and hot-plug, on real image files, rings and worker threads.

A "slow" unit is a real one whose I/O waits on an event before it starts
(:func:`_gate`), which makes completion order and in-flight states deterministic.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.scsi import ScsiDevice, ScsiOptions
from pyvirtio.devices.scsi.entry import SCSI_TYPE, decode_config
from pyvirtio.devices.scsi.lun import Lun
from pyvirtio.devices.scsi.sense import Sense, SenseKey, Status
from pyvirtio.devices.scsi.target import Io
from pyvirtio.spec.scsi import (
    CTRL_AN_REQ,
    CTRL_TMF_REQ,
    EVENT,
    REQ_HEADER,
    RESP_HEADER,
    SENSE_SIZE,
    ControlType,
    Event,
    EventReason,
    Response,
    ScsiFeature,
    TmfSubtype,
    encode_lun,
)
from pyvirtio.testing import DeviceHarness, Used

MiB = 1 << 20
HEAD = RESP_HEADER.size + SENSE_SIZE
CTRL, EVENTQ, REQ = 0, 1, 2


def _image(path: Path, size: int, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(data)
    return path


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    return (_image(tmp_path / "a.img", 4 * MiB, os.urandom(64 * 1024)),
            _image(tmp_path / "b.img", 8 * MiB))


@pytest.fixture
def harness(disks: tuple[Path, Path]) -> Iterator[DeviceHarness]:
    with DeviceHarness(ScsiDevice(ScsiOptions(disks=disks, workers=2))) as h:
        yield h


def _request(lun: int, cdb: bytes, *, tag: int = 1, target: int = 0) -> bytes:
    return REQ_HEADER.pack(encode_lun(target, lun), tag, 0, 0, 0) + cdb.ljust(32, b"\0")


def _response(used: Used) -> tuple[int, int, int, bytes, bytes]:
    """(response, status, residual, sense, data-in) of a used request."""
    sense_len, resid, _qual, status, response = RESP_HEADER.unpack_from(used.data)
    sense = used.data[RESP_HEADER.size : RESP_HEADER.size + sense_len]
    return response, status, resid, sense, used.data[HEAD:]


def _read10(lba: int, blocks: int) -> bytes:
    return bytes((0x28, 0)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def _write10(lba: int, blocks: int) -> bytes:
    return bytes((0x2A, 0)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def _tmf(subtype: TmfSubtype, lun: int, tag: int = 0) -> bytes:
    return CTRL_TMF_REQ.pack(ControlType.TMF, subtype, encode_lun(0, lun), tag)


def _gate(device: object, lun: int) -> threading.Event:
    """Hold LUN ``lun``'s I/O until the returned event is set."""
    assert isinstance(device, ScsiDevice)
    unit: Lun = device.luns[lun]
    gate = threading.Event()
    real = unit.run

    def run(io: Io, views: list[memoryview]) -> int:
        assert gate.wait(30)
        return real(io, views)

    unit.run = run  # type: ignore[method-assign]
    return gate


def test_features_queues_and_config_space(harness: DeviceHarness) -> None:
    device = harness.device
    assert device.has_feature(ScsiFeature.HOTPLUG) and device.has_feature(ScsiFeature.CHANGE)
    assert device.num_queues == 3
    config = decode_config(harness.read_config())
    assert (config["num_queues"], config["sense_size"], config["cdb_size"]) == (1, 96, 32)
    assert (config["max_target"], config["max_lun"], config["event_info_size"]) == (0, 16383, 16)
    assert harness.write_config(20, (96).to_bytes(4, "little"))  # Linux writes the defaults
    assert not harness.write_config(24, (3).to_bytes(4, "little"))


def test_inquiry_answers_in_place_with_the_residual(harness: DeviceHarness) -> None:
    used = harness.request(REQ, _request(0, bytes((0x12, 0, 0, 0, 36))), HEAD + 64)
    response, status, resid, sense, data = _response(used)
    assert (response, status, resid, sense) == (Response.OK, Status.GOOD, 28, b"")
    assert data[8:16] == b"PYVIRTIO" and used.length == HEAD + 36


def test_data_both_ways_reaches_the_image(harness: DeviceHarness, disks: tuple[Path, Path]) -> None:
    payload = os.urandom(4096)
    used = harness.request(REQ, [_request(1, _write10(16, 8)), payload[:1000], payload[1000:]],
                           HEAD)
    assert _response(used)[:3] == (Response.OK, Status.GOOD, 0)
    with open(disks[1], "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == payload
    used = harness.request(REQ, _request(1, _read10(16, 8)), [HEAD, 100, 3996])
    assert _response(used)[4] == payload
    host = disks[0].read_bytes()[:8192]
    assert _response(harness.request(REQ, _request(0, _read10(0, 16)), HEAD + 8192))[4] == host
    stats = harness.device.stats[REQ]
    assert stats.kinds["read"] == 2 and stats.kinds["write"] == 1 and stats.bytes_out == 4096


def test_unmap_punches_a_hole(harness: DeviceHarness, disks: tuple[Path, Path]) -> None:
    with open(disks[1], "r+b") as f:
        f.write(os.urandom(MiB))
    params = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4) \
        + (1024).to_bytes(8, "big") + (512).to_bytes(4, "big") + bytes(4)
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + len(params).to_bytes(2, "big") + b"\0"
    used = harness.request(REQ, _request(1, cdb) + params, HEAD)
    assert _response(used)[:2] == (Response.OK, Status.GOOD)
    fd = os.open(disks[1], os.O_RDONLY)
    try:
        assert os.lseek(fd, 512 * 1024, os.SEEK_HOLE) == 512 * 1024
    finally:
        os.close(fd)


def test_bad_target_missing_lun_overrun_and_short_requests(harness: DeviceHarness) -> None:
    used = harness.request(REQ, _request(0, bytes(6), target=1), HEAD)
    assert _response(used)[0] == Response.BAD_TARGET
    response, status, _, sense, _ = _response(harness.request(REQ, _request(9, bytes(6)), HEAD))
    assert (response, status) == (Response.OK, Status.CHECK_CONDITION)
    assert Sense.parse(sense) == Sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0)
    used = harness.request(REQ, _request(0, _read10(0, 8)), HEAD + 512)
    assert _response(used)[0] == Response.OVERRUN
    assert harness.request(REQ, b"\x01\x00", HEAD).length == HEAD  # header cut short
    assert _response(harness.request(REQ, b"\x01", HEAD))[0] == Response.FAILURE
    assert harness.request(REQ, _request(0, bytes(6)), 10).length == 0  # no room to answer


def test_readonly_disks_refuse_writes_with_write_protected(disks: tuple[Path, Path]) -> None:
    with DeviceHarness(ScsiDevice(ScsiOptions(disks=disks, readonly=True))) as h:
        before = disks[0].read_bytes()
        used = h.request(REQ, _request(0, _write10(0, 1)) + bytes(512), HEAD)
        response, status, _, sense, _ = _response(used)
        assert (response, status) == (Response.OK, Status.CHECK_CONDITION)
        assert Sense.parse(sense) == Sense(SenseKey.DATA_PROTECT, 0x27, 0)
        assert disks[0].read_bytes() == before


def test_abort_task_ends_the_request_in_flight_before_the_tmf_completes(
    harness: DeviceHarness,
) -> None:
    gate = _gate(harness.device, 0)
    head = harness.post(REQ, _request(0, _read10(0, 8), tag=77), HEAD + 4096)
    harness.kick(REQ)
    tmf = harness.post(CTRL, _tmf(TmfSubtype.QUERY_TASK, 0, 77), 1)
    assert harness.kick(CTRL)[0].data == bytes((Response.FUNCTION_SUCCEEDED,))
    tmf = harness.post(CTRL, _tmf(TmfSubtype.ABORT_TASK, 0, 77), 1)
    assert harness.kick(CTRL) == []  # waits for the request it ends
    gate.set()
    used = harness.wait_used(REQ)[0]
    assert used.head == head and _response(used)[0] == Response.ABORTED
    done = harness.wait_used(CTRL)[0]
    assert (done.head, done.data) == (tmf, bytes((Response.OK,)))


def test_lun_reset_ends_every_request_of_the_lun_only_and_leaves_a_unit_attention(
    harness: DeviceHarness,
) -> None:
    gate0 = _gate(harness.device, 0)
    first = harness.post(REQ, _request(0, _read10(0, 8), tag=1), HEAD + 4096)
    second = harness.post(REQ, _request(0, _read10(8, 8), tag=2), HEAD + 4096)
    harness.kick(REQ)
    # LUN 1 is not held up by LUN 0's requests (its own threads).
    other = harness.request(REQ, _request(1, _read10(0, 1), tag=3), HEAD + 512)
    assert _response(other)[:2] == (Response.OK, Status.GOOD)
    tmf = harness.post(CTRL, _tmf(TmfSubtype.LOGICAL_UNIT_RESET, 0), 1)
    assert harness.kick(CTRL) == []
    gate0.set()
    ended = harness.wait_used(REQ, 2)
    assert {u.head for u in ended} == {first, second}
    assert {_response(u)[0] for u in ended} == {Response.RESET}
    assert harness.wait_used(CTRL)[0].head == tmf
    _, status, _, sense, _ = _response(harness.request(REQ, _request(0, bytes(6)), HEAD))
    assert status == Status.CHECK_CONDITION
    assert Sense.parse(sense) == Sense(SenseKey.UNIT_ATTENTION, 0x29, 0)


def test_i_t_nexus_reset_leaves_a_unit_attention_on_every_lun(harness: DeviceHarness) -> None:
    assert harness.request(CTRL, _tmf(TmfSubtype.I_T_NEXUS_RESET, 0), 1).data[0] == Response.OK
    for lun in (0, 1):
        _, status, _, sense, _ = _response(harness.request(REQ, _request(lun, bytes(6)), HEAD))
        assert status == Status.CHECK_CONDITION
        assert Sense.parse(sense) == Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x07)
        # Reported once: the next command goes through.
        _, status, _, _, _ = _response(harness.request(REQ, _request(lun, bytes(6)), HEAD))
        assert status == Status.GOOD


def test_tmfs_without_requests_in_flight_and_on_bad_addresses(harness: DeviceHarness) -> None:
    def tmf(subtype: TmfSubtype, lun: int) -> int:
        return harness.request(CTRL, _tmf(subtype, lun), 1).data[0]

    assert tmf(TmfSubtype.I_T_NEXUS_RESET, 0) == Response.OK
    assert tmf(TmfSubtype.ABORT_TASK_SET, 1) == Response.OK
    assert tmf(TmfSubtype.QUERY_TASK_SET, 1) == Response.OK
    assert tmf(TmfSubtype.CLEAR_ACA, 0) == Response.FUNCTION_REJECTED
    assert tmf(TmfSubtype.ABORT_TASK, 9) == Response.INCORRECT_LUN
    bad = CTRL_TMF_REQ.pack(ControlType.TMF, TmfSubtype.ABORT_TASK, encode_lun(3, 0), 0)
    assert harness.request(CTRL, bad, 1).data[0] == Response.BAD_TARGET
    an = harness.request(CTRL, CTRL_AN_REQ.pack(ControlType.AN_QUERY, encode_lun(0, 0), 0xFF), 5)
    assert an.data == bytes(4) + bytes((Response.OK,))
    assert harness.request(CTRL, b"\x07\0\0\0", 1).length == 0  # unknown type


def test_hot_add_and_remove_are_reported_on_the_event_queue(
    harness: DeviceHarness, tmp_path: Path
) -> None:
    answers: list[dict[str, object]] = []
    command = harness.device.control_commands()["scsi"]
    event_buffer = harness.post(EVENTQ, b"", EVENT.size)
    harness.kick(EVENTQ)
    assert harness.used(EVENTQ) == []  # no event yet: the buffer stays with the driver
    hot = _image(tmp_path / "hot.img", MiB, b"hot data")
    command(["add-lun", str(hot), "ro"], answers.append)
    assert answers[-1]["ok"] is True and answers[-1]["lun"] == 2
    used = harness.used(EVENTQ)[0]
    assert used.head == event_buffer
    assert EVENT.unpack(used.data) == (Event.TRANSPORT_RESET, encode_lun(0, 2),
                                       EventReason.RESCAN)
    data = _response(harness.request(REQ, _request(2, _read10(0, 1)), HEAD + 512))[4]
    assert data[:8] == b"hot data"
    # No buffer posted: the removal waits for one.
    command(["remove-lun", "2"], answers.append)
    assert answers[-1] == {"ok": True, "lun": 2, "notified": True}
    harness.post(EVENTQ, b"", EVENT.size)
    used = harness.kick(EVENTQ)[0]
    assert EVENT.unpack(used.data) == (Event.TRANSPORT_RESET, encode_lun(0, 2),
                                       EventReason.REMOVED)
    _, status, _, sense, _ = _response(harness.request(REQ, _request(2, _read10(0, 1)), HEAD + 512))
    assert status == Status.CHECK_CONDITION and Sense.parse(sense).asc == 0x25  # type: ignore[union-attr]
    command(["remove-lun", "2"], answers.append)
    assert answers[-1]["ok"] is False
    command(["add-lun", str(tmp_path / "missing.img")], answers.append)
    assert answers[-1]["ok"] is False
    command(["list"], answers.append)
    luns = answers[-1]["luns"]
    assert isinstance(luns, list) and [lun["lun"] for lun in luns] == [0, 1]


def test_the_registry_entry_builds_the_device(disks: tuple[Path, Path], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    SCSI_TYPE.add_arguments(parser)
    iso = _image(tmp_path / "cd.iso", 2048 * 10)
    args = parser.parse_args(["--disk", str(disks[0]), "--disk", str(disks[1]), "--cdrom",
                              str(iso), "--queues", "2", "--readonly"])
    device, _ = SCSI_TYPE.factory(args)
    assert isinstance(device, ScsiDevice)
    try:
        assert device.num_queues == 4
        assert [lun.unit.kind for lun in device.luns.values()] == ["disk", "disk", "cdrom"]
        assert all(lun.unit.readonly for lun in device.luns.values())
        assert device.luns[2].unit.blocks == 10
    finally:
        device.close()
    assert SCSI_TYPE.qemu_args("s.sock", "c0")[-1] == "vhost-user-scsi-pci,chardev=c0"


def test_aio_sync_serves_reads_and_writes_in_the_loop(disks: tuple[Path, Path]) -> None:
    with DeviceHarness(ScsiDevice(ScsiOptions(disks=disks, aio="sync"))) as h:
        payload = os.urandom(1024)
        used = h.request(REQ, [_request(0, _write10(2, 2)), payload], HEAD)
        assert _response(used)[:3] == (Response.OK, Status.GOOD, 0)
        assert _response(h.request(REQ, _request(0, _read10(2, 2)), HEAD + 1024))[4] == payload
        with open(disks[0], "rb") as f:
            f.seek(1024)
            assert f.read(1024) == payload
