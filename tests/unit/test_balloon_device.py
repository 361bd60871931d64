"""virtio-balloon (VIRTIO 1.4 §5.5) served in-process by :class:`DeviceHarness`."""

from __future__ import annotations

import os

from pyvirtio.devices.balloon import BalloonDevice, BalloonOptions
from pyvirtio.devices.balloon_type import decode_config
from pyvirtio.spec.balloon import (
    BALLOON_PAGE_SIZE,
    CMD_ID,
    CONFIG,
    PFN,
    STAT,
    BalloonFeature,
    BalloonQueue,
    CmdId,
    StatTag,
    queue_roles,
)
from pyvirtio.testing import DeviceHarness

INFLATEQ, DEFLATEQ, STATSQ, FREE_PAGE_VQ, REPORTING_VQ = range(5)


def _pfns(*pfns: int) -> bytes:
    return b"".join(PFN.pack(p) for p in pfns)


def _last_pages(harness: DeviceHarness, count: int) -> list[int]:
    """PFNs of the last ``count`` pages of the harness's guest RAM (unused by buffers)."""
    region = harness.guest.memory.regions[-1]
    end = region.guest_end // BALLOON_PAGE_SIZE
    return list(range(end - count, end))


def _allocated(harness: DeviceHarness) -> int:
    return sum(os.fstat(fd).st_blocks * 512 for fd in harness.guest.fds)


def test_offers_stats_deflate_on_oom_free_page_hint_and_page_reporting() -> None:
    device = BalloonDevice()
    bits = device.offered_features()
    for bit in (BalloonFeature.STATS_VQ, BalloonFeature.DEFLATE_ON_OOM,
                BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_REPORTING):
        assert bits >> bit & 1
    assert not bits >> BalloonFeature.PAGE_POISON & 1
    no_oom = BalloonDevice(BalloonOptions(deflate_on_oom=False)).offered_features()
    assert not no_oom >> BalloonFeature.DEFLATE_ON_OOM & 1


def test_queues_that_exist_are_numbered_consecutively_by_feature() -> None:
    """§5.5.2: statsq, free_page_vq and reporting_vq exist only with their features."""
    assert queue_roles(1 << BalloonFeature.PAGE_REPORTING) == [
        BalloonQueue.INFLATE, BalloonQueue.DEFLATE, BalloonQueue.REPORTING]
    assert len(queue_roles(0b101110)) == 5


def test_config_space_has_the_target_and_takes_the_drivers_actual() -> None:
    """§5.5.4: num_pages is the device's; the driver writes actual; whole-config writes
    (QEMU's generic device) do not change num_pages."""
    with DeviceHarness(BalloonDevice(BalloonOptions(target=8 << 20))) as harness:
        assert CONFIG.unpack(harness.read_config(0, 16)) == (2048, 0, CmdId.STOP, 0)
        harness.write_config(4, PFN.pack(77))
        harness.write_config(0, CONFIG.pack(5, 99, 3, 0))
        assert CONFIG.unpack(harness.read_config(0, 16)) == (2048, 99, CmdId.STOP, 0)
        assert decode_config(harness.read_config(0, 16))["actual"] == 99


def test_inflated_pages_are_released_on_the_host_and_deflate_takes_them_back() -> None:
    """§5.5.6: PFNs of 4 KiB pages; the pages leave the memfd (MADV_REMOVE)."""
    with DeviceHarness(BalloonDevice()) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        pages = _last_pages(harness, 16)
        memory = harness.guest.memory
        memory.write(pages[0] * BALLOON_PAGE_SIZE, b"\xaa" * 16 * BALLOON_PAGE_SIZE)
        harness.post(INFLATEQ, readable=_pfns(*pages))
        before = _allocated(harness)  # the request itself written
        assert [u.length for u in harness.kick(INFLATEQ)] == [0]
        assert device.inflated == set(pages)
        assert device.released["inflate"] == 16 * BALLOON_PAGE_SIZE
        assert before - _allocated(harness) >= 16 * BALLOON_PAGE_SIZE
        assert memory.read(pages[0] * BALLOON_PAGE_SIZE, 8) == bytes(8)
        harness.request(DEFLATEQ, readable=_pfns(*pages[:4]))
        assert len(device.inflated) == 12
        assert device.stats[INFLATEQ].violations == device.stats[DEFLATEQ].violations == 0


