"""Fuzz target: virtio-net driven by a hostile driver on every queue, and by its back end.

A case is a device (one or two queue pairs, an MTU, a frame back end or an offload
back end like a tap's, the features the driver accepts out of those offered, the
queue size, whether the front-end starts every ring the device has or only those
the features give the driver) and a list of operations, interleaved at random:

- **transmit**: a chain holding any ``virtio_net_hdr`` bytes (cut short or not), a
  frame of any length (0, runts, beyond the MTU, beyond 64 KiB), cut into
  descriptors at any points, sometimes with writable descriptors after it, directly
  or through an indirect table;
- **receive buffers**: chains of writable descriptors of any sizes (0, shorter than
  the header, page-sized, huge), sometimes after a readable one, posted several at
  a time, with or without a kick; with MRG_RXBUF the device must wait for more when
  too few are posted (it rewinds) and take them when they come;
- **control**: any class, command and data (plausible commands and junk, commands
  longer than the device reads), with 0-3 writable bytes for the ack, or a chain of
  only writable buffers;
- **raw descriptor abuse** on any queue: a ``next`` beyond the table, loops, buffers
  outside guest RAM, a readable descriptor after a writable one, every kind of bad
  indirect table, a head beyond the table;
- **frames from the back end** (``deliver`` / ``deliver_packets``) of any size,
  for the device's MAC or not, VLAN-tagged or not, with any offload header;
- kicks of any queue, and the front-end disabling and enabling rings (as QEMU applies
  the pairs in use); any operation may go to a queue other than its own.

Everything runs through the real :class:`~pyvirtio.vhost_user.backend.VhostUserBackend`
with the unit tests' in-process :class:`Frontend` (rings in real guest memory, two
adjacent memfd regions so buffers may straddle them); after each operation the
queues a drain left with work are run again, as the runtime's loop does.  A model
of VIRTIO 1.4 §5.1 (and §2.7 for the rings) follows every operation and predicts,
per queue, the used elements the driver must see next; the receive filter and the
pairs in use are taken from the device (the control commands have their own
property test, tests/unit/test_net_ctrl.py).  Invariants, checked after every
operation:

- only :class:`~pyvirtio.errors.PyVirtioError` escapes; nothing is logged with a
  traceback;
- the used elements of every queue are exactly the model's (ids, lengths, order):
  a receive buffer holds the header (``num_buffers`` the number of buffers of the
  frame, every buffer but the last full) and exactly a frame the back end
  delivered, in delivery order per queue, never part of one; the driver never
  sees a partial frame; bytes beyond the used length are untouched; a transmit
  or rule-breaking chain comes back with length 0;
- a control chain comes back with length 1 and an ack of 0 or 1 when it has the
  command head and a writable byte (and CTRL_VQ was negotiated), else 0;
- the back end gets exactly the frames (and headers) the model accepts, in order;
- the counters agree with the model (violations, drops, filtered frames, merged
  frames, GSO packets, bytes, commands), and frames delivered by the back end =
  frames the driver received + dropped + filtered + still waiting.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from hypothesis import event
from hypothesis import strategies as st

from pyvirtio.devices.net import (
    GSO_MAX_FRAME,
    STEERING_FLOWS,
    NetDevice,
    NetDeviceConfig,
    flow_hash,
    flow_key,
)
from pyvirtio.devices.net import rx as net_module
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import (
    ETH_HLEN,
    GSO_ECN,
    HDR,
    HDR_SIZE,
    HDR_SIZE_LEGACY,
    CtrlClass,
    CtrlMq,
    GsoType,
    HdrFlag,
    NetFeature,
    NetHeader,
)
from pyvirtio.spec.virtqueue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.testing import FRONTEND_GPA, NOT_SPLIT_FEATURES, Frontend, guest_memory
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    Request,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

from ..unit.test_net_device import MAC, Host, ListBackend
from ..unit.test_net_offload import PacketBackend
from .conftest import fuzz_target

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
#: Guest RAM: two adjacent regions (two memfds); rings at the start (Frontend.setup_queue).
REGION = 0x100000
LAYOUT = ((FRONTEND_GPA, REGION), (FRONTEND_GPA + REGION, REGION))
RAM_END = FRONTEND_GPA + 2 * REGION
#: Buffers and indirect tables live here (first fit, freed when the device uses them).
DATA_START = FRONTEND_GPA + 0x40000
#: Addresses no region backs (below RAM, across its end, at the top of the space).
OUTSIDE = (0, FRONTEND_GPA - 0x1000, RAM_END - 8, RAM_END, 1 << 63, (1 << 64) - 16)
SENTINEL = 0xEE
NEW_MAC = bytes.fromhex("02000000abcd")
OTHER_MAC = bytes.fromhex("020000000099")
MULTICAST = bytes.fromhex("01005e000001")
DESTINATIONS = (MAC, b"\xff" * 6, MULTICAST, OTHER_MAC, NEW_MAC)
OUR_IP, PEER_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
#: Features the strategy turns on and off (the rest of what is offered stays on).
CHOSEN_BITS = (
    Feature.VERSION_1, Feature.INDIRECT_DESC, Feature.EVENT_IDX, NetFeature.MRG_RXBUF,
    NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN,
    NetFeature.CTRL_MAC_ADDR, NetFeature.GUEST_ANNOUNCE, NetFeature.MQ, NetFeature.CSUM,
    NetFeature.GUEST_CSUM, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN,
    NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN,
)
ALL_CHOSEN = (1 << len(CHOSEN_BITS)) - 1
NO_MRG = 1 << CHOSEN_BITS.index(NetFeature.MRG_RXBUF)
#: What QEMU leaves a vhost-user back end: it keeps the control queue to itself.
NO_CTRL = sum(1 << CHOSEN_BITS.index(bit) for bit in (
    NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN,
    NetFeature.CTRL_MAC_ADDR))
VQ_PAIRS_SET = bytes([CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET])
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")


# -- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hdr:
    """The fields of a ``virtio_net_hdr`` (any values)."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def header(self) -> NetHeader:
        return NetHeader(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                         self.csum_start, self.csum_offset, self.num_buffers)


@dataclass(frozen=True)
class FrameSpec:
    """A frame: ``length`` bytes (cut anywhere) of a destination (:data:`DESTINATIONS`),
    an EtherType kind (0 IPv4/TCP, 1 VLAN-tagged IPv4, 2 ARP, 3 IPv6/UDP), a flow.

    A negative ``length`` picks a boundary.  Received: relative to the buffers
    available on receiveq1, so that frames fill them exactly, or by a byte more or
    less: -1..-3 the first one's room after the header (+1, 0, -1), -4..-6 all of them
    together.  Sent: -1..-6 a runt, 14 bytes, MTU + 18 (+1), :data:`GSO_MAX_FRAME` (+1).
    """

    length: int
    dst: int
    eth: int
    vid: int
    flow: int
    hdr: Hdr  # the offload header it comes with from an offload back end


