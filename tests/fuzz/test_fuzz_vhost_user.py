"""Fuzz target: a hostile vhost-user front-end, from bytes and fds to queue processing.

A case is a device (virtio-blk with two queues on a scratch image, or virtio-rng) and
what a front-end does over one socket: byte chunks cut anywhere with real fds attached
(eventfds, the guest-RAM memfd, memfds too small to map, pipes, ``/dev/null``), kicks,
writes into guest RAM (chains in the rings, or garbage), and hang-ups.  Most cases
start with a valid handshake (features, memory table, rings) whose messages are
sometimes mutated, then send messages of every request type with plausible payloads
(sometimes mutated, with missing or surplus fds, or a size field that lies) and raw
garbage.

The case is replayed as the runtime (:mod:`pyvirtio.runtime`) serves a connection:
:class:`~pyvirtio.vhost_user.protocol.MessageDecoder` feeds
:meth:`VhostUserBackend.handle`; on a protocol error or a hang-up the connection is
dropped (``disconnect``) and the rest of the case is the next connection.

Invariants:

- ``handle`` and the decoder raise only ``PyVirtioError``; ``kick`` and ``recheck``
  (called from the event loop, which catches nothing) raise nothing at all, and no
  traceback is logged (a device that raises is a bug; checked for every target);
- every reply is one well-formed reply message to the request;
- no file descriptor leaks: after ``disconnect`` the process has the fds it had before;
- after any of this, ``disconnect`` and a valid handshake serve requests again.
"""

from __future__ import annotations

import itertools
import mmap
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import PyVirtioError
from pyvirtio.memory import RegionSpec, create_memfd
from pyvirtio.spec.blk import REQUEST_HEADER, RequestType
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import DESC, U16, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    Frontend,
    guest_memory,
    parse_reply,
    ring_addresses,
)
from pyvirtio.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_NOFD_MASK,
    MessageDecoder,
    Request,
    VringAddr,
    close_fds,
    encode_config,
    encode_mem_table,
    encode_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)

from .conftest import fuzz_target, open_fds

RAM_GPA = 0x1_0000_0000
RAM_SIZE = 0x10000
USER_BASE = 0x7F00_0000_0000
#: Queue i's rings (size <= 64) at RAM + 0x1000 + i * 0x1000; buffers from RAM + 0x8000.
QUEUE_STRIDE = 0x1000
BUFFERS = 0x8000
FD_KINDS = ("eventfd", "ram", "memfd", "pipe", "devnull")
U64_MAX = (1 << 64) - 1


# -- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fd:
    """A file descriptor sent with a chunk: ``FD_KINDS[kind]``; ``size`` of a new memfd."""

    kind: int
    size: int = 0


@dataclass(frozen=True)
class Chunk:
    """Bytes as one ``recvmsg`` returns them, with the fds that came along."""

    data: bytes
    fds: tuple[Fd, ...] = ()


@dataclass(frozen=True)
class Kick:
    queue: int


@dataclass(frozen=True)
class Publish:
    """The driver makes a chain (a 16-byte header, ``length`` writable bytes) available."""

    queue: int
    head: int
    length: int


@dataclass(frozen=True)
class Poke:
    """The guest writes bytes anywhere in its RAM (rings included)."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class Hangup:
    """The front-end closes the connection (EOF); the next items are a new connection."""


Item = Chunk | Kick | Publish | Poke | Hangup


@dataclass(frozen=True)
class StreamCase:
    device: int  # 0: virtio-blk with 2 queues, 1: virtio-rng
    fill: int  # the byte guest RAM's buffer area is filled with
    queue_size: int
    items: tuple[Item, ...]


TYPES = (StreamCase, Fd, Chunk, Kick, Publish, Poke, Hangup)


# -- the devices -----------------------------------------------------------------------------------

_SCRATCH = tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-vu-", dir="/dev/shm"
                                       if os.path.isdir("/dev/shm") else None)
IMAGE = Path(_SCRATCH.name) / "disk.img"
IMAGE.write_bytes(bytes(64 * 1024))


def make_device(device: int) -> VirtioDevice:
    """0: virtio-blk with two queues on the scratch image; 1: virtio-rng."""
    if device == 0:
        return BlockDevice(BlockConfig(image=IMAGE, queues=2, serial="fuzz"))
    return RngDevice()


def _offered(device: int) -> int:
    model = make_device(device)
    try:
        return model.offered_features() | VHOST_USER_F_PROTOCOL_FEATURES
    finally:
        model.close()


#: What each device offers in GET_FEATURES.
OFFERED = {0: _offered(0), 1: _offered(1)}


# -- generating streams ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One message before it is cut into chunks."""

    data: bytes
    fds: tuple[Fd, ...]


