"""virtio-net mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF, VIRTIO 1.4 §5.1.9.3-4).

With MRG_RXBUF a received frame is spread over as many receive buffers as it
needs: ``num_buffers`` in the first buffer's header counts them, the others
hold only data, every buffer but the last is used completely, and the driver
sees all of them used together (one used index update on a split ring, the
first used descriptor's flags written last on a packed one).  When the driver
has not posted enough yet, the buffers taken go back and the device waits for
the next notification; when even the whole ring is too short, the frame is
dropped.  Split rings through the in-process front-end of ``conftest``, packed
ones through the one of ``test_packed_backend``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import HDR_SIZE, RECEIVEQ, NetFeature, NetHeader
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    Frontend,
    FrontendFactory,
    guest_memory,
)
from pyvirtio.vhost_user import engine as engine_module
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import PackedQueue
from pyvirtio.virtqueue.split import SplitQueue

from .store_spy import spy_on_stores
from .test_net_device import MAC, PEER, Host, ListBackend, frame
from .test_packed_backend import PACKED, Front

MRG = 1 << NetFeature.MRG_RXBUF
EVENT_IDX = 1 << Feature.EVENT_IDX
#: Where the tests' receive buffers live: fixed slots, one per outstanding buffer.
SLOT = 0x1000
SLOTS_GPA = FRONTEND_GPA + 0x80000


# -- a net device with one receive ring, split or packed ---------------------------------------


class Driver:
    """The driver side of the receive ring: post buffers, collect them, reassemble frames."""

    def __init__(self, ring: DriverSplitQueue | DriverPackedQueue, memory: GuestMemory,
                 gpa: int) -> None:
        self.ring = ring
        self.memory = memory
        self._free_slots = [gpa + i * SLOT for i in range(ring.size)]
        #: Outstanding buffers: id -> (GPA, length), in the order posted.
        self.posted: dict[int, tuple[int, int]] = {}

    def post(self, *lengths: int) -> list[int]:
        """Make receive buffers of ``lengths`` bytes available (one descriptor each)."""
        ids = []
        for n in lengths:
            assert n <= SLOT
            gpa = self._free_slots.pop()
            self.memory.write(gpa, b"\xee" * n)
            if isinstance(self.ring, DriverSplitQueue):
                buf = self.ring.add(writable=[(gpa, n)])
            else:
                buf = self.ring.add([], [(gpa, n)])
            self.posted[buf] = (gpa, n)
            ids.append(buf)
        return ids

    @property
    def free(self) -> int:
        return self.ring.free_count

    def used(self) -> list[tuple[int, int, bytes]]:
        """Used buffers as (id, length, the bytes written), their slots freed."""
        out = []
        for buf, n in self.ring.get_used():
            gpa, _length = self.posted.pop(buf)
            out.append((buf, n, self.memory.read(gpa, n)))
            self._free_slots.append(gpa)
        return out


def reassemble(used: list[tuple[int, int, bytes]]) -> list[tuple[NetHeader, bytes, list[int]]]:
    """Frames as a driver rebuilds them: (header, frame, the buffer lengths)."""
    frames = []
    i = 0
    while i < len(used):
        header = NetHeader.unpack(used[i][2][:HDR_SIZE])
        count = header.num_buffers
        assert count >= 1 and i + count <= len(used), "buffers missing"
        parts = used[i : i + count]
        data = b"".join(part[2] for part in parts)[HDR_SIZE:]
        frames.append((header, data, [part[1] for part in parts]))
        i += count
    return frames


@dataclass
class RxPort:
    """A started net device whose receive queue a :class:`Driver` fills."""

    device: NetDevice
    driver: Driver
    kick: Callable[[], None]
    memory: GuestMemory
    backend: VhostUserBackend

    def deliver(self, *frames: bytes) -> None:
        self.device.deliver(list(frames))


def net_device(mtu: int = 9000) -> NetDevice:
    return NetDevice(NetDeviceConfig(mac=MAC, mtu=mtu), ListBackend())


def split_port(fe: Frontend, *, size: int = 8, mrg: bool = True,
               event_idx: bool = True) -> RxPort:
    """The device behind ``fe`` with a split receive ring of ``size``."""
    device = fe.backend.device
    assert isinstance(device, NetDevice)
    device.attach(Host(fe.backend))
    features = device.offered_features() & ~NOT_SPLIT_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES
    if not mrg:
        features &= ~MRG
    if not event_idx:
        features &= ~EVENT_IDX
    fe.negotiate(features)
    fe.set_mem_table()
    ring = fe.setup_queue(RECEIVEQ, size)
    driver = Driver(ring, fe.memory, SLOTS_GPA)

    def kick() -> None:  # not fe.kick(), which collects the used buffers itself
        fe.backend.kick(RECEIVEQ)

    return RxPort(device, driver, kick, fe.memory, fe.backend)


@contextlib.contextmanager
def packed_port(*, size: int = 8, event_idx: bool = True, mtu: int = 9000) -> Iterator[RxPort]:
    """A net device with a packed receive ring of ``size`` (any size, §2.8)."""
    device = net_device(mtu)
    front = Front(device)
    try:
        device.attach(Host(front.backend))
        features = (device.offered_features() & ~(1 << Feature.IN_ORDER)
                    | PACKED | VHOST_USER_F_PROTOCOL_FEATURES)
        if not event_idx:
            features &= ~EVENT_IDX
        front.negotiate(features)
        front.set_mem_table()
        ring = front.packed_ring(RECEIVEQ, size)
        driver = Driver(ring, front.memory, front.next_data + 0x40000)

        def kick() -> None:
            front.kick(RECEIVEQ)

        yield RxPort(device, driver, kick, front.memory, front.backend)
    finally:
        front.close()


@pytest.fixture
def split(make_frontend: FrontendFactory) -> RxPort:
    """MTU 9000, MRG_RXBUF and EVENT_IDX negotiated, an 8-entry split receive ring."""
    return split_port(make_frontend(net_device()))


@pytest.fixture
def packed() -> Iterator[RxPort]:
    """MTU 9000, MRG_RXBUF and EVENT_IDX negotiated, an 8-entry packed receive ring."""
    with packed_port() as port:
        yield port


def rx_frame(size: int) -> bytes:
    return frame(dst=MAC, src=PEER, size=size)


@pytest.fixture(params=["split", "packed"])
def port(request: pytest.FixtureRequest) -> RxPort:
    """Either ring layout."""
    value: RxPort = request.getfixturevalue(request.param)
    return value


# -- spreading a frame ---------------------------------------------------------------------------


def test_mrg_rxbuf_is_offered_at_any_mtu_and_with_the_offloads() -> None:
    for mtu in (1500, 9000, 65535):
        assert net_device(mtu).offered_features() & MRG


def test_a_frame_longer_than_a_buffer_is_spread_over_several_per_spec_5_1_9_4(
    port: RxPort,
) -> None:
    """num_buffers counts the buffers, the header is only in the first one, every buffer
    but the last is used completely, and the frame's bytes follow in order."""
    ids = port.driver.post(1000, 1000, 1000, 1000)
    data = rx_frame(2500)
    port.deliver(data)
    used = port.driver.used()
    assert [(buf, n) for buf, n, _ in used] == [(ids[0], 1000), (ids[1], 1000),
                                               (ids[2], HDR_SIZE + 2500 - 2000)]
    ((header, received, _lengths),) = reassemble(used)
    assert header == NetHeader(num_buffers=3)
    assert received == data
    assert used[1][2] == data[1000 - HDR_SIZE : 2000 - HDR_SIZE]  # no header there
    stats = port.device.stats[RECEIVEQ]
    assert (stats.requests, stats.bytes_in, stats.errors) == (1, 2500, 0)
    assert stats.kinds["merged frames"] == 1
    # The fourth buffer is still the driver's, and takes the next frame alone.
    small = rx_frame(200)
    port.deliver(small)
    ((buf, n, written),) = port.driver.used()
    assert (buf, n) == (ids[3], HDR_SIZE + 200)
    assert NetHeader.unpack(written[:HDR_SIZE]).num_buffers == 1
    assert written[HDR_SIZE:] == small
    assert stats.kinds["merged frames"] == 1


