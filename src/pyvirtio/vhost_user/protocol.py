"""The vhost-user wire protocol, sans I/O (QEMU docs/interop/vhost-user.rst).

Bytes and file descriptors go in (:meth:`MessageDecoder.feed`), typed
:class:`Message` objects come out (:meth:`MessageDecoder.next_message`); replies
are encoded to bytes by :func:`encode`.  Nothing here touches a socket.

Every message is a header of three native-endian u32 (``request``, ``flags``,
``size``) followed by ``size`` bytes of payload; file descriptors travel as
``SCM_RIGHTS`` ancillary data with the message's first bytes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvirtio.errors import BadPayloadSize, TruncatedMessage, UnknownRequest, VhostUserError
from pyvirtio.memory import RegionSpec

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "BackendRequest",
    "ConfigPayload",
    "DeviceStateTransfer",
    "InflightInfo",
    "Message",
    "MessageDecoder",
    "ProtocolFeature",
    "Request",
    "TransferDirection",
    "VringAddr",
    "VringState",
    "close_fds",
    "decode_config",
    "decode_device_state_transfer",
    "decode_inflight",
    "decode_mem_table",
    "decode_region",
    "decode_u64",
    "decode_vring_addr",
    "decode_vring_state",
    "encode",
    "encode_config",
    "encode_inflight",
    "encode_mem_table",
    "encode_region",
    "encode_u64",
    "encode_vring_addr",
    "encode_vring_state",
]

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")
REGION = struct.Struct("=QQQQ")
MEM_TABLE_HEADER = struct.Struct("=II")
CONFIG_HEADER = struct.Struct("=III")
#: ``VhostUserInflight``: mmap size, mmap offset, num queues, queue size (C-padded to 24).
INFLIGHT = struct.Struct("=QQHH4x")

#: Protocol version carried in the low two bits of ``flags``.
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: Virtio feature bit 30: the back-end speaks the protocol-feature extension.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: Most fds one message carries (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
#: Largest config space a GET/SET_CONFIG may address (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Largest payload we accept; anything bigger is a broken or hostile peer.
MAX_PAYLOAD = 4096
#: Flag in the u64 of SET_VRING_KICK/CALL/ERR: no fd is passed (polling mode).
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class Request(enum.IntEnum):
    """Front-end request codes (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (vhost-user.rst, "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class BackendRequest(enum.IntEnum):
    """Back-end request codes: messages on the back-end request channel
    (vhost-user.rst, "Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


#: The protocol features pyvirtio implements, on both ends: a back-end offers them
#: (devices may add some), a front-end accepts them.
DEFAULT_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.STATUS)
)


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a queue index and a number."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: ring addresses in the front-end's address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    """``struct vhost_user_config``: a window of the device config space."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class InflightInfo:
    """``VhostUserInflight``: where the inflight buffer is and what it covers."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(slots=True)
class Message:
    """One decoded vhost-user message.

    ``request`` is the raw code (not every code is a :class:`Request` member);
    ``fds`` are the descriptors that came with it, owned by whoever consumes
    the message (close the ones you do not keep).
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The request's name, or ``request <N>`` for unknown codes."""
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    @property
    def need_reply(self) -> bool:
        """The front-end set VHOST_USER_NEED_REPLY (REPLY_ACK extension)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        """Close every fd still attached to the message."""
        close_fds(self.fds)
        self.fds.clear()


def close_fds(fds: Iterable[int | None]) -> None:
    """Close fds we own, ignoring ones already gone (and ``None``)."""
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise BadPayloadSize(
            f"payload is {len(msg.payload)} bytes, expected {size}", request=msg.name
        )


def decode_u64(msg: Message) -> int:
    """The u64 payload of GET/SET_FEATURES, SET_VRING_KICK and friends."""
    _expect_size(msg, U64.size)
    value: int = U64.unpack(msg.payload)[0]
    return value


class TransferDirection(enum.IntEnum):
    """SET_DEVICE_STATE_FD's direction (vhost-user.rst "Migrating back-end state")."""

    SAVE = 0
    LOAD = 1


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD's "device state transfer parameters": direction and phase
    (0, the only one: after memory, both devices suspended)."""

    direction: TransferDirection
    phase: int


def decode_device_state_transfer(msg: Message) -> DeviceStateTransfer:
    """The payload of SET_DEVICE_STATE_FD: u32 direction, u32 phase.

    Raises:
        BadPayloadSize: not 8 bytes.
        VhostUserError: an unknown direction or phase.
    """
    _expect_size(msg, 8)
    direction, phase = VRING_STATE.unpack(msg.payload)  # two native u32s
    if direction not in (TransferDirection.SAVE, TransferDirection.LOAD):
        raise VhostUserError(f"unknown transfer direction {direction}", request=msg.name)
    if phase != 0:
        raise VhostUserError(f"unknown migration phase {phase} (0, STOPPED, is the only one)",
                             request=msg.name)
    return DeviceStateTransfer(TransferDirection(direction), phase)


def decode_vring_state(msg: Message) -> VringState:
    """The ``vhost_vring_state`` payload."""
    _expect_size(msg, VRING_STATE.size)
    return VringState(*VRING_STATE.unpack(msg.payload))


def decode_vring_addr(msg: Message) -> VringAddr:
    """The ``vhost_vring_addr`` payload."""
    _expect_size(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def decode_mem_table(msg: Message) -> list[RegionSpec]:
    """SET_MEM_TABLE: ``u32 nregions; u32 padding; region[slots]``, ``nregions <= slots``.

    The payload may hold more region slots than ``nregions`` uses: user-mode
    Linux always sends two (72 bytes), even for one region.  It must still be
    well-formed: a whole number of slots, at most :data:`MAX_FDS` of them, and
    ``nregions`` of them used.  Unused slots are ignored.
    """
    size = len(msg.payload)
    if size < MEM_TABLE_HEADER.size or (size - MEM_TABLE_HEADER.size) % REGION.size:
        raise BadPayloadSize(
            f"payload is {size} bytes, not a header of {MEM_TABLE_HEADER.size} and whole "
            f"regions of {REGION.size}",
            request=msg.name,
        )
    slots = (size - MEM_TABLE_HEADER.size) // REGION.size
    count, _pad = MEM_TABLE_HEADER.unpack_from(msg.payload)
    if count > MAX_FDS:
        raise BadPayloadSize(f"{count} regions, at most {MAX_FDS} allowed", request=msg.name)
    if slots > MAX_FDS:
        raise BadPayloadSize(f"{slots} region slots, at most {MAX_FDS} allowed",
                             request=msg.name)
    if count > slots:
        raise BadPayloadSize(
            f"{count} regions, but the payload of {size} bytes holds {slots}", request=msg.name
        )
    return [
        RegionSpec(*REGION.unpack_from(msg.payload, MEM_TABLE_HEADER.size + i * REGION.size))
        for i in range(count)
    ]


def decode_region(msg: Message) -> RegionSpec:
    """ADD_MEM_REG / REM_MEM_REG: ``u64 padding; region``."""
    _expect_size(msg, 8 + REGION.size)
    return RegionSpec(*REGION.unpack_from(msg.payload, 8))


def decode_config(msg: Message) -> ConfigPayload:
    """GET/SET_CONFIG: ``u32 offset; u32 size; u32 flags; u8 payload[size]``."""
    if len(msg.payload) < CONFIG_HEADER.size:
        raise BadPayloadSize(f"payload is {len(msg.payload)} bytes", request=msg.name)
    offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise BadPayloadSize(
            f"config window offset {offset} size {size} exceeds {MAX_CONFIG_SIZE} bytes",
            request=msg.name,
        )
    _expect_size(msg, CONFIG_HEADER.size + size)
    return ConfigPayload(offset, size, flags, msg.payload[CONFIG_HEADER.size :])


def decode_inflight(msg: Message) -> InflightInfo:
    """GET/SET_INFLIGHT_FD: the inflight description."""
    _expect_size(msg, INFLIGHT.size)
    return InflightInfo(*INFLIGHT.unpack(msg.payload))


def encode_inflight(info: InflightInfo) -> bytes:
    """An inflight description payload."""
    return INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)


def encode(request: int, payload: bytes = b"", *, reply: bool = False, flags: int = 0) -> bytes:
    """Frame ``payload`` as a message (``reply`` sets VHOST_USER_REPLY_MASK)."""
    header_flags = VERSION | (FLAG_REPLY if reply else 0) | flags
    return HEADER.pack(request, header_flags, len(payload)) + payload


def encode_u64(value: int) -> bytes:
    """A u64 payload."""
    return U64.pack(value)


def encode_vring_state(index: int, num: int) -> bytes:
    """A ``vhost_vring_state`` payload."""
    return VRING_STATE.pack(index, num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    """A ``vhost_vring_addr`` payload."""
    return VRING_ADDR.pack(
        addr.index,
        addr.flags,
        addr.desc_user_addr,
        addr.used_user_addr,
        addr.avail_user_addr,
        addr.log_guest_addr,
    )


def encode_mem_table(regions: Iterable[RegionSpec]) -> bytes:
    """A SET_MEM_TABLE payload."""
    regions = list(regions)
    body = b"".join(
        REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in regions
    )
    return MEM_TABLE_HEADER.pack(len(regions), 0) + body


def encode_region(region: RegionSpec) -> bytes:
    """An ADD_MEM_REG / REM_MEM_REG payload."""
    return U64.pack(0) + REGION.pack(
        region.guest_addr, region.size, region.user_addr, region.mmap_offset
    )


def encode_config(offset: int, size: int, flags: int, data: bytes) -> bytes:
    """A GET/SET_CONFIG payload."""
    return CONFIG_HEADER.pack(offset, size, flags) + data


class MessageDecoder:
    """Turns the byte stream (and fds) of a vhost-user connection into messages.

    File descriptors are attached to the message whose header is being
    received when they arrive, which is how the kernel delivers them when the
    peer sends each message (header, payload and fds) with one ``sendmsg``.
    Fds fed with a chunk belong to the message that chunk's first byte is part of.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Received fds, each with the offset in ``_buf`` of the bytes it came with.
        self._fds: list[tuple[int, int]] = []

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Add received bytes and the fds that came with them."""
        at = len(self._buf)
        self._buf += data
        self._fds.extend((at, fd) for fd in fds)

    @property
    def wanted(self) -> int:
        """How many more bytes complete the message in progress."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        size: int = HEADER.unpack_from(self._buf)[2]
        return max(0, HEADER.size + min(size, MAX_PAYLOAD) - len(self._buf))

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed.

        Raises:
            UnknownRequest: the header's request code is not a known request or
                its version bits are wrong.
            BadPayloadSize: the size field exceeds :data:`MAX_PAYLOAD`, or more
                than :data:`MAX_FDS` fds came with the message (all are closed).
        """
        if len(self._buf) < HEADER.size:
            return None
        request, flags, size = HEADER.unpack_from(self._buf)
        if request not in Request.__members__.values():
            self.discard()
            raise UnknownRequest(f"unknown request code {request}")
        name = Request(request).name
        if flags & FLAG_VERSION_MASK != VERSION:
            self.discard()
            raise UnknownRequest(f"protocol version {flags & FLAG_VERSION_MASK}", request=name)
        if size > MAX_PAYLOAD:
            self.discard()
            raise BadPayloadSize(f"size field {size} exceeds {MAX_PAYLOAD}", request=name)
        end = HEADER.size + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        fds = [fd for at, fd in self._fds if at < end]
        self._fds = [(at - end, fd) for at, fd in self._fds if at >= end]
        if len(fds) > MAX_FDS:
            close_fds(fds)
            self.discard()
            raise BadPayloadSize(f"{len(fds)} fds, at most {MAX_FDS} allowed", request=name)
        return Message(request, flags, payload, fds)

    def eof(self) -> None:
        """The peer closed the connection.

        Raises:
            TruncatedMessage: it closed in the middle of a message.
        """
        pending = len(self._buf)
        self.discard()
        if pending:
            raise TruncatedMessage(f"connection closed {pending} bytes into a message")

    def discard(self) -> None:
        """Drop buffered bytes and close buffered fds (after an error)."""
        self._buf.clear()
        close_fds(fd for _at, fd in self._fds)
        self._fds.clear()
