"""Resource bounds: nothing a guest or a front-end does makes the back-end grow without
bound or stop serving others.  One test (or group) per bound:

- queue size: SET_VRING_NUM above the device's maximum is refused;
- chain length: a chain that loops, or an indirect table longer than the queue, is
  refused after at most queue-size descriptor reads;
- indirect table size: capped at the queue size before anything of it is read;
- outstanding requests: processing is synchronous, so a full queue (the largest a
  device allows) drains with memory that does not grow with the queue;
- config space window: GET/SET_CONFIG address at most 256 bytes;
- message payload: at most MAX_PAYLOAD bytes are buffered per message;
- memory regions: at most 8 per SET_MEM_TABLE and MAX_MEM_SLOTS in all;
- rng fill: at most MAX_FILL bytes of entropy per request;
- discard / write-zeroes: at most 128 segments per request;
- fairness: a queue whose driver re-publishes chains as fast as they are used, valid
  or not, gets a bounded share (DRAIN_BUDGET) before the other queues and the control
  socket get their turn, in-process and in the real event loop.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import MAX_FILL, RngDevice
from pyvirtio.errors import (
    BadMemoryRegion,
    BadPayloadSize,
    BadRingState,
    ChainTooLong,
    DescriptorLoop,
)
from pyvirtio.memory import RegionSpec, create_memfd
from pyvirtio.runtime import Server
from pyvirtio.spec.blk import (
    CONFIG,
    DISCARD_SEGMENT,
    REQUEST_HEADER,
    SECTOR_SIZE,
    RequestType,
    Status,
)
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
)
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    Frontend,
    FrontendFactory,
    GuestFactory,
    QueuePair,
    make_queue_pair,
    parse_reply,
    ring_addresses,
)
from pyvirtio.vhost_user import backend as backend_module
from pyvirtio.vhost_user import engine as engine_module
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.engine import DRAIN_BUDGET
from pyvirtio.vhost_user.memtable import MAX_MEM_SLOTS
from pyvirtio.vhost_user.protocol import (
    HEADER,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    MessageDecoder,
    Request,
    VringAddr,
    encode_config,
    encode_mem_table,
    encode_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue import split
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.split import SplitQueue

TIMEOUT = 5.0


@pytest.fixture
def descriptor_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the descriptors split queues read (``split._unpack_desc``)."""
    count = [0]
    real = split._unpack_desc

    def counted(buffer: memoryview, offset: int) -> tuple[int, int, int, int]:
        count[0] += 1
        return real(buffer, offset)

    monkeypatch.setattr(split, "_unpack_desc", counted)
    return count


# -- queue size ---------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_queue_size_above_the_device_maximum_is_refused(
    make_frontend: FrontendFactory, packed: bool
) -> None:
    """A driver cannot make the back-end track more descriptors than the device allows."""
    fe = make_frontend(RngDevice())
    offered = RngDevice().offered_features() | VHOST_USER_F_PROTOCOL_FEATURES
    layout = 0 if packed else 1 << Feature.RING_PACKED
    fe.negotiate(offered & ~layout & ~(1 << Feature.IN_ORDER))
    limit = RngDevice.max_queue_size
    for size in [limit * 2, 32768, *([limit + 1] if packed else [])]:
        with pytest.raises(BadRingState, match=r"maximum|power of 2"):
            fe.send(Request.SET_VRING_NUM, encode_vring_state(0, size))
    fe.send(Request.SET_VRING_NUM, encode_vring_state(0, limit))
    assert fe.backend.vrings[0].size == limit