def frame(request: int, payload: bytes = b"", fds: tuple[Fd, ...] = (), *,
          flags: int = VERSION, size: int | None = None) -> Frame:
    return Frame(HEADER.pack(request, flags, len(payload) if size is None else size) + payload,
                 fds)


u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, U64_MAX)
queue_index = st.one_of(st.integers(0, 2), st.integers(0, 0xFF), u32)
fd_specs = st.builds(Fd, st.integers(0, len(FD_KINDS) - 1),
                     st.sampled_from([0, 0x1000, RAM_SIZE, 2 * RAM_SIZE]))
ram_offsets = st.sampled_from([0, 0x1000, 0x1001, 0x2000, 0x3000, RAM_SIZE - 16, RAM_SIZE])
user_addrs = st.one_of(ram_offsets.map(lambda o: USER_BASE + o), u64)
region_specs = st.builds(
    RegionSpec,
    guest_addr=st.one_of(st.sampled_from([RAM_GPA, 0, RAM_GPA + RAM_SIZE, U64_MAX - 0xFFF]),
                         u64),
    size=st.one_of(st.sampled_from([RAM_SIZE, 0, 0x1000, 2 * RAM_SIZE, U64_MAX]), u64),
    user_addr=st.one_of(st.sampled_from([USER_BASE, USER_BASE + RAM_SIZE, 0]), u64),
    mmap_offset=st.one_of(st.sampled_from([0, 0, 0x1000, RAM_SIZE]), u64),
)


def features_of(device: int) -> st.SearchStrategy[int]:
    offered = OFFERED[device]
    return st.one_of(
        st.just(offered & ~NOT_SPLIT_FEATURES),
        st.integers(0, U64_MAX).map(lambda bits: bits & offered),
        u64,
    )


@st.composite
def payloads(draw: st.DrawFn, request: int, device: int) -> tuple[bytes, tuple[Fd, ...]]:
    """A plausible payload (and the fds it wants) for ``request``."""
    fd = st.one_of(st.just(Fd(1)), st.just(Fd(0)), fd_specs)
    if request in (Request.SET_FEATURES,):
        return encode_u64(draw(features_of(device))), ()
    if request == Request.SET_PROTOCOL_FEATURES:
        bits = st.one_of(st.just(DEFAULT_PROTOCOL_FEATURES),
                         u64.map(lambda b: b & DEFAULT_PROTOCOL_FEATURES), u64)
        return encode_u64(draw(bits)), ()
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        value = draw(st.one_of(st.integers(0, 2), st.integers(0, 2).map(
            lambda i: i | VRING_NOFD_MASK), u64))
        fds = () if value & VRING_NOFD_MASK and draw(st.booleans()) else (draw(fd),)
        return encode_u64(value), fds
    if request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                   Request.SET_VRING_ENABLE):
        num = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 8, 16, 64, 1024, 2048, 32768,
                                              0xFFFF, 0x10000, 0x8000_0001]), u32))
        return encode_vring_state(draw(queue_index), num), ()
    if request == Request.SET_VRING_ADDR:
        addr = VringAddr(draw(queue_index), draw(st.one_of(st.just(0), u32)), draw(user_addrs),
                         draw(user_addrs), draw(user_addrs), draw(st.one_of(st.just(0), u64)))
        return encode_vring_addr(addr), ()
    if request == Request.SET_MEM_TABLE:
        regions = draw(st.lists(region_specs, max_size=9))
        count = draw(st.sampled_from([len(regions)] * 3 + [max(0, len(regions) - 1),
                                                           len(regions) + 1]))
        return encode_mem_table(regions), tuple(draw(fd) for _ in range(count))
    if request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        fds = (draw(fd),) if request == Request.ADD_MEM_REG or draw(st.booleans()) else ()
        return encode_region(draw(region_specs)), fds
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        offset = draw(st.one_of(st.integers(0, 300), u32))
        size = draw(st.one_of(st.integers(0, 300), u32))
        data = bytes(min(size, 300)) if request == Request.GET_CONFIG else draw(
            st.binary(min_size=min(size, 300), max_size=min(size, 300)))
        return encode_config(offset, size, draw(st.one_of(st.just(0), u32)), data), ()
    return draw(st.one_of(st.just(b""), st.binary(max_size=16))), ()