def test_a_64_kib_gso_sized_frame_fills_page_sized_buffers(make_frontend: FrontendFactory) -> None:
    """What Linux does with MRG_RXBUF: buffers of at most a page, whatever the packet."""
    device = NetDevice(NetDeviceConfig(mac=MAC, mtu=65535), ListBackend())
    port = split_port(make_frontend(device), size=32)
    port.driver.post(*[SLOT] * 20)
    data = rx_frame(65535 + 14)
    port.deliver(data)
    used = port.driver.used()
    ((header, received, lengths),) = reassemble(used)
    assert header.num_buffers == len(used) == 17
    assert lengths[:-1] == [SLOT] * 16 and lengths[-1] == HDR_SIZE + len(data) - 16 * SLOT
    assert received == data


def test_the_buffers_of_a_frame_are_used_with_one_used_index_update_on_a_split_ring(
    split: RxPort,
) -> None:
    """§5.1.9.4: "the device MUST use all buffers used by a single receive packet
    together"; the driver reads used elements up to the index (§2.7.14)."""
    split.driver.post(1000, 1000, 1000)
    queue = split.backend.vrings[RECEIVEQ].queue
    assert isinstance(queue, SplitQueue)
    spy = spy_on_stores(queue._ring().used)
    split.deliver(rx_frame(2500))
    assert [value for word, value in spy.stores if word == 1] == [3]  # the used index, once
    assert len(split.driver.used()) == 3