@dataclass(frozen=True)
class Transmit:
    """A transmit chain: the header's first ``hdr_cut`` bytes (None: the negotiated
    header size), then the frame, cut at ``cuts``; ``writable`` descriptors after."""

    pair: int
    stray: int | None  # a raw queue index instead of the pair's transmit queue
    hdr: Hdr
    hdr_cut: int | None
    frame: FrameSpec
    cuts: tuple[int, ...]
    writable: tuple[int, ...]
    indirect: bool
    straddle: bool
    kick: bool


@dataclass(frozen=True)
class PostRx:
    """``repeat`` receive chains of writable descriptors of ``lengths`` bytes, after a
    readable one of ``readable`` bytes if not 0.  A negative length is relative to the
    frame waiting for the queue (-1..-3: header and frame, +1, 0, -1 bytes)."""

    pair: int
    stray: int | None
    lengths: tuple[int, ...]
    readable: int
    repeat: int
    indirect: bool
    straddle: bool
    kick: bool


@dataclass(frozen=True)
class Control:
    """A control chain: class, command, data (+ ``pad`` zero bytes), cut at ``cuts``,
    then ``ack_len`` writable bytes; with ``only_writable`` every buffer is writable."""

    stray: int | None
    cls: int
    command: int
    data: bytes
    pad: int
    cuts: tuple[int, ...]
    ack_len: int
    only_writable: bool
    indirect: bool
    kick: bool


@dataclass(frozen=True)
class Raw:
    """A chain that breaks §2.7 (``kind``: 0 next beyond the table, 1 a loop, 2 a buffer
    outside RAM, 3 readable after writable, 4 a bad indirect table, 5 a head beyond the
    table), on the queue of ``role`` (0 receive, 1 transmit, 2 control) or ``stray``."""

    kind: int
    variant: int
    role: int
    pair: int
    stray: int | None
    write: bool
    kick: bool


@dataclass(frozen=True)
class Deliver:
    """The back end hands frames to the device (with their headers from an offload
    back end unless ``plain``); ``flood`` more copies of the first one."""

    frames: tuple[FrameSpec, ...]
    plain: bool
    flood: int


@dataclass(frozen=True)
class Kick:
    queue: int


@dataclass(frozen=True)
class Enable:
    """The front-end's SET_VRING_ENABLE for a ring it started."""

    queue: int
    on: bool


Op = Transmit | PostRx | Control | Raw | Deliver | Kick | Enable


@dataclass(frozen=True)
class NetCase:
    pairs: int
    mtu: int
    offload: bool
    features: int  # bit i: CHOSEN_BITS[i] accepted (where offered)
    queue_size: int
    setup_all: bool  # start every ring of the device, not only the driver's
    ops: tuple[Op, ...]


TYPES = (NetCase, Hdr, FrameSpec, Transmit, PostRx, Control, Raw, Deliver, Kick, Enable)

u16s = st.integers(0, 0xFFFF)
bytes8 = st.integers(0, 0xFF)
raw_hdrs = st.builds(
    Hdr,
    flags=st.one_of(st.sampled_from([0, 0, 1, 2, 3, 4, 8, 0xFF]), bytes8),
    gso_type=st.one_of(st.sampled_from([0, 0, 1, 4, 0x81, 0x84, 3, 5, 0x80]), bytes8),
    hdr_len=st.one_of(st.sampled_from([0, 14, 54, 74, 1500, 0xFFFF]), u16s),
    gso_size=st.one_of(st.sampled_from([0, 1, 1448, 0xFFFF]), u16s),
    csum_start=st.one_of(st.sampled_from([0, 14, 34, 54, 1498, 0xFFFF]), u16s),
    csum_offset=st.one_of(st.sampled_from([0, 6, 16, 0xFFFF]), u16s),
    num_buffers=st.one_of(st.just(0), u16s),
)
#: Headers a correct driver or tap sends: none, a partial checksum, TSO (ECN or not).
good_hdrs = st.one_of(
    st.just(Hdr()),
    st.builds(Hdr, flags=st.just(HdrFlag.NEEDS_CSUM), csum_start=st.just(34),
              csum_offset=st.sampled_from([6, 16])),
    st.builds(Hdr, flags=st.sampled_from([HdrFlag.NEEDS_CSUM, HdrFlag.DATA_VALID]),
              gso_type=st.sampled_from([GsoType.TCPV4, GsoType.TCPV6, GsoType.TCPV4 | GSO_ECN]),
              hdr_len=st.sampled_from([54, 74]), gso_size=st.sampled_from([1448, 536, 0]),
              csum_start=st.sampled_from([34, 54]), csum_offset=st.just(16)),
)
hdrs = st.one_of(st.just(Hdr()), st.just(Hdr()), good_hdrs, raw_hdrs)
frame_lengths = st.one_of(
    st.integers(-6, -1),
    st.sampled_from([0, 1, 13, 14, 15, 60, 64, 86, 87, 1514, 1518, 1519, 4096, 9018, 9019,
                     GSO_MAX_FRAME, GSO_MAX_FRAME + 1]),
    st.integers(14, 200),
    st.integers(14, 1514),
    st.integers(0, 2000),
    st.integers(0, GSO_MAX_FRAME + 100),
)
frame_specs = st.builds(
    FrameSpec,
    length=frame_lengths,
    dst=st.sampled_from([0, 0, 0, 1, 2, 3, 4]),
    eth=st.sampled_from([0, 0, 1, 2, 3]),
    vid=st.sampled_from([0, 5, 4095]),
    flow=st.integers(0, 3),
    hdr=hdrs,
)
cuts = st.lists(st.one_of(st.integers(0, 20), st.integers(0, 70000)), max_size=4).map(
    lambda c: tuple(sorted(c)))
pairs_ = st.integers(0, 1)
strays = st.one_of(st.none(), st.none(), st.none(), st.none(), st.integers(0, 4))
rx_lengths = st.one_of(
    st.integers(-3, -1),
    st.sampled_from([1526, 1536, 4096, 65620]),  # what Linux posts
    st.sampled_from([0, 1, 10, 11, 12, 13, 64, 100, 9100, 70000]),
    st.integers(0, 2000),
)