@st.composite
def mutated(draw: st.DrawFn, request: int, payload: bytes, fds: tuple[Fd, ...]) -> Frame:
    """The message as is (mostly), or with its payload, flags, fds or size field broken."""
    flags = draw(st.sampled_from([VERSION, VERSION, VERSION | FLAG_NEED_REPLY]))
    size = None
    how = draw(st.integers(0, 31))
    if how == 1 and payload:  # flip bytes
        data = bytearray(payload)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(data) - 1),
                                                 st.integers(0, 255)), max_size=3)):
            data[pos] = byte
        payload = bytes(data)
    elif how == 2:  # cut short or run long
        payload = payload[: draw(st.integers(0, len(payload)))] + draw(st.binary(max_size=8))
    elif how == 3:
        flags = draw(st.one_of(u32, st.sampled_from([0, 2, 3, VERSION | FLAG_REPLY])))
    elif how == 4:
        fds = tuple(draw(st.lists(fd_specs, max_size=9)))
    elif how == 5:  # the size field lies (the rest of the stream is misframed)
        size = draw(st.one_of(st.integers(0, len(payload) + 8), st.just(MAX_PAYLOAD + 1), u32))
    return frame(request, payload, fds, flags=flags, size=size)


Message = tuple[int, bytes, tuple[Fd, ...]]


def handshake(device: int, queue_size: int, features: int) -> list[Message]:
    """What QEMU sends to start a device: features, memory table, then every ring."""
    msgs: list[tuple[int, bytes, tuple[Fd, ...]]] = [
        (Request.GET_FEATURES, b"", ()),
        (Request.GET_PROTOCOL_FEATURES, b"", ()),
        (Request.SET_PROTOCOL_FEATURES, encode_u64(DEFAULT_PROTOCOL_FEATURES), ()),
        (Request.SET_OWNER, b"", ()),
        (Request.SET_FEATURES, encode_u64(features), ()),
        (Request.SET_MEM_TABLE,
         encode_mem_table([RegionSpec(RAM_GPA, RAM_SIZE, USER_BASE, 0)]), (Fd(1),)),
    ]
    for index in range(2 if device == 0 else 1):
        addrs = ring_addresses(RAM_GPA + QUEUE_STRIDE * (index + 1), queue_size)
        vring = VringAddr(index, 0, USER_BASE + addrs.desc - RAM_GPA,
                          USER_BASE + addrs.used - RAM_GPA, USER_BASE + addrs.avail - RAM_GPA, 0)
        msgs += [
            (Request.SET_VRING_NUM, encode_vring_state(index, queue_size), ()),
            (Request.SET_VRING_BASE, encode_vring_state(index, 0), ()),
            (Request.SET_VRING_ADDR, encode_vring_addr(vring), ()),
            (Request.SET_VRING_CALL, encode_u64(index), (Fd(0),)),
            (Request.SET_VRING_KICK, encode_u64(index), (Fd(0),)),
            (Request.SET_VRING_ENABLE, encode_vring_state(index, 1), ()),
        ]
    return msgs


