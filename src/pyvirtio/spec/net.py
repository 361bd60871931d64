"""virtio-net wire definitions (VIRTIO 1.4 §5.1 Network Device).

Feature bits (§5.1.3), the configuration layout (§5.1.4), the per-packet
header ``struct virtio_net_hdr`` (§5.1.9) and the control virtqueue's classes
and commands (§5.1.9.5), as typed constants and precompiled structs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "CONFIG",
    "CONFIG_MTU_OFFSET",
    "CONFIG_SIZE",
    "CONFIG_STATUS_OFFSET",
    "CTRL_ACK_ERR",
    "CTRL_ACK_OK",
    "CTRL_HEADER",
    "ETH_ALEN",
    "ETH_HLEN",
    "GSO_ECN",
    "HDR",
    "HDR_LEGACY",
    "HDR_SIZE",
    "HDR_SIZE_LEGACY",
    "RECEIVEQ",
    "TRANSMITQ",
    "VLAN_HLEN",
    "CtrlAnnounce",
    "CtrlClass",
    "CtrlMac",
    "CtrlMq",
    "CtrlRx",
    "CtrlVlan",
    "GsoType",
    "HdrFlag",
    "NetConfig",
    "NetFeature",
    "NetHeader",
    "NetStatus",
]

#: Queue indices of the first pair (§5.1.2): receiveq1, transmitq1 (controlq after all pairs).
RECEIVEQ = 0
TRANSMITQ = 1
#: Ethernet sizes: an address, the 14-byte header, an 802.1Q tag.
ETH_ALEN = 6
ETH_HLEN = 14
VLAN_HLEN = 4


class NetFeature(enum.IntEnum):
    """Device-specific feature bits of virtio-net (§5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    DEVICE_STATS = 50
    HASH_TUNNEL = 51
    VQ_NOTF_COAL = 52
    NOTF_COAL = 53
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


class NetStatus(enum.IntFlag):
    """Bits of the config ``status`` field (§5.1.4)."""

    LINK_UP = 1
    ANNOUNCE = 2


class HdrFlag(enum.IntFlag):
    """``flags`` of ``struct virtio_net_hdr`` (§5.1.9)."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4
    UDP_TUNNEL_CSUM = 8


class GsoType(enum.IntEnum):
    """``gso_type`` of ``struct virtio_net_hdr`` (§5.1.9); ECN (0x80) is a flag on top."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


#: The ECN bit of ``gso_type``.
GSO_ECN = 0x80

#: ``struct virtio_net_config`` (§5.1.4): mac[6], status, max_virtqueue_pairs, mtu,
#: speed, duplex, rss_max_key_size, rss_max_indirection_table_length,
#: supported_hash_types, supported_tunnel_types.
CONFIG = struct.Struct("<6sHHHIBBHII")
CONFIG_SIZE = 28
#: Offsets of the fields a test or a driver looks at.
CONFIG_STATUS_OFFSET = 6
CONFIG_MTU_OFFSET = 10

#: ``struct virtio_net_hdr`` with VIRTIO_F_VERSION_1 (or legacy MRG_RXBUF):
#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers (§5.1.9).
HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = 12
#: The legacy header without ``num_buffers`` (no VERSION_1, no MRG_RXBUF; §5.1.9.1).
HDR_LEGACY = struct.Struct("<BBHHHH")
HDR_SIZE_LEGACY = 10

#: ``struct virtio_net_ctrl`` head: class, command (§5.1.9.5); the ack is one byte after
#: the command data.
CTRL_HEADER = struct.Struct("<BB")
CTRL_ACK_OK = 0
CTRL_ACK_ERR = 1


class CtrlClass(enum.IntEnum):
    """Control virtqueue command classes (§5.1.9.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5
    NOTF_COAL = 6
    HASH_TUNNEL = 7
    STATS = 8


class CtrlRx(enum.IntEnum):
    """Commands of class RX (§5.1.9.5.1)."""

    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    """Commands of class MAC (§5.1.9.5.2)."""

    TABLE_SET = 0
    ADDR_SET = 1


class CtrlVlan(enum.IntEnum):
    """Commands of class VLAN (§5.1.9.5.3)."""

    ADD = 0
    DEL = 1


class CtrlAnnounce(enum.IntEnum):
    """Commands of class ANNOUNCE (§5.1.9.5.4)."""

    ACK = 0


class CtrlMq(enum.IntEnum):
    """Commands of class MQ (§5.1.9.5.5)."""

    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


@dataclass(frozen=True, slots=True)
class NetHeader:
    """One ``struct virtio_net_hdr`` (§5.1.9), without the hash/tunnel extensions."""

    flags: int = 0
    gso_type: int = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, *, legacy: bool = False) -> bytes:
        """Encode (12 bytes, or 10 with ``legacy``: no ``num_buffers``)."""
        if legacy:
            return HDR_LEGACY.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                                   self.csum_start, self.csum_offset)
        return HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                        self.csum_start, self.csum_offset, self.num_buffers)

    @classmethod
    def unpack(cls, data: bytes) -> NetHeader:
        """Decode 12 bytes (or 10: a legacy header, ``num_buffers`` 0)."""
        if len(data) == HDR_SIZE_LEGACY:
            return cls(*HDR_LEGACY.unpack(data))
        return cls(*HDR.unpack(data))


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The values of ``struct virtio_net_config`` pyvirtio fills in (§5.1.4)."""

    mac: bytes
    status: int = NetStatus.LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN:
            raise ValueError(f"a MAC address has {ETH_ALEN} bytes, not {len(self.mac)}")

    def pack(self) -> bytes:
        """Encode as the little-endian config space the driver reads."""
        return CONFIG.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu,
                           0xFFFFFFFF, 0xFF, 0, 0, 0, 0)