def test_the_first_used_descriptor_of_a_frame_is_published_last_on_a_packed_ring(
    packed: RxPort,
) -> None:
    """§2.8.21.1 by symmetry: the flags of the first descriptor of a batch go last, so the
    driver, polling its next used position (§2.8.22), sees the whole frame or nothing."""
    ids = packed.driver.post(1000, 1000, 1000)
    queue = packed.backend.vrings[RECEIVEQ].queue
    assert isinstance(queue, PackedQueue)
    spy = spy_on_stores(queue._ring().desc)
    packed.deliver(rx_frame(2500))
    flags = [(word // 8, value) for word, value in spy.stores if word % 8 == 7]
    used_flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE  # wrap 1
    assert flags == [(1, used_flags), (2, used_flags), (0, used_flags)]
    used = packed.driver.used()
    assert [buf for buf, _n, _data in used] == ids
    assert reassemble(used)[0][0].num_buffers == 3


def test_a_frame_spread_across_the_end_of_a_packed_ring_flips_the_used_wrap_counter() -> None:
    with packed_port(size=3) as port:
        port.driver.post(1000, 1000)
        port.deliver(rx_frame(500))  # takes descriptor 0: the next frame starts at 1
        assert len(port.driver.used()) == 1
        port.driver.post(1000, 1000)  # descriptors 2, then 0 in the next lap
        data = rx_frame(2500)
        port.deliver(data)
        used = port.driver.used()
        assert len(used) == 3
        assert reassemble(used)[0][1] == data
        port.driver.post(100)
        port.deliver(rx_frame(60))
        assert [n for _buf, n, _data in port.driver.used()] == [HDR_SIZE + 60]


# -- too few buffers: rewind and wait ------------------------------------------------------------


def test_too_few_buffers_go_back_and_the_frame_waits_for_a_kick_with_event_idx_split(
    split: RxPort,
) -> None:
    """Nothing is used, and avail_event asks the driver to kick when it publishes beyond
    what it already did (§2.7.10): not at the rewound position, which it has passed."""
    ring = split.driver.ring
    assert isinstance(ring, DriverSplitQueue)
    split.driver.post(1000, 1000)
    assert ring.should_kick()
    split.kick()
    data = rx_frame(2500)
    split.deliver(data)
    assert split.driver.used() == []
    assert ring.used_idx() == 0
    avail_event = int.from_bytes(split.memory.read(ring.addrs.used + 4 + 8 * ring.size, 2),
                                 "little")
    assert avail_event == 2
    queue = split.backend.vrings[RECEIVEQ].queue
    assert queue is not None and queue.last_avail_idx == 0  # both buffers given back
    split.kick()  # a kick without new buffers changes nothing (and does not spin)
    assert split.driver.used() == []
    split.driver.post(1000)
    assert ring.should_kick()
    split.kick()
    ((header, received, lengths),) = reassemble(split.driver.used())
    assert (header.num_buffers, received, lengths) == (3, data, [1000, 1000, 512])
    stats = split.device.stats[RECEIVEQ]
    assert (stats.requests, stats.errors, stats.violations) == (1, 0, 0)


def test_too_few_buffers_go_back_and_the_frame_waits_for_a_kick_with_event_idx_packed(
    packed: RxPort,
) -> None:
    """The device event names the first descriptor the driver has not made available yet
    (§2.8.10): the driver notifies when it adds the buffer the frame waits for."""
    ring = packed.driver.ring
    assert isinstance(ring, DriverPackedQueue)
    packed.driver.post(1000, 1000)
    ring.should_kick()
    packed.kick()
    data = rx_frame(2500)
    packed.deliver(data)
    assert packed.driver.used() == []
    queue = packed.backend.vrings[RECEIVEQ].queue
    assert queue is not None and queue.last_avail_idx == 0 | 1 << 15
    assert device_event(packed, ring) == (2 | 1 << 15, RING_EVENT_FLAGS_DESC)
    packed.kick()
    assert packed.driver.used() == []
    packed.driver.post(1000)
    assert ring.should_kick()
    packed.kick()
    ((header, received, _lengths),) = reassemble(packed.driver.used())
    assert (header.num_buffers, received) == (3, data)


def device_event(port: RxPort, ring: DriverPackedQueue) -> tuple[int, int]:
    """The device event suppression structure: (off_wrap, flags)."""
    off_wrap, flags = EVENT_SUPPRESS.unpack(port.memory.read(ring.addrs.device, 4))
    return off_wrap, flags


def test_without_event_idx_the_device_asks_for_every_kick_while_a_frame_waits(
    make_frontend: FrontendFactory,
) -> None:
    port = split_port(make_frontend(net_device()), event_idx=False)
    ring = port.driver.ring
    assert isinstance(ring, DriverSplitQueue)
    port.driver.post(1000)
    port.deliver(rx_frame(2500))
    assert port.driver.used() == []
    port.driver.post(1000)
    assert ring.should_kick()  # VIRTQ_USED_F_NO_NOTIFY is clear
    port.kick()
    assert port.driver.used() == []
    port.driver.post(1000)
    port.kick()
    assert len(port.driver.used()) == 3


# -- the ring cannot hold the frame, a rule broken mid-frame ---------------------------------


def test_a_frame_longer_than_the_whole_ring_is_dropped_and_counted_without_a_hang(
    port: RxPort, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    port.driver.post(*[100] * 8)  # the whole ring: 800 bytes
    port.deliver(rx_frame(1000))
    assert port.driver.used() == []
    stats = port.device.stats[RECEIVEQ]
    assert stats.errors == 1 and stats.kinds["dropped: rx ring too small"] == 1
    assert "1012 bytes needed" in caplog.text
    # The buffers stayed with the driver and take the next frame.
    small = rx_frame(150)
    port.deliver(small)
    ((header, received, lengths),) = reassemble(port.driver.used())
    assert (header.num_buffers, received, lengths) == (2, small, [100, 62])


def test_a_rule_broken_mid_frame_returns_the_buffers_empty_and_drops_the_frame(
    split: RxPort, caplog: pytest.LogCaptureFixture
) -> None:
    """The good buffer taken first goes back with length 0 (Linux frees it as a length
    error), the bad one as any violation; the device keeps serving."""
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    ring = split.driver.ring
    assert isinstance(ring, DriverSplitQueue)
    (good,) = split.driver.post(1000)
    bad = ring.add(writable=[(FRONTEND_GPA + FRONTEND_RAM, 1000)])  # outside guest memory
    split.deliver(rx_frame(2500))
    assert ring.get_used() == [(good, 0), (bad, 0)]
    split.driver.posted.pop(good)
    stats = split.device.stats[RECEIVEQ]
    assert stats.violations == 1
    assert stats.kinds["dropped: rx driver violation"] == 1
    assert "not in guest memory" in caplog.text
    data = rx_frame(2500)
    split.driver.post(1000, 1000, 1000)
    split.deliver(data)
    assert reassemble(split.driver.used())[0][1] == data


def test_a_mergeable_buffer_shorter_than_the_header_is_a_violation(split: RxPort) -> None:
    """§5.1.9.3.1: with MRG_RXBUF each buffer MUST hold a struct virtio_net_hdr."""
    split.driver.post(1000, 8, 1000)
    split.deliver(rx_frame(1500))
    assert [n for _buf, n, _data in split.driver.used()] == [0, 0, 0]
    stats = split.device.stats[RECEIVEQ]
    assert stats.violations == 1 and stats.kinds["dropped: rx buffer too small"] == 1


def test_a_frame_is_not_cut_short_by_the_drain_budget(
    split: RxPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its buffers count against the budget, but one frame's buffers are taken together."""
    monkeypatch.setattr(engine_module, "DRAIN_BUDGET", 2)
    split.driver.post(1000, 1000, 1000, 1000)
    data = rx_frame(3500)
    split.deliver(data)
    assert reassemble(split.driver.used())[0][1] == data


def test_a_device_failing_on_merged_chains_returns_them_empty(
    split: RxPort, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device bug is logged and counted; the driver gets its buffers back, length 0."""
    caplog.set_level(logging.ERROR, logger="pyvirtio")

    def broken(queue: int, chains: list[DescriptorChain]) -> list[int]:
        split.device._backlogs[0].popleft()
        return [chains[0].writable_len + 1] + [0] * (len(chains) - 1)  # beyond the buffer

    monkeypatch.setattr(split.device, "_merge_into", broken)
    split.driver.post(1000, 1000)
    split.deliver(rx_frame(1500))
    assert [n for _buf, n, _data in split.driver.used()] == [0, 0]
    assert split.device.stats[RECEIVEQ].errors == 1
    assert "device reported lengths [1001, 0]" in caplog.text


# -- without MRG_RXBUF ---------------------------------------------------------------------------


def test_without_mrg_rxbuf_a_frame_must_fit_one_buffer_per_spec_5_1_9_3_2(
    make_frontend: FrontendFactory,
) -> None:
    """"The device MUST use only a single descriptor if VIRTIO_NET_F_MRG_RXBUF was not
    negotiated": a buffer too small for the frame goes back empty, the frame is dropped."""
    port = split_port(make_frontend(net_device()), mrg=False)
    ids = port.driver.post(50, 200)
    port.deliver(rx_frame(100), rx_frame(120))
    used = port.driver.used()
    assert [(buf, n) for buf, n, _data in used] == [(ids[0], 0), (ids[1], HDR_SIZE + 120)]
    assert NetHeader.unpack(used[1][2][:HDR_SIZE]).num_buffers == 1
    stats = port.device.stats[RECEIVEQ]
    assert stats.kinds["dropped: rx buffer too small"] == 1
    assert stats.kinds["merged frames"] == 0


# -- property: whatever the buffers, frames arrive whole and in order ----------------------------


@dataclass
class Outcome:
    received: list[bytes] = field(default_factory=list)
    dropped: int = 0


def run_driver(port: RxPort, frames: list[bytes], buffers: list[int],
               batches: list[int]) -> Outcome:
    """Post ``buffers`` in ``batches`` until every frame arrived or was dropped.

    Each time the device waits for buffers, the driver's next post must want a kick.
    """
    outcome = Outcome()
    port.deliver(*frames)
    lengths = itertools.cycle(buffers)
    for step in range(2000):
        backlog = port.device._backlogs[0]
        if not backlog:
            break
        batch = max(1, min(batches[step % len(batches)], port.driver.free))
        waiting_before = len(backlog)
        if port.driver.free:
            port.driver.post(*[next(lengths) for _ in range(batch)])
            # A waiting frame (nothing taken since the last kick): the driver must kick.
            assert port.driver.ring.should_kick()
        port.kick()
        used = port.driver.used()
        outcome.received += [data for _header, data, _lengths in reassemble(used)]
        assert len(backlog) <= waiting_before
    else:
        pytest.fail("the frames never drained")
    outcome.dropped = port.device.stats[RECEIVEQ].kinds["dropped: rx ring too small"]
    return outcome


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(["split", "packed"]),
    size=st.sampled_from([2, 4, 8, 16]),
    frame_sizes=st.lists(st.integers(60, 3000), min_size=1, max_size=6),
    buffers=st.lists(st.integers(HDR_SIZE, SLOT), min_size=1, max_size=10),
    batches=st.lists(st.integers(1, 16), min_size=1, max_size=5),
)
def test_frames_arrive_whole_and_in_order_or_are_dropped_only_if_the_ring_cannot_hold_them(
    layout: str, size: int, frame_sizes: list[int], buffers: list[int], batches: list[int]
) -> None:
    frames = [rx_frame(n) for n in frame_sizes]
    with contextlib.ExitStack() as stack:
        if layout == "split":
            guest = stack.enter_context(guest_memory(((FRONTEND_GPA, FRONTEND_RAM),)))
            device = net_device()
            fe = Frontend(VhostUserBackend(device), guest)
            stack.callback(fe.close)
            stack.callback(device.close)
            stack.callback(fe.backend.disconnect)
            port = split_port(fe, size=size)
        else:
            port = stack.enter_context(packed_port(size=size))
        outcome = run_driver(port, frames, buffers, batches)
        stats = port.device.stats[RECEIVEQ]
        # Every frame arrived or was dropped for the ring's size, and nothing else.
        assert len(outcome.received) + outcome.dropped == len(frames)
        assert stats.errors == outcome.dropped and stats.violations == 0
        it = iter(frames)
        assert all(any(got == sent for sent in it) for got in outcome.received)
        for sent in frames:
            # Dropped only if longer than a whole ring of the driver's buffers.
            need = HDR_SIZE + len(sent)
            if need <= size * min(buffers):
                assert sent in outcome.received
            if need > size * max(buffers):
                assert sent not in outcome.received


class _Tracebacks(logging.Handler):
    """Collects log records that carry an exception (a device or back-end bug)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


_FLAGS = st.sampled_from([VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0,
                          VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT])


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([2, 4, 8]),
    descs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, SLOT), _FLAGS,
                             st.integers(0, 9)), min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 9), max_size=8),
    frame_sizes=st.lists(st.integers(60, 3000), min_size=1, max_size=4),
    kicks=st.integers(1, 3),
)
def test_a_hostile_receive_ring_never_makes_anything_escape(
    size: int, descs: list[tuple[int, int, int, int]], heads: list[int], frame_sizes: list[int],
    kicks: int,
) -> None:
    """Whatever the driver writes in its receive ring (loops, readable buffers, buffers
    outside memory, indirect garbage, heads beyond the table), merging frames raises
    nothing and logs no traceback; every frame is delivered, dropped or still waiting."""
    tracebacks = _Tracebacks()
    logging.getLogger("pyvirtio").addHandler(tracebacks)
    with contextlib.ExitStack() as stack:
        stack.callback(logging.getLogger("pyvirtio").removeHandler, tracebacks)
        guest = stack.enter_context(guest_memory(((FRONTEND_GPA, FRONTEND_RAM),)))
        device = net_device()
        fe = Frontend(VhostUserBackend(device), guest)
        stack.callback(fe.close)
        stack.callback(device.close)
        stack.callback(fe.backend.disconnect)
        port = split_port(fe, size=size)
        ring = port.driver.ring
        assert isinstance(ring, DriverSplitQueue)
        for index, (slot, length, flags, nxt) in enumerate(descs[:size]):
            # Slots 0-7 are guest memory, 8 and 9 lie beyond it.
            ring.write_desc(index, SLOTS_GPA + slot * SLOT, length, flags, nxt)
        for head in heads[:size]:
            ring.publish(head)
        port.deliver(*[rx_frame(n) for n in frame_sizes])
        for _ in range(kicks):
            port.kick()
        stats = device.stats[RECEIVEQ]
        waiting = len(device._backlogs[0])
        # A request the device answered (delivered, or dropped for a bad buffer), or one
        # the back-end could not serve, or still waiting: nothing lost, nothing twice.
        unserved = stats.kinds["dropped: rx ring too small"] + stats.kinds[
            "dropped: rx driver violation"]
        assert stats.requests + unserved + waiting == len(frame_sizes)
        assert stats.errors == sum(n for kind, n in stats.kinds.items()
                                   if kind.startswith("dropped: "))
        assert 0 <= ring.used_idx() <= len(heads[:size])
        assert tracebacks.records == []