def chunks(draw: st.DrawFn, frames: list[Frame]) -> list[Item]:
    """Cut the frames' bytes into chunks; each fd travels with the chunk holding the first
    byte of its message (as with one ``sendmsg`` per message).

    Mostly the cuts include the message boundaries, as when the runtime reads no more
    than the message in progress wants; sometimes chunks run across messages.
    """
    stream = b"".join(f.data for f in frames)
    anchors = list(itertools.accumulate([len(f.data) for f in frames], initial=0))
    anywhere = st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8)
    how = draw(st.integers(0, 7))
    if how <= 2:  # one chunk per message
        cuts = anchors[1:-1]
    elif how <= 5:  # messages arriving in pieces
        cuts = sorted(set(anchors[1:-1]) | set(draw(anywhere)))
    elif how == 6:  # chunks across message boundaries
        cuts = sorted(set(draw(anywhere)))
    else:  # everything at once
        cuts = []
    out: list[Item] = []
    for lo, hi in itertools.pairwise([0, *cuts, len(stream)]):
        if lo >= hi:
            continue
        fds = tuple(fd for f, at in zip(frames, anchors, strict=False) if lo <= at < hi
                    for fd in f.fds)
        out.append(Chunk(stream[lo:hi], fds))
    return out


@st.composite
def stream_cases(draw: st.DrawFn) -> StreamCase:
    device = draw(st.integers(0, 1))
    queue_size = draw(st.sampled_from([16, 16, 64, 2, 1, 3, 100]))
    frames: list[Frame] = []
    items: list[Item] = []

    def start() -> None:
        """A valid start, mostly: in one case out of four one message is mutated; the
        features may be any offered set (packed rings too); now and then the front-end
        negotiates again midway, or two messages come in the other order."""
        split = OFFERED[device] & ~NOT_SPLIT_FEATURES
        features = draw(st.one_of(st.just(split), st.just(split), st.just(
            split | 1 << Feature.RING_PACKED), st.integers(0, U64_MAX).map(
            lambda bits: bits & OFFERED[device] | VHOST_USER_F_PROTOCOL_FEATURES)))
        messages = handshake(device, queue_size, features)
        twist = draw(st.integers(0, 5))
        if twist == 0:
            at = draw(st.integers(0, len(messages)))
            messages.insert(at, (Request.SET_FEATURES, encode_u64(draw(features_of(device))), ()))
        elif twist == 1:
            i = draw(st.integers(0, len(messages) - 2))
            messages[i], messages[i + 1] = messages[i + 1], messages[i]
        broken = draw(st.integers(0, 4 * len(messages) - 1))
        for i, (request, payload, fds) in enumerate(messages):
            if i == broken:
                frames.append(draw(mutated(request, payload, fds)))
            else:
                frames.append(frame(request, payload, fds))

    if draw(st.integers(0, 4)) > 0:
        start()
    supported = st.sampled_from(sorted(VhostUserBackend(RngDevice())._handlers))
    unsupported = (st.sampled_from(list(Request)), st.integers(0, 60), u32)
    if draw(st.booleans()) and frames:  # the guest does I/O on the rings just set up
        items += chunks(draw, frames)
        frames = []
        for queue in draw(st.lists(st.integers(0, 1), max_size=4)):
            items.append(Publish(queue, draw(st.integers(0, 63)),
                                 draw(st.sampled_from([1, 16, 512, 4096]))))
            items.append(Kick(queue))
    for _ in range(draw(st.integers(0, 20))):
        what = draw(st.integers(0, 9))
        if what <= 4:
            pick = draw(st.integers(0, 15))
            request = draw(unsupported[pick] if pick < len(unsupported) else supported)
            payload, fds = draw(payloads(request, device))
            frames.append(draw(mutated(request, payload, fds)))
        elif what == 5:
            frames.append(Frame(draw(st.binary(min_size=1, max_size=24)),
                                tuple(draw(st.lists(fd_specs, max_size=2)))))
        else:
            items += chunks(draw, frames)
            frames = []
            if what == 6:
                items.append(Kick(draw(st.integers(0, 1))))
            elif what == 7:
                items.append(Publish(draw(st.integers(0, 1)), draw(st.integers(0, 63)),
                                     draw(st.sampled_from([1, 16, 512, 4096]))))
            elif what == 8:
                items.append(Poke(draw(st.integers(0, RAM_SIZE - 1)),
                                  draw(st.binary(min_size=1, max_size=16))))
            else:
                items.append(Hangup())
                if draw(st.booleans()):
                    start()  # the front-end reconnects
    items += chunks(draw, frames)
    return StreamCase(device, draw(st.integers(0, 255)), queue_size, tuple(items))