transmits = st.builds(
    Transmit,
    pair=pairs_,
    stray=strays,
    hdr=hdrs,
    hdr_cut=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 14)),
    frame=st.one_of(frame_specs, frame_specs.map(  # mostly frames the device sends on
        lambda f: replace(f, length=14 + f.length % 1500 if f.length >= 0 else f.length))),
    cuts=cuts,
    writable=st.one_of(st.just(()), st.just(()), st.lists(st.sampled_from([0, 1, 16, 64]),
                                                          min_size=1, max_size=2).map(tuple)),
    indirect=st.integers(0, 3).map(lambda n: n == 0),
    straddle=st.integers(0, 7).map(lambda n: n == 0),
    kick=st.integers(0, 5).map(lambda n: n > 0),
)
post_rxs = st.builds(
    PostRx,
    pair=pairs_,
    stray=strays,
    lengths=st.lists(rx_lengths, min_size=1, max_size=3).map(tuple),
    readable=st.one_of(st.just(0), st.just(0), st.just(0), st.sampled_from([0, 1, 12, 32])),
    repeat=st.one_of(st.integers(1, 3), st.integers(1, 12)),
    indirect=st.integers(0, 3).map(lambda n: n == 0),
    straddle=st.integers(0, 7).map(lambda n: n == 0),
    kick=st.integers(0, 3).map(lambda n: n > 0),
)


def mac_table(uni: list[bytes], multi: list[bytes], lie: int) -> bytes:
    return (U32.pack(len(uni) + lie) + b"".join(uni) + U32.pack(len(multi))
            + b"".join(multi))


macs = st.sampled_from([MAC, OTHER_MAC, NEW_MAC, MULTICAST, b"\x33\x33\x00\x00\x00\x01"])
commands = st.one_of(
    st.tuples(st.just(0), st.integers(0, 6), st.sampled_from([b"\0", b"\1", b"", b"\2", b"\0\0"])),
    st.tuples(st.just(1), st.just(0), st.builds(mac_table, st.lists(macs, max_size=3),
                                                st.lists(macs, max_size=3),
                                                st.sampled_from([0, 0, 0, 1, 65]))),
    st.tuples(st.just(1), st.just(0), st.just(mac_table([OTHER_MAC] * 65, [], 0))),
    st.tuples(st.just(1), st.integers(0, 2), st.sampled_from([NEW_MAC, MAC, MULTICAST,
                                                               NEW_MAC[:5]])),
    st.tuples(st.just(2), st.integers(0, 2),
              st.sampled_from([0, 5, 4095, 4096, 0xFFFF]).map(U16.pack)),
    st.tuples(st.just(3), st.integers(0, 1), st.sampled_from([b"", b"x"])),
    st.tuples(st.just(4), st.integers(0, 1), st.integers(0, 3).map(U16.pack)),
    st.tuples(st.just(4), st.just(0), st.just(U16.pack(2))),
    st.tuples(bytes8, bytes8, st.binary(max_size=20)),
)


@st.composite
def controls(draw: st.DrawFn) -> Control:
    cls, command, data = draw(commands)
    return Control(
        stray=draw(strays),
        cls=cls,
        command=command,
        data=data,
        pad=draw(st.sampled_from([0] * 15 + [65540])),
        cuts=draw(st.lists(st.integers(0, 8), max_size=3).map(lambda c: tuple(sorted(c)))),
        ack_len=draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3])),
        only_writable=draw(st.integers(0, 9).map(lambda n: n == 0)),
        indirect=draw(st.integers(0, 3).map(lambda n: n == 0)),
        kick=draw(st.integers(0, 5).map(lambda n: n > 0)),
    )


raws = st.builds(
    Raw,
    kind=st.sampled_from([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5]),
    variant=st.integers(0, 255),
    role=st.integers(0, 2),
    pair=pairs_,
    stray=strays,
    write=st.booleans(),
    kick=st.integers(0, 3).map(lambda n: n > 0),
)
delivers = st.builds(
    Deliver,
    frames=st.lists(frame_specs, min_size=1, max_size=5).map(tuple),
    plain=st.integers(0, 3).map(lambda n: n == 0),
    flood=st.sampled_from([0] * 19 + [300]),
)
kicks = st.builds(Kick, st.integers(0, 4))
enables = st.builds(Enable, st.integers(0, 4), st.integers(0, 3).map(lambda n: n > 0))
ops = st.one_of(post_rxs, delivers, transmits, post_rxs, delivers, controls(), raws, kicks,
                enables)

@st.composite
def net_cases(draw: st.DrawFn) -> NetCase:
    count = draw(st.integers(3, 40))  # hypothesis' own list lengths stay short
    return NetCase(
        pairs=draw(st.sampled_from([1, 1, 2])),
        mtu=draw(st.sampled_from([1500, 1500, 68, 9000])),
        offload=draw(st.booleans()),
        features=draw(st.one_of(st.just(ALL_CHOSEN), st.just(ALL_CHOSEN & ~NO_MRG),
                                st.just(ALL_CHOSEN & ~NO_CTRL), st.integers(0, ALL_CHOSEN))),
        queue_size=draw(st.sampled_from([4, 8, 16, 16, 32, 64])),
        setup_all=draw(st.booleans()),
        ops=tuple(draw(st.lists(ops, min_size=count, max_size=count))),
    )


# -- frames ---------------------------------------------------------------------------------------


