"""The vhost-user back-end state machine, driven in-process with Message objects
(vhost-user.rst: handshake, REPLY_ACK, memory table, ring set-up, ring states)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import (
    BadMemoryRegion,
    BadPayloadSize,
    BadRingState,
    MissingFds,
    UnknownRequest,
    VhostUserError,
)
from pyvirtio.memory import RegionSpec, create_memfd
from pyvirtio.spec.blk import CONFIG_SIZE, BlkFeature
from pyvirtio.spec.common import DeviceId, DeviceStatus, Feature
from pyvirtio.spec.virtqueue import DESC, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    QEMU_PROTOCOL_FEATURES,
    USER_BASE,
    Frontend,
    FrontendFactory,
    parse_reply,
    ring_addresses,
)
from pyvirtio.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES
from pyvirtio.vhost_user.memtable import MAX_MEM_SLOTS
from pyvirtio.vhost_user.protocol import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_NOFD_MASK,
    VRING_STATE,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_config,
    encode_mem_table,
    encode_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.split import SplitQueue

REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * 1024))
    return path


@pytest.fixture
def rng_frontend(make_frontend: FrontendFactory) -> Frontend:
    return make_frontend(RngDevice())


def fill_request(fe: Frontend, queue: int = 0, length: int = 16) -> tuple[int, int]:
    """Post one device-writable buffer on ``queue``; return (head, gpa)."""
    gpa = fe.alloc(length)
    fe.memory.write(gpa, b"\xaa" * length)
    return fe.drivers[queue].add(writable=[(gpa, length)]), gpa


def u64_of(payload: bytes) -> int:
    value: int = U64.unpack(payload)[0]
    return value


# -- the handshake ----------------------------------------------------------------------------


def test_full_handshake_with_reply_ack_then_requests_are_served(
    make_frontend: FrontendFactory, image: Path
) -> None:
    fe = make_frontend(BlockDevice(BlockConfig(image=image)))
    backend = fe.backend

    offered = u64_of(fe.call(Request.GET_FEATURES))
    assert offered & VHOST_USER_F_PROTOCOL_FEATURES
    assert offered & (1 << Feature.VERSION_1)
    # blk requests can be re-executed, so it also offers inflight tracking.
    assert u64_of(fe.call(Request.GET_PROTOCOL_FEATURES)) == DEFAULT_PROTOCOL_FEATURES | (
        1 << ProtocolFeature.INFLIGHT_SHMFD
    ) | (1 << ProtocolFeature.BACKEND_REQ)
    assert fe.send(Request.SET_PROTOCOL_FEATURES, encode_u64(QEMU_PROTOCOL_FEATURES)) is None
    # From here on every NEED_REPLY request gets a REPLY_ACK, 0 meaning success.
    assert fe.ack(Request.SET_OWNER) == 0
    features = offered & ~(1 << Feature.EVENT_IDX) & ~NOT_SPLIT_FEATURES
    assert fe.ack(Request.SET_FEATURES, encode_u64(features)) == 0
    fe.features = features
    assert u64_of(fe.call(Request.GET_QUEUE_NUM)) == 1
    assert (
        fe.ack(Request.SET_MEM_TABLE, encode_mem_table(fe.guest.specs), [os.dup(fe.guest.fds[0])])
        == 0
    )

    addrs = ring_addresses(FRONTEND_GPA + 0x1000, 32)
    driver = DriverSplitQueue(fe.memory, 32, addrs)
    fe.drivers[0] = driver
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.kick_fds[0], fe.call_fds[0] = kick, call
    assert fe.ack(Request.SET_VRING_NUM, encode_vring_state(0, 32)) == 0
    assert fe.ack(Request.SET_VRING_BASE, encode_vring_state(0, 0)) == 0
    assert fe.ack(Request.SET_VRING_ADDR, encode_vring_addr(fe.vring_addr(0, addrs))) == 0
    assert fe.ack(Request.SET_VRING_CALL, encode_u64(0), [os.dup(call)]) == 0
    assert fe.ack(Request.SET_VRING_KICK, encode_u64(0), [os.dup(kick)]) == 0
    assert fe.ack(Request.SET_VRING_ENABLE, encode_vring_state(0, 1)) == 0

    assert backend.owner
    assert backend.features == features
    assert backend.device.features == features & ~VHOST_USER_F_PROTOCOL_FEATURES
    assert backend.protocol_features == QEMU_PROTOCOL_FEATURES
    assert [(r.guest_addr, r.size, r.user_addr) for r in backend.memory.regions] == [
        (FRONTEND_GPA, FRONTEND_RAM, USER_BASE)
    ]
    vring = backend.vrings[0]
    assert vring.started and vring.enabled
    # The ring addresses were user addresses; the (split) queue works on GPAs.
    assert isinstance(vring.queue, SplitQueue)
    assert (vring.queue.addrs.desc, vring.queue.addrs.avail, vring.queue.addrs.used) == (
        addrs.desc,
        addrs.avail,
        addrs.used,
    )

    # A GET_ID request goes through the whole stack.
    header = fe.put((8).to_bytes(4, "little") + bytes(12))
    ident = fe.alloc(21)
    head = driver.add(readable=[(header, 16)], writable=[(ident, 21)])
    assert fe.kick() == [(head, 21)]
    assert fe.memory.read(ident, 21) == b"pyvirtio".ljust(20, b"\0") + b"\0"
    assert fe.calls() == 1


def test_without_reply_ack_need_reply_requests_get_no_ack(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.negotiate(protocol_features=0)
    assert fe.send(Request.SET_OWNER, need_reply=True) is None
    assert (
        fe.send(
            Request.SET_MEM_TABLE,
            encode_mem_table(fe.guest.specs),
            [os.dup(fe.guest.fds[0])],
            need_reply=True,
        )
        is None
    )
    assert len(fe.backend.memory) == 1


def test_requests_with_a_reply_answer_once_even_with_need_reply(rng_frontend: Frontend) -> None:
    """REPLY_ACK: a request that has its own reply sends that reply, not an extra ack."""
    fe = rng_frontend
    fe.negotiate()
    reply = fe.send(Request.GET_QUEUE_NUM, need_reply=True)
    assert u64_of(parse_reply(reply, Request.GET_QUEUE_NUM)) == 1


def test_get_features_offers_version_1_ring_features_and_protocol_features(
    rng_frontend: Frontend,
) -> None:
    offered = u64_of(rng_frontend.call(Request.GET_FEATURES))
    required = (
        (1 << Feature.VERSION_1)
        | (1 << Feature.INDIRECT_DESC)
        | (1 << Feature.EVENT_IDX)
        | VHOST_USER_F_PROTOCOL_FEATURES
    )
    assert offered & required == required
    assert offered & 0xFF_FFFF == 0  # virtio-rng has no device-specific feature bits (0-23)


def test_without_packed_rings_ring_packed_is_neither_offered_nor_accepted(
    rng_frontend: Frontend,
) -> None:
    """``serve --no-packed``: every front-end uses split rings (VIRTIO 1.4 §2.7)."""
    packed = 1 << Feature.RING_PACKED
    assert u64_of(rng_frontend.call(Request.GET_FEATURES)) & packed
    rng_frontend.backend.packed_rings = False
    offered = u64_of(rng_frontend.call(Request.GET_FEATURES))
    assert not offered & packed
    assert offered & (1 << Feature.EVENT_IDX)
    with pytest.raises(VhostUserError, match="were not offered"):
        rng_frontend.send(Request.SET_FEATURES, encode_u64((1 << Feature.VERSION_1) | packed))


@pytest.mark.parametrize("bit", [Feature.NOTIFICATION_DATA, 55, 0])
def test_setting_features_that_were_not_offered_is_refused(
    rng_frontend: Frontend, bit: int
) -> None:
    assert not u64_of(rng_frontend.call(Request.GET_FEATURES)) >> bit & 1
    with pytest.raises(VhostUserError, match="were not offered") as info:
        rng_frontend.send(Request.SET_FEATURES, encode_u64(1 << bit))
    assert info.value.request == "SET_FEATURES"
    assert rng_frontend.backend.features == 0


def test_setting_protocol_features_that_were_not_offered_is_refused(rng_frontend: Frontend) -> None:
    with pytest.raises(VhostUserError, match="not offered"):
        rng_frontend.send(
            Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.INBAND_NOTIFICATIONS)
        )
    assert rng_frontend.backend.protocol_features == 0


def test_get_max_mem_slots_reports_the_slot_count(rng_frontend: Frontend) -> None:
    assert u64_of(rng_frontend.call(Request.GET_MAX_MEM_SLOTS)) == MAX_MEM_SLOTS


# -- ring states ------------------------------------------------------------------------------


def test_rings_start_enabled_when_protocol_features_are_not_negotiated(
    rng_frontend: Frontend,
) -> None:
    """vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled."""
    fe = rng_frontend
    fe.negotiate(features=1 << Feature.VERSION_1)
    fe.set_mem_table()
    fe.setup_queue(0)
    assert fe.backend.vrings[0].enabled
    head, _gpa = fill_request(fe)
    assert fe.kick() == [(head, 16)]


def test_started_but_disabled_ring_waits_for_set_vring_enable(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.negotiate()
    fe.set_mem_table()
    fe.setup_queue(0, enable=False)
    head, _gpa = fill_request(fe)
    assert fe.kick() == []
    fe.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 1))
    # Enabling a started ring processes what is already available.
    assert fe.drivers[0].get_used() == [(head, 16)]
    fe.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 0))
    fill_request(fe)
    assert fe.kick() == []


def test_call_eventfd_is_signalled_once_per_batch(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    heads = [fill_request(fe)[0] for _ in range(5)]
    used = fe.kick()
    assert [h for h, _ in used] == heads
    assert fe.calls() == 1
    fe.backend.kick(0)  # nothing new: no call
    assert fe.calls() == 0
    fill_request(fe)
    fe.kick()
    assert fe.calls() == 1


def test_call_eventfd_follows_used_event_with_event_idx(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()  # everything offered, EVENT_IDX included
    driver = fe.drivers[0]
    assert driver.event_idx
    for _ in range(3):
        fill_request(fe)
    fe.backend.kick(0)
    assert fe.calls() == 1  # used idx 0 -> 3 passed used_event 0
    driver.set_used_event(10)
    fill_request(fe)
    fe.backend.kick(0)
    assert fe.calls() == 0  # used idx 4 has not passed 10
    driver.set_used_event(4)
    fill_request(fe)
    fe.backend.kick(0)
    assert fe.calls() == 1  # used idx 5 passed 4


def test_get_vring_base_returns_the_next_avail_index_and_stops_the_ring(
    rng_frontend: Frontend,
) -> None:
    fe = rng_frontend
    fe.start()
    for _ in range(3):
        fill_request(fe)
    assert len(fe.kick()) == 3
    state = fe.call(Request.GET_VRING_BASE, encode_vring_state(0, 0))
    assert VRING_STATE.unpack(state) == (0, 3)
    vring = fe.backend.vrings[0]
    assert not vring.started
    assert vring.queue is None
    # A stopped ring is not processed, kick or not.
    head, _gpa = fill_request(fe)
    assert fe.kick() == []
    # The front-end restarts it where it stopped: base, then a new kick fd.
    fe.send(Request.SET_VRING_BASE, encode_vring_state(0, 3))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.send(Request.SET_VRING_KICK, encode_u64(0), [os.dup(kick)])
    finally:
        os.close(kick)
    assert fe.drivers[0].get_used() == [(head, 16)]


def test_ring_set_up_at_a_base_near_the_16_bit_wrap_serves_across_it(
    rng_frontend: Frontend,
) -> None:
    fe = rng_frontend
    fe.negotiate()
    fe.set_mem_table()
    driver = fe.setup_queue(0, size=4, base=0xFFFE)
    heads = [fill_request(fe)[0] for _ in range(4)]
    assert [h for h, _ in fe.kick()] == heads
    assert driver.used_idx() == 2
    state = fe.call(Request.GET_VRING_BASE, encode_vring_state(0, 0))
    assert VRING_STATE.unpack(state) == (0, 2)


def test_reset_device_stops_rings_and_forgets_features(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    fe.send(Request.RESET_DEVICE)
    backend = fe.backend
    assert backend.features == 0
    assert backend.device.features == 0
    assert all(not v.started and not v.enabled and v.base == 0 for v in backend.vrings)
    fill_request(fe)
    assert fe.kick() == []


def test_reset_owner_behaves_like_reset_device(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    fe.send(Request.RESET_OWNER)
    assert fe.backend.features == 0
    assert not fe.backend.vrings[0].started
    fill_request(fe)
    assert fe.kick() == []


def test_disconnect_forgets_everything_the_front_end_set_up(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    fill_request(fe)
    fe.kick()
    backend = fe.backend
    assert backend.device.stats[0].requests == 1
    backend.disconnect()
    assert len(backend.memory) == 0
    assert (backend.features, backend.protocol_features, backend.owner) == (0, 0, False)
    vring = backend.vrings[0]
    assert (vring.size, vring.addr, vring.kick_fd, vring.call_fd, vring.queue) == (
        0,
        None,
        None,
        None,
        None,
    )
    assert not vring.enabled
    assert backend.device.stats[0].requests == 0  # counters are per connection
    # A new front-end can set everything up again from scratch.
    fe.start()
    head, _gpa = fill_request(fe)
    assert fe.kick() == [(head, 16)]


# -- memory table -----------------------------------------------------------------------------


def test_set_mem_table_without_its_fds_is_missing_fds(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.negotiate()
    with pytest.raises(MissingFds, match="needs 1 fds, got 0") as info:
        fe.send(Request.SET_MEM_TABLE, encode_mem_table(fe.guest.specs), need_reply=True)
    assert info.value.request == "SET_MEM_TABLE"
    # With REPLY_ACK the failure is acknowledged before the connection drops.
    assert u64_of(parse_reply(fe.last_reply.data, Request.SET_MEM_TABLE)) == 1
    assert len(fe.backend.memory) == 0


def test_set_mem_table_with_fewer_fds_than_regions_closes_the_ones_sent(
    rng_frontend: Frontend,
) -> None:
    fe = rng_frontend
    specs = [RegionSpec(0, 0x1000, USER_BASE, 0), RegionSpec(0x1000, 0x1000, USER_BASE + 0x1000, 0)]
    fd = os.dup(fe.guest.fds[0])
    with pytest.raises(MissingFds):
        fe.send(Request.SET_MEM_TABLE, encode_mem_table(specs), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)


def test_set_mem_table_with_overlapping_regions_is_refused_and_keeps_the_old_table(
    rng_frontend: Frontend,
) -> None:
    fe = rng_frontend
    fe.start()
    specs = [
        RegionSpec(0, 0x2000, 1 << 45, 0),
        RegionSpec(0x1000, 0x2000, 1 << 46, 0),  # overlaps the first in guest space
    ]
    fds = [create_memfd(0x3000), create_memfd(0x3000)]
    with pytest.raises(BadMemoryRegion, match="overlaps"):
        fe.send(Request.SET_MEM_TABLE, encode_mem_table(specs), fds, need_reply=True)
    assert u64_of(parse_reply(fe.last_reply.data, Request.SET_MEM_TABLE)) == 1
    for fd in fds:  # the back-end owned and closed them
        with pytest.raises(OSError):
            os.fstat(fd)
    assert [r.guest_addr for r in fe.backend.memory.regions] == [FRONTEND_GPA]
    head, _gpa = fill_request(fe)
    assert fe.kick() == [(head, 16)]


def test_set_mem_table_again_re_translates_running_rings(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    queue_before = fe.backend.vrings[0].queue
    generation = fe.backend.memory.generation
    fe.set_mem_table()  # e.g. QEMU resends the table after memory hotplug
    assert fe.backend.memory.generation != generation
    assert fe.backend.vrings[0].queue is not queue_before
    head, gpa = fill_request(fe)
    assert fe.kick() == [(head, 16)]
    assert fe.memory.read(gpa, 16) != b"\xaa" * 16


def test_memory_table_without_the_ring_pauses_the_ring(
    rng_frontend: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    fe = rng_frontend
    fe.start()
    fill_request(fe)
    other = create_memfd(0x1000)
    caplog.set_level(logging.WARNING, logger="pyvirtio")
    fe.send(Request.SET_MEM_TABLE, encode_mem_table([RegionSpec(0, 0x1000, 1 << 45, 0)]), [other])
    assert fe.backend.vrings[0].queue is None
    assert "queue 0 paused" in caplog.text
    fe.backend.kick(0)  # must not touch unmapped memory
    assert fe.drivers[0].get_used() == []


def test_add_and_remove_memory_regions(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    spec = RegionSpec(0x4000_0000, 0x1000, 1 << 45, 0)
    fe.send(Request.ADD_MEM_REG, encode_region(spec), [create_memfd(0x1000)])
    assert [r.guest_addr for r in fe.backend.memory.regions] == [0x4000_0000, FRONTEND_GPA]
    fe.send(Request.REM_MEM_REG, encode_region(spec))
    assert [r.guest_addr for r in fe.backend.memory.regions] == [FRONTEND_GPA]
    with pytest.raises(BadMemoryRegion, match="to remove"):
        fe.send(Request.REM_MEM_REG, encode_region(spec))
    with pytest.raises(MissingFds):
        fe.send(Request.ADD_MEM_REG, encode_region(spec))
    # The ring survived the changes.
    head, _gpa = fill_request(fe)
    assert fe.kick() == [(head, 16)]


# -- ring set-up errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("desc_user_addr", USER_BASE + FRONTEND_RAM - 0x10, "descriptor table"),
        ("avail_user_addr", 0x1000, "available ring"),  # a GPA-looking, unmapped address
        ("used_user_addr", USER_BASE + FRONTEND_RAM, "used ring"),
        ("desc_user_addr", USER_BASE + 0x1008, "not 16-byte aligned"),
        ("used_user_addr", USER_BASE + 0x3002, "not 4-byte aligned"),
    ],
)
def test_ring_address_outside_memory_or_misaligned_is_bad_ring_state(
    rng_frontend: Frontend, field: str, value: int, message: str
) -> None:
    fe = rng_frontend
    fe.negotiate()
    fe.set_mem_table()
    addrs = ring_addresses(FRONTEND_GPA + 0x1000, 16)
    good = fe.vring_addr(0, addrs)
    bad = VringAddr(**{**{f: getattr(good, f) for f in good.__slots__}, field: value})
    fe.send(Request.SET_VRING_NUM, encode_vring_state(0, 16))
    fe.send(Request.SET_VRING_ADDR, encode_vring_addr(bad))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    with pytest.raises(BadRingState, match=message) as info:
        fe.send(Request.SET_VRING_KICK, encode_u64(0), [kick])
    assert info.value.request == "SET_VRING_KICK"
    assert str(info.value).startswith("SET_VRING_KICK: ")
    assert not fe.backend.vrings[0].started
    with pytest.raises(OSError):
        os.fstat(kick)  # the back-end closed the kick fd it could not use


def test_kick_before_size_and_addresses_is_bad_ring_state(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.negotiate()
    with pytest.raises(BadRingState, match="before its size and addresses"):
        fe.send(Request.SET_VRING_KICK, encode_u64(0), [os.eventfd(0, os.EFD_CLOEXEC)])


@pytest.mark.parametrize(
    ("request_code", "payload"),
    [
        (Request.SET_VRING_NUM, encode_vring_state(1, 16)),
        (Request.SET_VRING_BASE, encode_vring_state(5, 0)),
        (Request.GET_VRING_BASE, encode_vring_state(1, 0)),
        (Request.SET_VRING_ENABLE, encode_vring_state(0xFFFF_FFFF, 1)),
        (Request.SET_VRING_ADDR, encode_vring_addr(VringAddr(1, 0, 0, 0, 0, 0))),
        (Request.SET_VRING_CALL, encode_u64(1 | VRING_NOFD_MASK)),
        (Request.SET_VRING_ERR, encode_u64(7 | VRING_NOFD_MASK)),
    ],
)
def test_queue_index_beyond_the_device_queues_is_bad_ring_state(
    rng_frontend: Frontend, request_code: Request, payload: bytes
) -> None:
    with pytest.raises(BadRingState, match="does not exist") as info:
        rng_frontend.send(request_code, payload)
    assert info.value.request == request_code.name


@pytest.mark.parametrize("size", [0, 3, 2048, 65536])
def test_queue_size_not_a_power_of_two_or_above_the_device_maximum_is_refused(
    rng_frontend: Frontend, size: int
) -> None:
    with pytest.raises(BadRingState):
        rng_frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, size))
    assert rng_frontend.backend.vrings[0].size == 0


def test_vring_base_beyond_16_bits_is_refused(rng_frontend: Frontend) -> None:
    with pytest.raises(BadRingState, match="exceeds 16 bits"):
        rng_frontend.send(Request.SET_VRING_BASE, encode_vring_state(0, 0x10000))


def test_kick_without_fd_polling_mode_is_refused(rng_frontend: Frontend) -> None:
    with pytest.raises(BadRingState, match="polling mode"):
        rng_frontend.send(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_MASK))


def test_vring_fd_request_with_unknown_bits_is_refused(rng_frontend: Frontend) -> None:
    with pytest.raises(BadRingState, match="unknown bits"):
        rng_frontend.send(Request.SET_VRING_CALL, encode_u64(1 << 9))


def test_vring_enable_other_than_0_or_1_is_refused(rng_frontend: Frontend) -> None:
    with pytest.raises(BadRingState, match="neither 0 nor 1"):
        rng_frontend.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 2))


def test_call_fd_can_be_replaced_and_removed(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    fe.send(Request.SET_VRING_CALL, encode_u64(VRING_NOFD_MASK))
    assert fe.backend.vrings[0].call_fd is None
    fill_request(fe)
    assert len(fe.kick()) == 1
    assert fe.calls() == 0  # no call fd: nobody signalled


def test_a_running_rings_new_call_fd_is_signalled_once(rng_frontend: Frontend) -> None:
    """QEMU 7.2 replaces the call fd of a ring it just started, while the guest kicks:
    a call made just before went to the old fd.  The new fd gets one call, so the
    driver looks at the used ring (a spurious call is harmless, a lost one hangs it)."""
    fe = rng_frontend
    fe.start(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    fill_request(fe)
    assert len(fe.kick()) == 1 and fe.calls() == 1
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    os.close(fe.call_fds[0])
    fe.call_fds[0] = new
    fe.send(Request.SET_VRING_CALL, encode_u64(0), [os.dup(new)])
    assert fe.calls() == 1
    fill_request(fe)
    assert len(fe.kick()) == 1 and fe.calls() == 1  # and calls go on on the new fd


# -- message-level errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_code", "size"),
    [
        (Request.SET_FEATURES, 8),
        (Request.SET_PROTOCOL_FEATURES, 8),
        (Request.SET_VRING_NUM, 8),
        (Request.SET_VRING_BASE, 8),
        (Request.GET_VRING_BASE, 8),
        (Request.SET_VRING_ENABLE, 8),
        (Request.SET_VRING_KICK, 8),
        (Request.SET_VRING_CALL, 8),
        (Request.SET_VRING_ERR, 8),
        (Request.SET_VRING_ADDR, 40),
        (Request.ADD_MEM_REG, 40),
        (Request.REM_MEM_REG, 40),
    ],
)
def test_backend_refuses_a_wrong_payload_size_naming_the_request(
    rng_frontend: Frontend, request_code: Request, size: int
) -> None:
    fe = rng_frontend
    fe.negotiate()
    with pytest.raises(BadPayloadSize) as info:
        fe.send(request_code, bytes(size + 4), need_reply=True)
    assert info.value.request == request_code.name
    assert u64_of(parse_reply(fe.last_reply.data, request_code)) == 1


@pytest.mark.parametrize("request_code", [Request.SET_LOG_BASE, Request.IOTLB_MSG, 999])
def test_request_the_backend_does_not_support_is_unknown_request(
    rng_frontend: Frontend, request_code: int
) -> None:
    with pytest.raises(UnknownRequest, match="not supported"):
        rng_frontend.send(request_code)


def test_unused_fds_of_a_message_are_closed(rng_frontend: Frontend) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    assert rng_frontend.send(Request.SET_OWNER, fds=[fd]) is None
    with pytest.raises(OSError):
        os.fstat(fd)


# -- config space -----------------------------------------------------------------------------


def test_get_config_returns_blk_capacity_and_num_queues(
    make_frontend: FrontendFactory, image: Path
) -> None:
    fe = make_frontend(BlockDevice(BlockConfig(image=image, queues=2)))
    fe.negotiate()
    reply = fe.call(Request.GET_CONFIG, encode_config(0, CONFIG_SIZE, 0, bytes(CONFIG_SIZE)))
    offset, size, _flags = (int.from_bytes(reply[i : i + 4], "little") for i in (0, 4, 8))
    space = reply[12:]
    assert (offset, size, len(space)) == (0, CONFIG_SIZE, CONFIG_SIZE)
    assert int.from_bytes(space[0:8], "little") == 64 * 1024 // 512  # capacity in sectors
    assert int.from_bytes(space[20:24], "little") == 512  # blk_size
    assert int.from_bytes(space[34:36], "little") == 2  # num_queues
    assert u64_of(fe.call(Request.GET_QUEUE_NUM)) == 2
    # A window in the middle of the space.
    part = fe.call(Request.GET_CONFIG, encode_config(34, 2, 0, bytes(2)))
    assert part[12:] == (2).to_bytes(2, "little")


def test_get_config_beyond_the_device_space_reads_zeroes(rng_frontend: Frontend) -> None:
    reply = rng_frontend.call(Request.GET_CONFIG, encode_config(0, 16, 0, bytes(16)))
    assert reply[12:] == bytes(16)  # virtio-rng has no config space


def test_set_config_on_a_read_only_field_is_refused_with_a_failure_ack(
    make_frontend: FrontendFactory, image: Path
) -> None:
    fe = make_frontend(BlockDevice(BlockConfig(image=image)))
    fe.negotiate()
    assert fe.ack(Request.SET_CONFIG, encode_config(0, 8, 0, bytes(8))) == 1
    assert fe.backend.device.config_space()[0:8] == (128).to_bytes(8, "little")


# -- driver violations and device failures ----------------------------------------------------


def test_driver_violation_is_logged_answered_and_the_queue_serves_on(
    rng_frontend: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    fe = rng_frontend
    fe.start()
    driver = fe.drivers[0]
    buf = fe.alloc(8)
    driver.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 0)  # loops on itself
    driver.publish(0)
    head, _gpa = fill_request(fe)
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    used = fe.kick()
    assert used == [(0, 0), (head, 16)]  # the bad chain is returned empty, the next served
    assert fe.backend.device.stats[0].violations == 1
    assert "driver violation: queue 0, descriptor 0" in caplog.text
    assert "VIRTIO 1.4 §2.7.5.2" in caplog.text


def test_avail_index_jump_stops_the_queue_at_once_until_reset(
    rng_frontend: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    """VIRTIO 1.4 §2.7.6: an index more than a queue ahead is a violation, at once."""
    fe = rng_frontend
    fe.start()
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    fe.drivers[0].set_avail_idx(100)
    assert fe.kick() == []
    assert "available index moved 100 entries ahead" in caplog.text
    assert "stops until the device is reset" in caplog.text
    assert fe.backend.device.stats[0].violations == 1
    assert fe.backend.recheck_interval is None  # nothing re-checked later
    # Nothing more is processed, not even a valid chain.
    fe.drivers[0].set_avail_idx(0)
    fill_request(fe)
    assert fe.kick() == []


def test_strict_device_enters_needs_reset_on_the_first_violation_until_reset(
    rng_frontend: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    fe = rng_frontend
    fe.backend.engine.strict = True
    fe.start()
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    driver = fe.drivers[0]
    driver.write_desc(0, fe.alloc(16), 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)  # loops
    driver.publish(0)
    assert fe.kick() == []
    assert "descriptor 0" in caplog.text and "§2.7.5.2" in caplog.text
    assert "DEVICE_NEEDS_RESET" in caplog.text
    assert u64_of(fe.call(Request.GET_STATUS)) & DeviceStatus.DEVICE_NEEDS_RESET
    # The bad chain is not returned and nothing else is served until reset.
    fill_request(fe)
    assert fe.kick() == []
    fe.send(Request.SET_STATUS, encode_u64(0))
    assert u64_of(fe.call(Request.GET_STATUS)) == 0


class ExplodingDevice(VirtioDevice):
    """A device model with a bug: it raises on every chain."""

    device_id = DeviceId.ENTROPY

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        raise RuntimeError("device bug")


def test_device_failure_on_a_chain_is_logged_and_the_chain_returned(
    make_frontend: FrontendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fe = make_frontend(ExplodingDevice())
    fe.start()
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    head, _gpa = fill_request(fe)
    assert fe.kick() == [(head, 0)]
    assert fe.backend.device.stats[0].errors == 1
    assert "device failed on chain" in caplog.text


def test_indirect_chain_is_served_when_indirect_desc_is_negotiated(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start()
    a, b = fe.alloc(8), fe.alloc(24)
    head = fe.drivers[0].add_indirect(fe.alloc(32), writable=[(a, 8), (b, 24)])
    assert fe.kick() == [(head, 32)]


def test_indirect_chain_is_a_violation_when_not_negotiated(rng_frontend: Frontend) -> None:
    fe = rng_frontend
    fe.start(features=(1 << Feature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES)
    table = fe.put(DESC.pack(fe.alloc(8), 8, 2, 0))
    driver = fe.drivers[0]
    driver.write_desc(0, table, 16, 4)
    driver.publish(0)
    assert fe.kick() == [(0, 0)]
    assert fe.backend.device.stats[0].violations == 1


def test_device_features_are_passed_without_the_protocol_bit(
    make_frontend: FrontendFactory, image: Path
) -> None:
    fe = make_frontend(BlockDevice(BlockConfig(image=image)))
    fe.negotiate()
    assert fe.backend.device.has_feature(BlkFeature.FLUSH)
    assert not fe.backend.device.has_feature(30)