# -- replaying a case -----------------------------------------------------------------------------



class Connection:
    """The runtime's side of one front-end connection, minus the socket."""

    def __init__(self, case: StreamCase, backend: VhostUserBackend, ram_fd: int,
                 ram: mmap.mmap) -> None:
        self.case = case
        self.backend = backend
        self.ram_fd = ram_fd
        self.ram = ram
        self.decoder = MessageDecoder()
        self.avail_idx = [0, 0]
        #: The back-end dropped this connection: what the front-end still sends on it
        #: goes nowhere, until it reconnects (the next :class:`Hangup`).
        self.dropped = False

    def make_fd(self, spec: Fd) -> int:
        kind = FD_KINDS[spec.kind % len(FD_KINDS)]
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind == "ram":
            return os.dup(self.ram_fd)
        if kind == "memfd":
            return create_memfd(spec.size, "fuzz-small")
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            return r
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def drop(self, why: str) -> None:
        """What the runtime does when a connection ends or breaks the protocol."""
        event(f"vhost-user: connection dropped ({why})")
        self.decoder.discard()
        self.backend.disconnect()
        self.decoder = MessageDecoder()
        self.avail_idx = [0, 0]
        self.dropped = True

    def chunk(self, item: Chunk) -> None:
        if self.dropped:
            return
        self.decoder.feed(item.data, [self.make_fd(spec) for spec in item.fds])
        try:
            while (msg := self.decoder.next_message()) is not None:
                request, name = msg.request, msg.name
                reply = self.backend.handle(msg)
                # The runtime sends the fds a reply carries (GET_INFLIGHT_FD), then closes them.
                close_fds(list(reply.fds))
                if reply.error is not None:
                    if reply.data is not None:
                        check_reply(reply.data, None)
                    self.drop(type(reply.error).__name__)
                    return
                event(f"vhost-user: {name} handled")
                if reply.data is not None:
                    check_reply(reply.data, request)
        except PyVirtioError as exc:  # the decoder: a malformed header
            self.drop(type(exc).__name__)

    def publish(self, item: Publish) -> None:
        """Write a chain for queue ``item.queue`` as the handshake laid it out."""
        size = self.case.queue_size
        addrs = ring_addresses(QUEUE_STRIDE * (item.queue + 1), size)  # offsets in RAM
        head = item.head % size
        header, data = BUFFERS + 64 * head, BUFFERS + 0x2000
        self.ram[header : header + 16] = REQUEST_HEADER.pack(RequestType.IN, 0, 0)
        second = (head + 1) % size
        descs = [(head, RAM_GPA + header, 16, VIRTQ_DESC_F_NEXT, second),
                 (second, RAM_GPA + data, item.length + 1, VIRTQ_DESC_F_WRITE, 0)]
        if self.case.device == 1 or size == 1:  # rng: one writable buffer
            descs = [(head, RAM_GPA + data, item.length, VIRTQ_DESC_F_WRITE, 0)]
        for index, addr, length, flags, nxt in descs:
            self.ram[addrs.desc + 16 * index : addrs.desc + 16 * index + 16] = DESC.pack(
                addr, length, flags, nxt)
        idx = self.avail_idx[item.queue]
        slot = addrs.avail + 4 + 2 * (idx % size)
        self.ram[slot : slot + 2] = U16.pack(head)
        self.avail_idx[item.queue] = (idx + 1) & 0xFFFF
        self.ram[addrs.avail + 2 : addrs.avail + 4] = U16.pack(self.avail_idx[item.queue])

    def run(self) -> None:
        backend = self.backend
        for item in self.case.items:
            if isinstance(item, Chunk):
                self.chunk(item)
            elif isinstance(item, Kick):
                served = sum(s.requests for s in backend.device.stats)
                backend.kick(item.queue % len(backend.vrings))  # must not raise
                if sum(s.requests for s in backend.device.stats) > served:
                    event("vhost-user: a kick served requests")
                if backend.recheck_interval is not None:
                    backend.recheck()  # must not raise either
            elif isinstance(item, Publish):
                self.publish(item)
            elif isinstance(item, Poke):
                self.ram[item.offset : item.offset + len(item.data)] = item.data[
                    : RAM_SIZE - item.offset]
            else:
                if not self.dropped:
                    with suppress(PyVirtioError):
                        self.decoder.eof()
                    self.drop("hang-up")
                self.dropped = False  # and connects again