def test_block_device_queue_size_follows_its_configuration(
    make_frontend: FrontendFactory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    fe = make_frontend(BlockDevice(BlockConfig(image=image, queue_size=128)))
    fe.negotiate()
    with pytest.raises(BadRingState, match="maximum"):
        fe.send(Request.SET_VRING_NUM, encode_vring_state(0, 256))
    fe.send(Request.SET_VRING_NUM, encode_vring_state(0, 128))


# -- chain length and indirect tables -------------------------------------------------------------


def test_looping_chain_is_cut_after_queue_size_reads(
    make_guest: GuestFactory, descriptor_reads: list[int]
) -> None:
    """VIRTIO 1.4 §2.7.5.2: following ``next`` never reads more than the table."""
    guest = make_guest()
    pair = make_queue_pair(guest.memory, 256, data_end=0x40000)
    buf = pair.alloc(16)
    for i in range(256):  # one long cycle through the whole table
        pair.driver.write_desc(i, buf, 16, VIRTQ_DESC_F_NEXT, (i + 1) % 256)
    pair.driver.publish(0)
    with pytest.raises(DescriptorLoop):
        pair.device.pop()
    assert descriptor_reads[0] == 257


def test_looping_indirect_table_is_cut_after_its_length(
    make_guest: GuestFactory, descriptor_reads: list[int]
) -> None:
    guest = make_guest()
    pair = make_queue_pair(guest.memory, 64, indirect=True, data_end=0x40000)
    buf = pair.alloc(16)
    table = pair.put(b"".join(DESC.pack(buf, 16, VIRTQ_DESC_F_NEXT, (i + 1) % 64)
                              for i in range(64)))
    pair.driver.write_desc(0, table, 64 * 16, VIRTQ_DESC_F_INDIRECT)
    pair.driver.publish(0)
    with pytest.raises(DescriptorLoop):
        pair.device.pop()
    assert descriptor_reads[0] == 1 + 65  # the indirect descriptor, then the table


@pytest.mark.parametrize("entries", [65, 1 << 20, ((1 << 32) - 16) // 16])
def test_indirect_table_longer_than_the_queue_is_refused_unread(
    make_guest: GuestFactory, descriptor_reads: list[int], entries: int
) -> None:
    """§2.7.5.3.1: a chain is at most the queue size; the table is refused from its
    length alone, before it is mapped or read (even a 4 GiB one)."""
    guest = make_guest()
    pair: QueuePair = make_queue_pair(guest.memory, 64, indirect=True, data_end=0x40000)
    pair.driver.write_desc(0, pair.alloc(16), entries * 16, VIRTQ_DESC_F_INDIRECT)
    pair.driver.publish(0)
    with pytest.raises(ChainTooLong):
        pair.device.pop()
    assert descriptor_reads[0] == 1


# -- outstanding requests -------------------------------------------------------------------------


def test_full_queue_of_the_largest_size_drains_in_bounded_memory(
    make_guest: GuestFactory,
) -> None:
    """Chains are handled one at a time and returned before the next is taken: no
    request state piles up, so a queue of 1024 chains needs no more memory than 64."""

    def peak_while_draining(size: int) -> int:
        guest = make_guest(((FRONTEND_GPA, 4 * FRONTEND_RAM),))
        fe = Frontend(backend_module.VhostUserBackend(RngDevice()), guest)
        fe.start(size=size)
        driver = fe.drivers[0]
        buf = FRONTEND_GPA + 0x100000
        heads = [driver.add(writable=[(buf + 16 * i, 16)], publish=False) for i in range(size)]
        driver.publish_many(heads)
        tracemalloc.start()
        try:
            fe.backend.kick(0)
            rounds = 0
            while fe.backend.recheck_interval is not None:
                fe.backend.recheck()
                rounds += 1
                assert rounds <= size // DRAIN_BUDGET + 1
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(driver.get_used()) == size
        assert fe.backend.device.stats[0].requests == size
        fe.backend.disconnect()
        fe.close()
        return peak

    small = peak_while_draining(64)
    large = peak_while_draining(RngDevice.max_queue_size)
    assert large < small + 64 * 1024, (small, large)


# -- config space, payloads, memory regions ------------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [(0, MAX_CONFIG_SIZE + 1), (200, 100),
                                              (MAX_CONFIG_SIZE, 1), (0xFFFF_FFFF, 1)])
@pytest.mark.parametrize("request_code", [Request.GET_CONFIG, Request.SET_CONFIG])
def test_config_window_beyond_256_bytes_is_refused(
    make_frontend: FrontendFactory, request_code: Request, offset: int, size: int
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate()
    data = bytes(min(size, MAX_CONFIG_SIZE + 1))
    with pytest.raises(BadPayloadSize, match="exceeds 256"):
        fe.send(request_code, encode_config(offset, size, 0, data))


def test_get_config_answers_at_most_the_256_byte_window(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate()
    reply = fe.call(Request.GET_CONFIG, encode_config(0, MAX_CONFIG_SIZE, 0,
                                                      bytes(MAX_CONFIG_SIZE)))
    assert len(reply) == 12 + MAX_CONFIG_SIZE


def test_decoder_buffers_at_most_one_maximal_message() -> None:
    """Read as the runtime reads (``wanted`` bytes at a time), the decoder never holds
    more than a header and MAX_PAYLOAD bytes; a bigger size field is refused at once."""
    decoder = MessageDecoder()
    huge = HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD + 1)
    decoder.feed(huge)
    with pytest.raises(BadPayloadSize):
        decoder.next_message()
    stream = HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD) + bytes(MAX_PAYLOAD)
    stream *= 3
    held = 0
    messages = 0
    while stream:
        want = decoder.wanted
        assert 0 < want <= HEADER.size + MAX_PAYLOAD
        chunk, stream = stream[:want], stream[want:]
        decoder.feed(chunk)
        held += len(chunk)
        assert held <= HEADER.size + MAX_PAYLOAD
        if decoder.next_message() is not None:
            messages += 1
            held = 0
    assert messages == 3


def test_mem_table_of_more_than_8_regions_is_refused_and_its_fds_closed(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate()
    specs = [RegionSpec(i * 0x1000, 0x1000, (1 << 40) + i * 0x1000, 0) for i in range(9)]
    fds = [create_memfd(0x1000) for _ in specs]
    with pytest.raises(BadPayloadSize, match="at most 8"):
        fe.send(Request.SET_MEM_TABLE, encode_mem_table(specs), fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_add_mem_reg_beyond_the_slot_count_is_refused(make_frontend: FrontendFactory) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate()
    assert int.from_bytes(fe.call(Request.GET_MAX_MEM_SLOTS), "little") == MAX_MEM_SLOTS
    for i in range(MAX_MEM_SLOTS):
        spec = RegionSpec(i * 0x1000, 0x1000, (1 << 40) + i * 0x1000, 0)
        fe.send(Request.ADD_MEM_REG, encode_region(spec), [create_memfd(0x1000)])
    assert len(fe.backend.memory) == MAX_MEM_SLOTS
    spec = RegionSpec(MAX_MEM_SLOTS * 0x1000, 0x1000, 1 << 41, 0)
    fd = create_memfd(0x1000)
    with pytest.raises(BadMemoryRegion, match=r"maximum|more than"):
        fe.send(Request.ADD_MEM_REG, encode_region(spec), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the back-end all the same
    assert len(fe.backend.memory) == MAX_MEM_SLOTS


# -- devices --------------------------------------------------------------------------------------


def test_rng_fills_at_most_max_fill_bytes_per_request(
    make_frontend: FrontendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§5.4.6.2 lets the device fill less: a guest asking for 1 MiB gets MAX_FILL."""
    asked: list[int] = []
    real = os.getrandom

    def getrandom(size: int, flags: int = 0) -> bytes:
        asked.append(size)
        return real(size, flags)

    monkeypatch.setattr(os, "getrandom", getrandom)
    fe = make_frontend(RngDevice())
    fe.start()
    big = 0x30000  # 384 KiB in two buffers, beyond MAX_FILL
    head = fe.drivers[0].add(writable=[(fe.alloc(big), big), (fe.alloc(big), big)])
    assert fe.kick() == [(head, MAX_FILL)]
    assert asked == [MAX_FILL]


@pytest.mark.parametrize("type_", [RequestType.DISCARD, RequestType.WRITE_ZEROES],
                         ids=["discard", "write-zeroes"])
@pytest.mark.parametrize("count", [128, 129, 4096])
def test_discard_and_write_zeroes_take_at_most_128_segments(
    make_frontend: FrontendFactory, tmp_path: Path, count: int, type_: RequestType
) -> None:
    image = tmp_path / "disk.img"
    original = os.urandom(256 * SECTOR_SIZE)
    image.write_bytes(original)
    device = BlockDevice(BlockConfig(image=image))
    fe = make_frontend(device)
    fe.start()
    config = CONFIG.unpack(device.config_space())
    assert config[15] == config[18] == 128  # max_discard_seg, max_write_zeroes_seg
    body = REQUEST_HEADER.pack(type_, 0, 0) + b"".join(
        DISCARD_SEGMENT.pack(i, 1, 0) for i in range(count))
    request = fe.put(body)
    status = fe.alloc(1)
    head = fe.drivers[0].add([(request, len(body))], [(status, 1)])
    assert fe.kick() == [(head, 1)]
    if count <= 128:
        assert fe.memory.read(status, 1)[0] == Status.OK
    else:
        assert fe.memory.read(status, 1)[0] == Status.IOERR
        assert image.read_bytes() == original


# -- fairness: a flooded queue --------------------------------------------------------------------


def flood(monkeypatch: pytest.MonkeyPatch, queue: SplitQueue, publish: Callable[[], None],
          *, stop: threading.Event | None = None, limit: int = 20 * DRAIN_BUDGET) -> list[int]:
    """Make ``queue``'s driver re-publish a chain each time the device takes one, as a
    driver on another CPU can.  Returns the count of chains taken; after ``limit`` the
    flood fails loudly (an AssertionError out of the drain loop) instead of hanging."""
    real = queue.pop
    taken = [0]

    def pop() -> object:
        if stop is None or not stop.is_set():
            taken[0] += 1
            if taken[0] > limit:
                raise AssertionError(f"{limit} chains taken: the flood never yields")
            publish()
        return real()

    monkeypatch.setattr(queue, "pop", pop)
    return taken


def get_id_chain(fe: Frontend, queue: int) -> int:
    header = fe.put(REQUEST_HEADER.pack(RequestType.GET_ID, 0, 0))
    return fe.drivers[queue].add([(header, 16)], [(fe.alloc(21), 21)], publish=False)


def looping_chain(fe: Frontend, queue: int) -> int:
    """A chain that breaks §2.7.5.2: its descriptor is its own successor."""
    driver = fe.drivers[queue]
    head = driver.add([(fe.alloc(16), 16)], publish=False)
    driver.write_desc(head, fe.alloc(16), 16, VIRTQ_DESC_F_NEXT, head)
    return head


@pytest.fixture
def two_queue_disk(make_frontend: FrontendFactory, tmp_path: Path) -> Frontend:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR_SIZE))
    fe = make_frontend(BlockDevice(BlockConfig(image=image, queues=2)))
    fe.start(queues=2, size=64)
    return fe


@pytest.mark.parametrize("make_chain", [get_id_chain, looping_chain],
                         ids=["valid chains", "violating chains"])
def test_flooded_queue_yields_after_its_budget_to_the_other_queue_and_messages(
    two_queue_disk: Frontend,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_chain: Callable[[Frontend, int], int],
) -> None:
    caplog.set_level(logging.CRITICAL, logger="pyvirtio")  # hundreds of violations
    fe = two_queue_disk
    backend = fe.backend
    stats = backend.device.stats
    flooded = make_chain(fe, 0)
    driver0 = fe.drivers[0]
    queue0 = backend.vrings[0].queue
    assert isinstance(queue0, SplitQueue)
    taken = flood(monkeypatch, queue0, lambda: driver0.publish(flooded))
    other = get_id_chain(fe, 1)
    fe.drivers[1].publish(other)

    backend.kick(0)  # returns: the flood's turn ends after the budget
    assert taken[0] <= DRAIN_BUDGET + 1
    handled = stats[0].requests + stats[0].violations
    assert handled == DRAIN_BUDGET
    assert backend.recheck_interval == 0.0  # the event loop comes back at once...

    # ... after the control socket and the other queue had their turn.
    assert fe.call(Request.GET_QUEUE_NUM) == encode_u64(2)
    assert fe.kick(1) == [(other, 21)]
    backend.recheck()
    assert stats[0].requests + stats[0].violations == 2 * DRAIN_BUDGET
    assert backend.recheck_interval == 0.0


def test_flooded_queue_does_not_starve_the_event_loop(
    make_guest: GuestFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """The real server: while one queue is flooded (with chains that break the rules),
    the control socket is answered and the other queue served within a second."""
    caplog.set_level(logging.CRITICAL, logger="pyvirtio")  # thousands of violations
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR_SIZE))
    sock = Path(os.path.realpath(tmp_path)) / "blk.sock"
    if len(str(sock)) > 100:
        pytest.skip("socket path too long")
    server = Server(sock, BlockDevice(BlockConfig(image=image, queues=2)))
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    guest = make_guest(((FRONTEND_GPA, FRONTEND_RAM),))
    stop = threading.Event()
    client = RawClient(sock)
    fds: list[int] = []
    try:
        offered = int.from_bytes(client.call(Request.GET_FEATURES), "little")
        client.send(Request.SET_FEATURES, encode_u64(offered & ~NOT_SPLIT_FEATURES))
        client.send(Request.SET_MEM_TABLE, encode_mem_table(guest.specs), list(guest.fds))
        drivers, kicks, calls = [], [], []
        for index in range(2):
            addrs = ring_addresses(FRONTEND_GPA + 0x1000 + index * 0x8000, 64)
            drivers.append(DriverSplitQueue(guest.memory, 64, addrs, event_idx=True))
            kicks.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            calls.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            vring = VringAddr(index, 0, guest.user_addr(addrs.desc), guest.user_addr(addrs.used),
                              guest.user_addr(addrs.avail), 0)
            client.send(Request.SET_VRING_NUM, encode_vring_state(index, 64))
            client.send(Request.SET_VRING_ADDR, encode_vring_addr(vring))
            client.send(Request.SET_VRING_CALL, encode_u64(index), [calls[-1]])
            client.send(Request.SET_VRING_KICK, encode_u64(index), [kicks[-1]])
            client.send(Request.SET_VRING_ENABLE, encode_vring_state(index, 1))
        fds = kicks + calls
        assert client.call(Request.GET_QUEUE_NUM) == encode_u64(2)  # all set up

        bad = drivers[0].add([(FRONTEND_GPA + 0x40000, 16)], publish=False)
        drivers[0].write_desc(bad, FRONTEND_GPA + 0x40000, 16, VIRTQ_DESC_F_NEXT, bad)
        queue0 = server.backend.vrings[0].queue
        assert isinstance(queue0, SplitQueue)
        deadline = time.monotonic() + 10 * TIMEOUT

        def republish() -> None:
            if time.monotonic() > deadline:
                stop.set()  # a hung loop ends the flood itself, so the test fails, not hangs
            drivers[0].publish(bad)

        taken = flood(monkeypatch, queue0, republish, stop=stop, limit=1 << 62)
        drivers[0].publish(bad)
        os.eventfd_write(kicks[0], 1)
        while taken[0] < 3 * DRAIN_BUDGET:  # the flood is on
            time.sleep(0.001)

        start = time.monotonic()
        assert client.call(Request.GET_QUEUE_NUM) == encode_u64(2)
        header = FRONTEND_GPA + 0x50000
        guest.memory.write(header, REQUEST_HEADER.pack(RequestType.GET_ID, 0, 0))
        head = drivers[1].add([(header, 16)], [(FRONTEND_GPA + 0x50100, 21)])
        os.eventfd_write(kicks[1], 1)
        readable, _, _ = select.select([calls[1]], [], [], TIMEOUT)
        assert readable == [calls[1]], "the other queue was not served"
        assert drivers[1].get_used() == [(head, 21)]
        elapsed = time.monotonic() - start
        assert not stop.is_set(), "the flood ended by itself: the event loop was stuck"
        before = taken[0]
        time.sleep(0.05)
        assert taken[0] > before, "the flooded queue is no longer served"
        assert elapsed < 1.0, f"served after {elapsed:.2f} s"
    finally:
        stop.set()
        client.close()
        server.stop()
        thread.join(TIMEOUT)
        for fd in fds:
            os.close(fd)
    assert not thread.is_alive()


class RawClient:
    """Just enough of a vhost-user front-end over a socket (the server's own tests have
    a fuller one)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(TIMEOUT)

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        data = HEADER.pack(request, VERSION, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def call(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        head = self._exact(HEADER.size)
        return parse_reply(head + self._exact(HEADER.unpack(head)[2]), request)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "the server closed the connection"
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def test_violation_log_is_rate_limited_but_every_violation_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A guest flooding the rings with broken chains cannot flood the log."""
    backend = VhostUserBackend(RngDevice())
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    exc = DescriptorLoop("loops", queue=0, descriptor=0)
    for _ in range(engine_module.VIOLATION_LOG_BURST * 5):
        backend.engine._log_violation(exc)
    logged = [r for r in caplog.records if "driver violation:" in r.getMessage()]
    assert len(logged) == engine_module.VIOLATION_LOG_BURST
    backend.engine._log_window -= 1.0  # a second later
    backend.engine._log_violation(exc)
    assert f"{engine_module.VIOLATION_LOG_BURST * 4} more driver violations" in caplog.text


def test_message_with_more_fds_than_the_protocol_allows_is_refused_and_its_fds_closed() -> None:
    decoder = MessageDecoder()
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 1)]
    decoder.feed(HEADER.pack(Request.SET_OWNER, 1, 0), fds)
    with pytest.raises(BadPayloadSize, match="fds"):
        decoder.next_message()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