def pattern(length: int, seed: int) -> bytes:
    block = bytes((seed * 7 + 31 * i) & 0xFF for i in range(256))
    return (block * (length // 256 + 1))[:length]


def build_frame(spec: FrameSpec, seq: int, *, outgoing: bool) -> bytes:
    """The frame ``spec`` describes; ``seq`` makes it unique (source MAC), ``outgoing``
    turns the flow around (the driver's frames are the reverse flows of received ones)."""
    src_ip, dst_ip = (OUR_IP, PEER_IP) if outgoing else (PEER_IP, OUR_IP)
    ports = (U16.pack(2000) + U16.pack(1000 + spec.flow) if outgoing
             else U16.pack(1000 + spec.flow) + U16.pack(2000))
    dst = DESTINATIONS[spec.dst]
    src = MAC if outgoing else b"\x02" + seq.to_bytes(5, "big")
    if spec.eth in (0, 1):
        tag = b"\x81\x00" + U16.pack(spec.vid)[::-1] if spec.eth == 1 else b""
        total = U16.pack(min(max(spec.length - 14, 20), 0xFFFF))[::-1]
        ip = bytes([0x45, 0]) + total + bytes([0, 0, 0, 0, 64, 6, 0, 0]) + src_ip + dst_ip
        head = dst + src + tag + b"\x08\x00" + ip + ports
    elif spec.eth == 2:
        head = dst + src + b"\x08\x06"
    else:
        ip6 = (b"\x60\0\0\0\0\x20" + bytes([17, 64]) + src_ip * 4 + dst_ip * 4)
        head = dst + src + b"\x86\xdd" + ip6 + ports
    frame = head + pattern(max(spec.length - len(head), 0), seq)
    return frame[: spec.length]


# -- the driver side ------------------------------------------------------------------------------


class Space:
    """First-fit allocator of buffer space in guest RAM (freed when buffers come back)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.used: dict[int, int] = {}  # start -> end

    def alloc(self, length: int, near: int | None = None) -> int | None:
        size = (max(length, 1) + 15) & ~15
        spans = sorted(self.used.items())
        if near is not None:  # straddle a region boundary if that space is free
            at = (near - size // 2) & ~15
            if all(at + size <= a or b <= at for a, b in spans) and self.start <= at:
                self.used[at] = at + size
                return at
        cursor = self.start
        for a, b in spans:
            if a - cursor >= size:
                break
            cursor = max(cursor, b)
        if cursor + size > self.end:
            return None
        self.used[cursor] = cursor + size
        return cursor

    def free(self, gpa: int) -> None:
        del self.used[gpa]


@dataclass
class Posted:
    """One chain the driver made available, and what the model knows about it."""

    head: int
    descs: list[int]  # descriptor indices, freed when the chain is used
    allocs: list[int]  # buffer space, freed then too
    bad: bool  # breaks §2.7: the device must return it with length 0 (or lose it)
    readable: bytes = b""
    readable_descs: int = 0
    writable: list[tuple[int, int]] = field(default_factory=list)  # (GPA, length)
    writable_descs: int = 0
    note: str = ""

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass
class Used:
    """A used element the driver must see: the chain, its length, and what its first
    ``length`` writable bytes hold (None: a control ack, checked on its own)."""

    posted: Posted
    length: int
    data: bytes | None = None
    ack: int | None = None  # the ack the model knows (a command too long to read)


@dataclass
class Frame:
    header: NetHeader | None
    data: bytes


@dataclass
class Counts:
    violations: int = 0
    dropped: int = 0
    filtered: int = 0
    merged: int = 0
    gso: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    acks_ok: int = 0
    acks_err: int = 0


class Queue:
    """One ring: the driver's side (descriptors, the ring writer) and the model of the
    device's side (chains available and not popped, popped and used counts)."""

    def __init__(self, index: int, driver: DriverSplitQueue) -> None:
        self.index = index
        self.driver = driver
        self.size = driver.size
        self.free = list(range(driver.size))
        self.outstanding: dict[int, Posted] = {}
        self.in_ring = 0  # entries published and not seen used (lost heads included)
        # the device, as the model sees it
        self.avail: deque[Posted] = deque()
        self.popped = 0
        self.used = 0
        self.expected: list[Used] = []

    def pop(self) -> Posted:
        self.popped += 1
        return self.avail.popleft()

    def rewind(self, chains: list[Posted]) -> None:
        self.popped -= len(chains)
        self.avail.extendleft(reversed(chains))

    def use(self, posted: Posted, length: int, data: bytes | None = None,
            ack: int | None = None) -> None:
        self.used += 1
        self.expected.append(Used(posted, length, data, ack))


# -- running a case -------------------------------------------------------------------------------


class Runner:
    """Applies a case to the device (through the front-end) and to the model."""

    def __init__(self, case: NetCase, fe: Frontend, device: NetDevice,
                 back: ListBackend | PacketBackend) -> None:
        self.case = case
        self.fe = fe
        self.device = device
        self.back = back
        self.memory = fe.memory
        self.space = Space(DATA_START, RAM_END)
        offered = device.offered_features() & ~NOT_SPLIT_FEATURES
        dropped = sum(1 << bit for i, bit in enumerate(CHOSEN_BITS) if not case.features >> i & 1)
        self.features = offered & ~dropped
        self.mrg = self.has(NetFeature.MRG_RXBUF)
        self.hsize = HDR_SIZE if self.has(Feature.VERSION_1) or self.mrg else HDR_SIZE_LEGACY
        self.indirect = self.has(Feature.INDIRECT_DESC)
        mq = self.has(NetFeature.MQ)
        self.driver_pairs = case.pairs if mq else 1
        self.ctrl = 2 * case.pairs if mq else 2
        self.num_queues = 2 * case.pairs + 1
        self.max_frame = case.mtu + 18
        self.queues: dict[int, Queue] = {}
        self.enabled: set[int] = set()
        self.backlogs: list[deque[Frame]] = [deque() for _ in range(case.pairs)]
        self.counts = [Counts() for _ in range(self.num_queues)]
        self.sent: list[object] = []
        self.steering: dict[bytes, int] = {}
        self.pairs_in_use = 1  # VQ_PAIRS_SET (§5.1.9.5.6); 1 after feature negotiation
        self.seq = 0
        self.delivered = 0
        self.received = 0  # frames the driver reassembled from its receive queues

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        fe = self.fe
        fe.negotiate(self.features | VHOST_USER_F_PROTOCOL_FEATURES)
        assert self.device.features == self.features
        fe.set_mem_table()
        count = self.num_queues if self.case.setup_all else self.ctrl + 1
        for index in range(count):
            self.queues[index] = Queue(index, fe.setup_queue(index, self.case.queue_size))
            self.enabled.add(index)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def role(self, q: int) -> str:
        """What queue ``q`` is with the negotiated features (§5.1.2)."""
        if q == self.ctrl:
            return "ctrl"
        if q > self.ctrl:
            return "none"
        return "tx" if q % 2 else "rx"

    def target(self, pair: int, stray: int | None, offset: int) -> Queue | None:
        if stray is not None:
            return self.queues.get(stray % self.num_queues)
        return self.queues.get(2 * (pair % self.driver_pairs) + offset)

    # -- the driver: building chains ------------------------------------------------------------

    def buffer(self, data: bytes, length: int, straddle: bool, allocs: list[int]) -> int | None:
        gpa = self.space.alloc(length, FRONTEND_GPA + REGION if straddle else None)
        if gpa is None:
            return None
        allocs.append(gpa)
        self.memory.write(gpa, data if data else bytes([SENTINEL]) * length)
        return gpa

    def release(self, queue: Queue, descs: list[int], allocs: list[int]) -> None:
        queue.free.extend(descs)
        for gpa in allocs:
            self.space.free(gpa)

    def publish(self, queue: Queue, descs: list[tuple[int, int, int]], *, indirect: bool,
                allocs: list[int], readable: bytes = b"", note: str = "") -> Posted | None:
        """Write a chain of (GPA, length, flags) and make it available; None when the
        driver has no room (descriptors, ring entries or buffer space)."""
        if not descs:
            gpa = self.space.alloc(0)
            if gpa is None:
                self.release(queue, [], allocs)
                return None
            allocs.append(gpa)
            descs = [(gpa, 0, 0)]
        need = 1 if indirect else len(descs)
        if need > len(queue.free) or queue.in_ring >= queue.size:
            self.release(queue, [], allocs)
            event("driver: ring full, chain not posted")
            return None
        ids = [queue.free.pop() for _ in range(need)]
        links = [(gpa, n, flags | (NEXT if i < len(descs) - 1 else 0))
                 for i, (gpa, n, flags) in enumerate(descs)]
        if indirect:
            table = self.space.alloc(16 * len(links))
            if table is None:
                self.release(queue, ids, allocs)
                return None
            allocs.append(table)
            self.memory.write(table, b"".join(DESC.pack(g, n, f, i + 1)
                                              for i, (g, n, f) in enumerate(links)))
            queue.driver.write_desc(ids[0], table, 16 * len(links), INDIRECT)
        else:
            for i, (gpa, n, flags) in enumerate(links):
                queue.driver.write_desc(ids[i], gpa, n, flags, ids[(i + 1) % len(ids)])
        seen_writable = False
        misordered = False
        for _, _, flags in descs:
            seen_writable |= bool(flags & WRITE)
            misordered |= seen_writable and not flags & WRITE
        bad = misordered or (indirect and (not self.indirect or len(descs) > queue.size))
        posted = Posted(
            head=ids[0], descs=ids, allocs=allocs, bad=bad, readable=readable,
            readable_descs=sum(1 for _, _, f in descs if not f & WRITE),
            writable=[(g, n) for g, n, f in descs if f & WRITE],
            writable_descs=sum(1 for _, _, f in descs if f & WRITE), note=note,
        )
        self.make_available(queue, posted)
        return posted

    def make_available(self, queue: Queue, posted: Posted) -> None:
        queue.driver.publish(posted.head)
        queue.in_ring += 1
        if posted.head < queue.size:
            queue.outstanding[posted.head] = posted
        queue.avail.append(posted)

    def transmit(self, op: Transmit) -> None:
        queue = self.target(op.pair, op.stray, 1)
        if queue is None:
            return
        header = HDR.pack(op.hdr.flags, op.hdr.gso_type, op.hdr.hdr_len, op.hdr.gso_size,
                          op.hdr.csum_start, op.hdr.csum_offset, op.hdr.num_buffers)
        header = header[: self.hsize if op.hdr_cut is None else op.hdr_cut]
        spec = op.frame
        if spec.length < 0:
            limits = (13, 14, self.max_frame, self.max_frame + 1, GSO_MAX_FRAME,
                      GSO_MAX_FRAME + 1)
            spec = replace(spec, length=limits[-spec.length - 1])
        readable = header + build_frame(spec, self.next_seq(), outgoing=True)
        allocs: list[int] = []
        descs: list[tuple[int, int, int]] = []
        bounds = [0, *(min(c, len(readable)) for c in op.cuts), len(readable)]
        for a, b in itertools.pairwise(bounds):
            gpa = self.buffer(readable[a:b], b - a, op.straddle, allocs)
            if gpa is None:
                self.release(queue, [], allocs)
                return
            descs.append((gpa, b - a, 0))
        for n in op.writable:
            gpa = self.buffer(b"", n, False, allocs)
            if gpa is None:
                self.release(queue, [], allocs)
                return
            descs.append((gpa, n, WRITE))
        self.publish(queue, descs, indirect=op.indirect, allocs=allocs, readable=readable,
                     note="transmit")
        if op.kick:
            self.kick(queue.index)

    def post_rx(self, op: PostRx) -> None:
        queue = self.target(op.pair, op.stray, 0)
        if queue is None:
            return
        for nth in range(op.repeat):
            if not self.post_rx_chain(queue, op, nth):
                break
        if op.kick:
            self.kick(queue.index)

    def post_rx_chain(self, queue: Queue, op: PostRx, nth: int) -> bool:
        """Post the ``nth`` chain of ``op``; False when the driver has no room left."""
        allocs: list[int] = []
        descs: list[tuple[int, int, int]] = []
        if op.readable:
            gpa = self.buffer(pattern(op.readable, 3), op.readable, False, allocs)
            if gpa is None:
                return False
            descs.append((gpa, op.readable, 0))
        backlog = self.backlogs[queue.index // 2] if queue.index < 2 * self.case.pairs else None
        for length in op.lengths:
            n = length
            if n < 0:  # fit the nth frame waiting (or the last, or a 50-byte frame)
                frame = backlog[min(nth, len(backlog) - 1)].data if backlog else bytes(50)
                n = self.hsize + len(frame) + length + 2
            gpa = self.buffer(b"", n, op.straddle, allocs)
            if gpa is None:
                self.release(queue, [], allocs)
                return False
            descs.append((gpa, n, WRITE))
        posted = self.publish(queue, descs, indirect=op.indirect, allocs=allocs,
                              readable=pattern(op.readable, 3), note="receive")
        return posted is not None

    def control(self, op: Control) -> None:
        queue = self.queues.get(self.ctrl if op.stray is None else op.stray % self.num_queues)
        if queue is None:
            return
        command = bytes([op.cls, op.command]) + op.data + bytes(op.pad)
        allocs: list[int] = []
        descs: list[tuple[int, int, int]] = []
        flags = WRITE if op.only_writable else 0
        bounds = [0, *(min(c, len(command)) for c in op.cuts), len(command)]
        for a, b in itertools.pairwise(bounds):
            gpa = self.buffer(b"" if op.only_writable else command[a:b], b - a, False, allocs)
            if gpa is None:
                self.release(queue, [], allocs)
                return
            descs.append((gpa, b - a, flags))
        if op.ack_len:
            gpa = self.buffer(b"", op.ack_len, False, allocs)
            if gpa is None:
                self.release(queue, [], allocs)
                return
            descs.append((gpa, op.ack_len, WRITE))
        self.publish(queue, descs, indirect=op.indirect, allocs=allocs,
                     readable=b"" if op.only_writable else command, note="control")
        if op.kick:
            self.kick(queue.index)

    def raw(self, op: Raw) -> None:
        """Write a chain that breaks a rule of §2.7 and make it available."""
        if op.stray is not None:
            queue = self.queues.get(op.stray % self.num_queues)
        elif op.role == 2:
            queue = self.queues.get(self.ctrl)
        else:
            queue = self.target(op.pair, None, op.role)
        if queue is None:
            return
        size, v = queue.size, op.variant
        flag = WRITE if op.write else 0
        if op.kind == 5:  # a head beyond the table: nothing to give back
            if queue.in_ring >= size:
                return
            posted = Posted(head=size + v, descs=[], allocs=[], bad=True, note="head")
            self.make_available(queue, posted)
            event("raw: head beyond the table")
        else:
            need = 2 if (op.kind == 1 and v % 2) or op.kind == 3 else 1
            if need > len(queue.free) or queue.in_ring >= size:
                return
            allocs: list[int] = []
            buf = self.space.alloc(16)
            if buf is None:
                return
            allocs.append(buf)
            ids = [queue.free.pop() for _ in range(need)]
            write = queue.driver.write_desc
            if op.kind == 0:
                write(ids[0], buf, 16, flag | NEXT, size + v % 3)
            elif op.kind == 1:
                write(ids[0], buf, 16, flag | NEXT, ids[-1])
                write(ids[-1], buf, 16, flag | NEXT, ids[0])
            elif op.kind == 2:
                write(ids[0], OUTSIDE[v % len(OUTSIDE)], 16 + v, flag)
            elif op.kind == 3:
                write(ids[0], buf, 16, WRITE | NEXT, ids[1])
                write(ids[1], buf, 16, 0)
            else:
                variant = v % 6
                entries = size + 1 if variant == 4 else 1
                table = self.space.alloc(16 * entries)
                if table is None:
                    self.release(queue, ids, allocs)
                    return
                allocs.append(table)
                inner = INDIRECT if variant == 0 else flag
                self.memory.write(table, b"".join(
                    DESC.pack(buf, 16, inner | (NEXT if i < entries - 1 else 0), i + 1)
                    for i in range(entries)))
                length = {2: 0, 3: 24, 4: 16 * entries}.get(variant, 16)
                addr = OUTSIDE[0] if variant == 5 else table
                write(ids[0], addr, length, INDIRECT | (NEXT if variant == 1 else 0), 0)
            posted = Posted(head=ids[0], descs=ids, allocs=allocs, bad=True,
                            note=f"raw {op.kind}")
            self.make_available(queue, posted)
            event(f"raw: kind {op.kind}")
        if op.kick:
            self.kick(queue.index)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- the back end ---------------------------------------------------------------------------

    def frame_length(self, length: int) -> int:
        """A :class:`FrameSpec` length, negative ones made relative to receiveq1's buffers."""
        if length >= 0:
            return length
        queue = self.queues.get(0)
        chains = list(queue.avail) if queue is not None else []
        room = chains[0].writable_len if length >= -3 and chains else sum(
            c.writable_len for c in chains)
        fit = room - self.hsize + (length + 2 if length >= -3 else length + 5)
        return min(max(fit, 0), GSO_MAX_FRAME + 1)

    def deliver(self, op: Deliver) -> None:
        specs = [replace(spec, length=self.frame_length(spec.length)) for spec in op.frames]
        specs += [replace(specs[0], length=min(specs[0].length, 128))] * op.flood
        frames = [(spec.hdr.header(), build_frame(spec, self.next_seq(), outgoing=False))
                  for spec in specs]
        packets = isinstance(self.back, PacketBackend) and not op.plain
        self.delivered += len(frames)
        # The model first; the filter is the device's (it changes only with control
        # commands, between operations).
        ready = self.ready_rx_queues()
        good: list[tuple[int, Frame]] = []
        for header, data in frames:
            q = self.steer(data, ready)
            ok = self.rx_acceptable(header, len(data)) if packets else (
                ETH_HLEN <= len(data) <= self.max_frame)
            if ok:
                good.append((q, Frame(header if packets else None, data)))
            else:
                self.counts[q].dropped += 1
        rx_filter = self.device.rx_filter
        for q, frame in good:
            if rx_filter is not None and rx_filter.reject(frame.data) is not None:
                event("rx: filtered")
                self.counts[q].filtered += 1
            elif len(self.backlogs[q // 2]) >= net_module.RX_BACKLOG:
                self.counts[q].dropped += 1
            else:
                self.backlogs[q // 2].append(frame)
        for index, backlog in enumerate(self.backlogs):
            if backlog:
                self.process(2 * index)
        if packets:
            self.device.deliver_packets(frames)
        else:
            self.device.deliver([data for _, data in frames])

    def ready_rx_queues(self) -> list[int]:
        """§5.1.2, §5.1.9.5.6: one pair without MQ; with it, the pairs VQ_PAIRS_SET chose
        (with CTRL_VQ) or all (the front-end enables those in use), among the started.
        The filter is the device's (tests/unit/test_net_ctrl.py checks the commands)."""
        pairs = 1
        if self.has(NetFeature.MQ):
            pairs = self.pairs_in_use if self.has(NetFeature.CTRL_VQ) else self.case.pairs
        if pairs == 1:
            return [0]
        return [q for q in range(0, 2 * pairs, 2) if q in self.enabled]

    def steer(self, frame: bytes, ready: list[int]) -> int:
        """§5.1.9.5.6: a flow's reverse goes back to the pair it was sent on, else a hash."""
        if len(ready) <= 1:
            return ready[0] if ready else 0
        pair = self.steering.get(flow_key(frame, reverse=True))
        if pair is not None and 2 * pair in ready:
            event(f"rx: steered to pair {pair} after the reverse flow")
            return 2 * pair
        return ready[flow_hash(frame) % len(ready)]

    def rx_acceptable(self, header: NetHeader, length: int) -> bool:
        """§5.1.9.4.1: what a tap may hand the driver, given what it negotiated."""
        has = self.has
        if header.flags & HdrFlag.NEEDS_CSUM and not has(NetFeature.GUEST_CSUM):
            return False
        gso = header.gso_type
        if gso:
            allowed: dict[int, int] = {GsoType.TCPV4: NetFeature.GUEST_TSO4,
                                       GsoType.TCPV6: NetFeature.GUEST_TSO6}
            bit = allowed.get(gso & ~GSO_ECN)
            if bit is None or not has(bit) or header.gso_size == 0:
                return False
            if gso & GSO_ECN and not has(NetFeature.GUEST_ECN):
                return False
        if not ETH_HLEN <= length <= (GSO_MAX_FRAME if gso else self.max_frame):
            return False
        return self.offsets_fit(header, length)

    @staticmethod
    def offsets_fit(header: NetHeader, length: int) -> bool:
        end = header.csum_start + header.csum_offset + 2
        if header.flags & HdrFlag.NEEDS_CSUM and end > length:
            return False
        return not (header.gso_type and header.hdr_len > length)

    # -- the model of the device ----------------------------------------------------------------

    def kick(self, q: int) -> None:
        self.process(q)
        self.fe.backend.kick(q)

    def enable(self, op: Enable) -> None:
        """A ring is processed only while enabled (vhost-user "Ring states"), at once
        when enabled again."""
        q = op.queue % self.num_queues
        if q not in self.queues:
            return
        if op.on:
            self.enabled.add(q)
            self.process(q)
        else:
            self.enabled.discard(q)
            event("front-end: ring disabled")
        self.fe.send(Request.SET_VRING_ENABLE, encode_vring_state(q, int(op.on)))

    def process(self, q: int) -> None:
        """What the device does with queue ``q`` when kicked (VhostUserBackend._process)."""
        queue = self.queues.get(q)
        if queue is None or q not in self.enabled:
            return
        role = self.role(q)
        if role == "rx":
            self.process_rx(queue)
            return
        while queue.avail:
            posted = queue.pop()
            if posted.bad:
                self.violation(queue, posted)
            elif role == "tx":
                self.model_transmit(queue, posted)
            elif role == "ctrl":
                self.model_control(queue, posted)
            else:  # a queue the negotiated features do not give the driver
                self.counts[q].violations += 1
                queue.use(posted, 0)

    def violation(self, queue: Queue, posted: Posted) -> None:
        self.counts[queue.index].violations += 1
        if posted.head < queue.size:
            queue.use(posted, 0)

    def model_transmit(self, queue: Queue, posted: Posted) -> None:
        """§5.1.9.2: header, frame; dropped unless within what was negotiated."""
        counts = self.counts[queue.index]
        if posted.writable_descs:
            counts.violations += 1
        queue.use(posted, 0)
        data = posted.readable
        if len(data) < self.hsize:
            counts.dropped += 1
            return
        header = NetHeader.unpack(data[: self.hsize])
        frame = data[self.hsize :]
        if not self.tx_acceptable(header, len(frame)):
            counts.dropped += 1
            event("tx: dropped")
            return
        event("tx: sent")
        counts.bytes_out += len(frame)
        if self.case.pairs > 1:
            if len(self.steering) >= STEERING_FLOWS:
                self.steering.clear()
            self.steering[flow_key(frame)] = queue.index // 2
        if isinstance(self.back, PacketBackend):
            if header.gso_type:
                counts.gso += 1
            self.sent.append((header, frame))
        else:
            self.sent.append(frame)

    def tx_acceptable(self, header: NetHeader, length: int) -> bool:
        """§5.1.9.2.1, with offloads only where the back end can carry them."""
        offloads = isinstance(self.back, PacketBackend)
        has = self.has
        allowed = HdrFlag.NEEDS_CSUM if offloads and has(NetFeature.CSUM) else 0
        if header.flags & ~allowed:
            return False
        gso = header.gso_type
        if gso:
            bits: dict[int, int] = {GsoType.TCPV4: NetFeature.HOST_TSO4,
                                    GsoType.TCPV6: NetFeature.HOST_TSO6}
            bit = bits.get(gso & ~GSO_ECN)
            if not offloads or bit is None or not has(bit):
                return False
            if gso & GSO_ECN and not has(NetFeature.HOST_ECN):
                return False
            if not header.flags & HdrFlag.NEEDS_CSUM or header.gso_size == 0:
                return False
        if length < ETH_HLEN or length > (GSO_MAX_FRAME if gso else self.max_frame):
            return False
        return self.offsets_fit(header, length)

    def model_control(self, queue: Queue, posted: Posted) -> None:
        """§5.1.9.5: class, command, data, and a writable byte for the ack."""
        if not self.has(NetFeature.CTRL_VQ) or len(posted.readable) < 2 or \
                posted.writable_len < 1:
            self.counts[queue.index].violations += 1
            queue.use(posted, 0)
            return
        command = posted.readable
        ack = None
        if len(command) > 65536:  # longer than the device reads
            ack = 1
        elif command[:2] == VQ_PAIRS_SET:
            ok = self.has(NetFeature.MQ) and len(command) == 4 and \
                1 <= U16.unpack(command[2:])[0] <= self.case.pairs
            ack = 0 if ok else 1
            if ok:
                self.pairs_in_use = U16.unpack(command[2:])[0]
                event(f"ctrl: {self.pairs_in_use} pairs in use")
        queue.use(posted, 1, ack=ack)

    def process_rx(self, queue: Queue) -> None:
        """Receive (§5.1.9.4): frames into buffers while both wait; with MRG_RXBUF a
        frame takes as many buffers as it needs, used together, or none of them."""
        backlog = self.backlogs[queue.index // 2]
        while backlog and queue.avail:
            first = queue.pop()
            if first.bad:
                self.violation(queue, first)
                continue
            if not self.mrg:
                self.receive_one(queue, first, backlog.popleft())
                continue
            need = self.hsize + len(backlog[0].data)
            chains = [first]
            while sum(c.writable_len for c in chains) < need:
                if not queue.avail:
                    full = queue.popped - queue.used >= queue.size
                    queue.rewind(chains)
                    if not full:
                        event("rx: waits for more buffers")
                        return  # until the driver adds more and kicks
                    event("rx: ring too small for the frame")
                    backlog.popleft()
                    self.counts[queue.index].dropped += 1
                    break
                chain = queue.pop()
                if chain.bad:
                    for c in chains:
                        queue.use(c, 0)
                    self.violation(queue, chain)
                    backlog.popleft()
                    self.counts[queue.index].dropped += 1
                    event("rx: rule broken mid-frame")
                    break
                chains.append(chain)
            else:
                self.merge(queue, chains, backlog.popleft())

    def rx_header(self, frame: Frame, buffers: int) -> bytes:
        h = frame.header
        if h is None:
            return HDR.pack(0, 0, 0, 0, 0, 0, buffers)[: self.hsize]
        flags: int = h.flags & (HdrFlag.NEEDS_CSUM | HdrFlag.DATA_VALID)
        if not self.has(NetFeature.GUEST_CSUM):
            flags = 0
        return HDR.pack(flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset,
                        buffers)[: self.hsize]

    def count_received(self, queue: Queue, frame: Frame, buffers: int) -> None:
        counts = self.counts[queue.index]
        counts.bytes_in += len(frame.data)
        if buffers > 1:
            counts.merged += 1
            event("rx: frame merged over several buffers")
        if frame.header is not None and frame.header.gso_type:
            counts.gso += 1

    def receive_one(self, queue: Queue, posted: Posted, frame: Frame) -> None:
        """§5.1.9.3.2: without MRG_RXBUF a frame must fit one buffer."""
        counts = self.counts[queue.index]
        if posted.readable_descs:
            counts.violations += 1
        need = self.hsize + len(frame.data)
        if posted.writable_len < need:
            event("rx: frame longer than the buffer")
            counts.dropped += 1
            queue.use(posted, 0)
            return
        event("rx: frame in one buffer")
        queue.use(posted, need, self.rx_header(frame, 1) + frame.data)
        self.count_received(queue, frame, 1)

    def merge(self, queue: Queue, chains: list[Posted], frame: Frame) -> None:
        """§5.1.9.4: the header (num_buffers) then the frame, every buffer but the last full;
        §5.1.9.3.1: each buffer at least a header, else the frame is dropped."""
        counts = self.counts[queue.index]
        counts.violations += sum(1 for c in chains if c.readable_descs)
        if any(c.writable_len < self.hsize for c in chains):
            event("rx: mergeable buffer shorter than the header")
            counts.violations += 1
            counts.dropped += 1
            for c in chains:
                queue.use(c, 0)
            return
        data = self.rx_header(frame, len(chains)) + frame.data
        offset = 0
        for c in chains:
            part = data[offset : offset + c.writable_len]
            queue.use(c, len(part), part)
            offset += len(part)
        self.count_received(queue, frame, len(chains))

    # -- checks ---------------------------------------------------------------------------------

    def run_deferred(self) -> None:
        """What the runtime's loop does between events: run the queues a drain left
        with work (:data:`~pyvirtio.vhost_user.engine.DRAIN_BUDGET`) until none is left."""
        backend = self.fe.backend
        for _ in range(100):
            if backend.recheck_interval is None:
                return
            assert backend.recheck_interval == 0.0, "a queue is suspect: no index jumps here"
            event("back-end: a drain ran out of budget")
            backend.recheck()
        raise AssertionError("the back-end keeps asking to be run again")

    def check(self) -> None:
        self.run_deferred()
        for queue in self.queues.values():
            self.check_used(queue)
        self.check_counters()

    def check_used(self, queue: Queue) -> None:
        got = queue.driver.reap()
        expected, queue.expected = queue.expected, []
        assert got == [(u.posted.head, u.length) for u in expected], (
            f"queue {queue.index} ({self.role(queue.index)}): used {got}, the model expected "
            f"{[(u.posted.head, u.length, u.posted.note) for u in expected]}"
        )
        frame_left = 0
        for u in expected:
            posted = u.posted
            queue.in_ring -= 1
            del queue.outstanding[posted.head]
            written = b"".join(self.memory.read(g, n) for g, n in posted.writable)
            if u.data is not None:
                assert written[: u.length] == u.data, f"queue {queue.index}: frame bytes differ"
            if self.role(queue.index) == "ctrl" and u.length == 1:
                ack = written[0]
                assert ack in (0, 1), f"control ack {ack}"
                assert u.ack is None or ack == u.ack
                counts = self.counts[queue.index]
                event(f"ctrl: ack {ack}")
                if ack:
                    counts.acks_err += 1
                else:
                    counts.acks_ok += 1
            rest = written[u.length :]
            assert rest == bytes([SENTINEL]) * len(rest), (
                f"queue {queue.index}: the device wrote beyond the {u.length} bytes it used")
            if u.data is not None and u.length:  # the driver reassembles frames
                if not frame_left:
                    header = NetHeader.unpack(u.data[: self.hsize])
                    frame_left = header.num_buffers if self.hsize == HDR_SIZE else 1
                    assert frame_left >= 1
                    if not self.mrg:
                        assert frame_left == 1
                    self.received += 1
                frame_left -= 1
                if frame_left:
                    assert u.length == posted.writable_len, "a buffer before the last not full"
            else:
                assert not frame_left, f"queue {queue.index}: another chain inside a frame"
            self.release(queue, posted.descs, posted.allocs)
        assert not frame_left, f"queue {queue.index}: the driver sees part of a frame"

    def check_counters(self) -> None:
        device = self.device
        assert device.backend is self.back
        assert self.back.sent == self.sent, "the back end got other frames than the model"
        for q, counts in enumerate(self.counts):
            stats = device.stats[q]
            kinds = stats.kinds
            dropped = sum(n for k, n in kinds.items() if k.startswith("dropped: "))
            filtered = sum(n for k, n in kinds.items() if k.startswith("filtered: "))
            got = Counts(stats.violations, dropped, filtered, kinds["merged frames"],
                         kinds["gso packets"], stats.bytes_in, stats.bytes_out,
                         kinds["commands"], kinds["commands refused"])
            assert got == counts, f"queue {q} ({self.role(q)}): counters {got}, model {counts}"
            assert stats.errors == dropped + counts.acks_err
        waiting = [[f for _, _, f in b] for b in device._backlogs]
        assert waiting == [[f.data for f in b] for b in self.backlogs]
        rx = range(0, 2 * self.case.pairs, 2)
        lost = sum(self.counts[q].dropped + self.counts[q].filtered for q in rx)
        assert self.delivered == self.received + lost + sum(len(w) for w in waiting)

    def run(self) -> None:
        self.start()
        self.check()
        for op in self.case.ops:
            if isinstance(op, Transmit):
                self.transmit(op)
            elif isinstance(op, PostRx):
                self.post_rx(op)
            elif isinstance(op, Control):
                self.control(op)
            elif isinstance(op, Raw):
                self.raw(op)
            elif isinstance(op, Deliver):
                self.deliver(op)
            elif isinstance(op, Enable):
                self.enable(op)
            else:
                self.kick(op.queue % self.num_queues)
            self.check()


@contextlib.contextmanager
def patient_backlog() -> Iterator[None]:
    """Frames wait for buffers however long a case runs (RX_MAX_AGE is wall-clock time,
    not something the driver controls)."""
    age = net_module.RX_MAX_AGE
    net_module.RX_MAX_AGE = float("inf")
    try:
        yield
    finally:
        net_module.RX_MAX_AGE = age


@fuzz_target("net", net_cases(), types=TYPES, quick_examples=150)
def test_net_device_survives_a_hostile_driver_and_matches_the_model(case: NetCase) -> None:
    """Whatever the driver puts on any queue and whatever the back end delivers, the
    net device raises only its own errors, hands the driver only whole frames it was
    given, answers control chains with an ack of 0 or 1, and agrees with the model."""
    back: ListBackend | PacketBackend = PacketBackend() if case.offload else ListBackend()
    device = NetDevice(NetDeviceConfig(mac=MAC, mtu=case.mtu, queues=case.pairs), back)
    vhost = VhostUserBackend(device)
    device.attach(Host(vhost))
    with patient_backlog(), guest_memory(LAYOUT) as guest:
        fe = Frontend(vhost, guest)
        try:
            Runner(case, fe, device, back).run()
        finally:
            vhost.disconnect()
            device.close()
            fe.close()