def test_pfns_outside_guest_memory_are_violations_and_the_device_keeps_serving() -> None:
    with DeviceHarness(BalloonDevice()) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        good = _last_pages(harness, 1)[0]
        harness.request(INFLATEQ, readable=_pfns(0, 0xFFFFFFFF, good) + b"\x01\x02")
        assert device.inflated == {good}
        assert device.stats[INFLATEQ].violations == 2  # outside memory, trailing bytes
        harness.request(INFLATEQ, readable=_pfns(good - 1))
        assert device.inflated == {good, good - 1}


def test_stats_buffer_is_held_and_used_when_the_host_asks() -> None:
    """§5.5.6.3: the device keeps the buffer; using it asks the driver for new stats."""
    with DeviceHarness(BalloonDevice()) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        first = STAT.pack(StatTag.MEMFREE, 100 << 20) + STAT.pack(StatTag.MEMTOT, 200 << 20)
        harness.post(STATSQ, readable=first)
        assert harness.kick(STATSQ) == []  # held
        assert device.guest_stats == {"memfree": 100 << 20, "memtot": 200 << 20}
        answers: list[dict[str, object]] = []
        device.control_commands()["balloon"]([], answers.append)
        assert [u.queue for u in harness.used(STATSQ)] == [STATSQ]
        assert answers == []  # waiting for the driver's fresh statistics
        harness.post(STATSQ, readable=STAT.pack(StatTag.MEMFREE, 50 << 20) + STAT.pack(99, 1))
        harness.kick(STATSQ)
        assert len(answers) == 1
        stats = answers[0]["stats"]
        assert isinstance(stats, dict)
        assert stats["memfree"] == 50 << 20 and stats["tag_99"] == 1
        device.control_commands()["balloon"]([], answers.append)
        assert harness.host.advance(5.0) >= 1  # no fresh stats: answered with the last
        assert len(answers) == 2 and answers[1]["ok"] is True


def test_balloon_command_sets_the_target_and_refuses_nonsense() -> None:
    with DeviceHarness(BalloonDevice(BalloonOptions(stats=False))) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        answers: list[dict[str, object]] = []
        device.control_commands()["balloon"]([str(64 << 10)], answers.append)
        assert answers[-1]["target_bytes"] == 64 << 10
        assert CONFIG.unpack(harness.read_config(0, 16))[0] == 16
        device.control_commands()["balloon"](["lots"], answers.append)
        assert answers[-1]["ok"] is False
        device.control_commands()["balloon"]([str(1 << 40)], answers.append)
        assert answers[-1]["ok"] is False and "larger" in str(answers[-1]["error"])


def test_reported_free_pages_are_released_and_used() -> None:
    """§5.5.6.6: the reported pages are the chain's device-writable buffers."""
    with DeviceHarness(BalloonDevice()) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        used = harness.request(REPORTING_VQ, writable=[4 * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE])
        assert used.length == 0
        assert device.stats[REPORTING_VQ].kinds["reported bytes"] == 5 * BALLOON_PAGE_SIZE
        assert device.released["reporting"] >= 3 * BALLOON_PAGE_SIZE  # whole pages
        harness.request(REPORTING_VQ, readable=b"junk")
        assert device.stats[REPORTING_VQ].violations == 1


def test_free_page_hints_count_only_under_the_current_command_id() -> None:
    """§5.5.6.4: hints with a stale command ID are ignored; STOP gets DONE back."""
    with DeviceHarness(BalloonDevice()) as harness:
        device = harness.device
        assert isinstance(device, BalloonDevice)
        harness.request(FREE_PAGE_VQ, writable=[BALLOON_PAGE_SIZE])
        assert device.released["hint"] == 0
        cmd_id = device.start_hinting()
        assert CONFIG.unpack(harness.read_config(0, 16))[2] == cmd_id >= 2
        harness.request(FREE_PAGE_VQ, readable=CMD_ID.pack(cmd_id))
        harness.request(FREE_PAGE_VQ, writable=[2 * BALLOON_PAGE_SIZE])
        assert device.stats[FREE_PAGE_VQ].kinds["hinted bytes"] == 2 * BALLOON_PAGE_SIZE
        harness.request(FREE_PAGE_VQ, readable=CMD_ID.pack(CmdId.STOP))
        assert device.cmd_id == CmdId.DONE
        harness.request(FREE_PAGE_VQ, readable=b"\x01\x02")
        assert device.stats[FREE_PAGE_VQ].violations == 1


def test_packed_rings_serve_the_balloon_too() -> None:
    with DeviceHarness(BalloonDevice(), packed=True) as harness:
        page = _last_pages(harness, 1)[0]
        harness.request(INFLATEQ, readable=[_pfns(page)[:2], _pfns(page)[2:]])
        device = harness.device
        assert isinstance(device, BalloonDevice)
        assert device.inflated == {page}