def check_reply(reply: bytes, request: int | None) -> None:
    """One complete reply message (to ``request``, when known)."""
    code, flags, size = HEADER.unpack_from(reply)
    assert request is None or code == request
    assert flags & FLAG_REPLY and flags & 0x3 == VERSION
    assert len(reply) == HEADER.size + size


def serves_again(backend: VhostUserBackend) -> None:
    """After ``disconnect`` a well-behaved front-end gets its requests served."""
    backend.disconnect()
    with guest_memory(((FRONTEND_GPA, FRONTEND_RAM),)) as guest:
        fe = Frontend(backend, guest)
        try:
            queues = len(backend.vrings)
            fe.start(queues=queues, size=8)
            for index in range(queues):
                if isinstance(backend.device, BlockDevice):
                    header = fe.put(REQUEST_HEADER.pack(RequestType.GET_ID, 0, 0))
                    head = fe.drivers[index].add([(header, 16)], [(fe.alloc(21), 21)])
                    assert fe.kick(index) == [(head, 21)]
                else:
                    head = fe.drivers[index].add(writable=[(fe.alloc(16), 16)])
                    assert fe.kick(index) == [(head, 16)]
            assert parse_reply(fe.send(Request.GET_VRING_BASE, encode_vring_state(0, 0)),
                               Request.GET_VRING_BASE) == encode_vring_state(0, 1)
        finally:
            backend.disconnect()
            fe.close()


@fuzz_target("vhost_user", stream_cases(), types=TYPES, quick_examples=250)
def test_vhost_user_stream_cannot_crash_leak_or_wedge_the_backend(case: StreamCase) -> None:
    """Whatever a front-end sends, the back-end raises only its own errors, leaks no fd,
    and serves the next well-behaved front-end."""
    device = make_device(case.device)
    try:
        fds_before = open_fds()
        ram_fd = create_memfd(RAM_SIZE, "fuzz-ram")
        ram = mmap.mmap(ram_fd, RAM_SIZE)
        try:
            # Rings start zeroed, as a driver sets them up; buffers hold garbage.
            ram[BUFFERS:] = bytes([case.fill]) * (RAM_SIZE - BUFFERS)
            backend = VhostUserBackend(device)
            connection = Connection(case, backend, ram_fd, ram)
            try:
                connection.run()
            finally:
                connection.decoder.discard()
                backend.disconnect()
        finally:
            ram.close()
            os.close(ram_fd)
        # New fds only: one closed meanwhile was some earlier test's garbage being collected.
        assert not open_fds() - fds_before, "file descriptors leaked"
        serves_again(backend)
        assert not open_fds() - fds_before, "file descriptors leaked"
    finally:
        device.close()
