"""virtio-net's control virtqueue and receive filter, without I/O (VIRTIO 1.4 §5.1.9.5).

:class:`RxFilter` is what the driver asked to receive: the receive modes
(§5.1.9.5.1: promiscuous, all-multicast, and with CTRL_RX_EXTRA all-unicast,
no-multicast, no-unicast, no-broadcast), the MAC filtering table and the
default MAC (§5.1.9.5.2) and the VLAN filter table (§5.1.9.5.3).  Its
:meth:`RxFilter.reject` says why a frame from the network must not reach
the driver, in the order of precedence the spec gives each mode:

1. promiscuous mode takes every frame ("SHOULD take effect even if one of
   the other modes ... is on");
2. with VLAN filtering, a frame tagged with a VLAN absent from the table is
   dropped (untagged frames are not subject to it);
3. broadcast: taken unless suppressed;
4. multicast: suppressed by NOMULTI even with ALLMULTI on; else taken with
   ALLMULTI or when the address is in the multicast table;
5. unicast: suppressed by NOUNI even with ALLUNI on; else taken with ALLUNI,
   or when it is the default MAC or in the unicast table.

A table longer than :data:`MAC_TABLE_ENTRIES` addresses is not kept: as the
spec's footnote allows, the device switches to all-unicast (all-multicast)
for it instead.

:class:`NetControl` executes control commands (§5.1.9.5): it checks each
against the negotiated features and the spec's rules and answers
VIRTIO_NET_OK or VIRTIO_NET_ERR with the reason.  The filter also comes from
QEMU (:meth:`RxFilter.from_qmp`): with a vhost-user back end QEMU answers the
control queue itself and reports the state in ``query-rx-filter``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyvirtio.spec.net import (
    CTRL_ACK_ERR,
    CTRL_ACK_OK,
    ETH_ALEN,
    ETH_HLEN,
    CtrlAnnounce,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
)

__all__ = [
    "CTRL_MAX_COMMAND",
    "MAC_TABLE_ENTRIES",
    "MAX_VLAN",
    "CtrlResult",
    "NetControl",
    "RxFilter",
    "vlan_id",
]

#: Addresses kept per MAC filtering table; a longer table means all-unicast/-multicast.
MAC_TABLE_ENTRIES = 64
#: The longest command read (class, command and data): room for tables of ~10,000
#: addresses; a longer one is answered VIRTIO_NET_ERR unread.
CTRL_MAX_COMMAND = 65536
#: VLAN IDs are 12 bits (IEEE 802.1Q).
MAX_VLAN = 4096
_ETH_P_8021Q = b"\x81\x00"
_BROADCAST = b"\xff" * ETH_ALEN
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def vlan_id(frame: bytes | memoryview) -> int | None:
    """The VLAN ID of an 802.1Q-tagged frame, or None for an untagged one."""
    if len(frame) >= 16 and frame[12:14] == _ETH_P_8021Q:
        return int.from_bytes(frame[14:16], "big") & 0x0FFF
    return None


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _parse_mac_text(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"a MAC address as text, not {text!r}")
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


@dataclass(slots=True)
class RxFilter:
    """The frames the driver wants (VIRTIO 1.4 §5.1.9.5.1-3); see the module docstring.

    Attributes:
        mac: the default MAC (config ``mac``, or what CTRL_MAC_ADDR_SET set).
        vlans: the VLAN filter table; None when VLAN filtering is off (every
            tagged frame passes, §5.1.9.5.3: CTRL_VLAN not negotiated).
    """

    mac: bytes
    promisc: bool = False
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: frozenset[bytes] = frozenset()
    multicast: frozenset[bytes] = frozenset()
    vlans: set[int] | None = None
    #: A table was too long to keep: every address of its kind passes (§5.1.9.5.2's
    #: footnote); apart from ALLUNI/ALLMULTI so that neither undoes the other.
    uni_overflow: bool = False
    multi_overflow: bool = False

    def reject(self, frame: bytes | memoryview) -> str | None:
        """Why the driver does not want ``frame`` (a short reason), or None to deliver it."""
        if len(frame) < ETH_HLEN:
            return "runt"  # the device drops these before; kept safe for any caller
        if self.promisc:
            return None
        if self.vlans is not None:
            vid = vlan_id(frame)
            if vid is not None and vid not in self.vlans:
                return "vlan"
        dst = bytes(frame[:ETH_ALEN])
        if dst == _BROADCAST:
            return "broadcast" if self.nobcast else None
        if dst[0] & 1:
            if self.nomulti:
                return "multicast"
            if self.allmulti or self.multi_overflow or dst in self.multicast:
                return None
            return "multicast"
        if self.nouni:
            return "unicast"
        if self.alluni or self.uni_overflow or dst == self.mac or dst in self.unicast:
            return None
        return "unicast"

    def set_tables(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        """Replace the MAC filtering tables; a table too long to keep turns its filter off."""
        self.uni_overflow = len(unicast) > MAC_TABLE_ENTRIES
        self.multi_overflow = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = frozenset() if self.uni_overflow else frozenset(unicast)
        self.multicast = frozenset() if self.multi_overflow else frozenset(multicast)

    def describe(self) -> str:
        """One line for the log: the modes, table sizes and VLANs."""
        modes = [name for name in ("promisc", "allmulti", "alluni", "nomulti", "nouni",
                                   "nobcast") if getattr(self, name)]
        vlans = ("all" if self.vlans is None
                 else ",".join(str(v) for v in sorted(self.vlans)) or "none")
        return (f"mac {_mac_text(self.mac)}, modes {'+'.join(modes) or 'normal'}, "
                f"{len(self.unicast)} unicast and {len(self.multicast)} multicast "
                f"addresses, vlans {vlans}")

    @classmethod
    def from_qmp(cls, info: Mapping[str, object]) -> RxFilter:
        """The filter QEMU reports for one NIC in ``query-rx-filter``'s answer.

        Broadcast frames always pass: QEMU (7.2 and before) reports the
        driver's NOBCAST flag itself as ``broadcast-allowed``, so the field
        cannot be trusted either way, and filtering is best effort (§5.1.9.5.1).

        Raises:
            ValueError: a field is missing or not what QEMU documents
                (qapi/net.json ``RxFilterInfo``).
        """
        def mode(key: str) -> str:
            value = info.get(key)
            if value not in ("normal", "none", "all"):
                raise ValueError(f"query-rx-filter: {key} is {value!r}")
            return str(value)

        def table(key: str) -> list[object]:
            value = info.get(key)
            if not isinstance(value, list):
                raise ValueError(f"query-rx-filter: {key} is {value!r}, not a list")
            return value

        promisc = info.get("promiscuous")
        if not isinstance(promisc, bool):
            raise ValueError(f"query-rx-filter: promiscuous is {promisc!r}")
        unicast, multicast, vlan = mode("unicast"), mode("multicast"), mode("vlan")
        vlans: set[int] | None = None
        if vlan != "all":
            vlans = set()
            if vlan == "normal":
                for vid in table("vlan-table"):
                    if not isinstance(vid, int) or not 0 <= vid < MAX_VLAN:
                        raise ValueError(f"query-rx-filter: VLAN {vid!r}")
                    vlans.add(vid)
        result = cls(
            mac=_parse_mac_text(info.get("main-mac")),
            promisc=promisc,
            allmulti=multicast == "all",
            alluni=unicast == "all",
            nomulti=multicast == "none",
            nouni=unicast == "none",
            unicast=frozenset(_parse_mac_text(m) for m in table("unicast-table")),
            multicast=frozenset(_parse_mac_text(m) for m in table("multicast-table")),
            vlans=vlans,
            uni_overflow=info.get("unicast-overflow") is True,
            multi_overflow=info.get("multicast-overflow") is True,
        )
        return result


@dataclass(frozen=True, slots=True)
class CtrlResult:
    """The answer to one control command: the ack byte and, for an error, why."""

    ack: int
    problem: str | None = None

    @classmethod
    def error(cls, problem: str) -> CtrlResult:
        """VIRTIO_NET_ERR with the reason (logged by the device)."""
        return cls(CTRL_ACK_ERR, problem)


_OK = CtrlResult(CTRL_ACK_OK)
#: A filter command without the filter: CTRL_VQ, or CTRL_RX/CTRL_VLAN, not negotiated.
_NO_FILTER = CtrlResult.error("no receive filter: the command's features (CTRL_VQ with "
                              "CTRL_RX or CTRL_VLAN) were not negotiated (VIRTIO 1.4 §5.1.3.1)")


@dataclass(slots=True)
class NetControl:
    """The state the control virtqueue sets, and the commands that set it (§5.1.9.5).

    Args:
        mac: the configured MAC (config ``mac``).
        max_pairs: ``max_virtqueue_pairs``.
        features: the negotiated features.

    Attributes:
        filter: the receive filter; None while the driver negotiated neither
            CTRL_RX nor CTRL_VLAN (the device delivers every frame).
        pairs: queue pairs in use (VQ_PAIRS_SET; 1 after reset, §5.1.9.5.6).
        announce: VIRTIO_NET_S_ANNOUNCE is set, waiting for ANNOUNCE_ACK.
        commands: executed commands by name, for the statistics.
    """

    mac: bytes
    max_pairs: int
    features: int = 0
    filter: RxFilter | None = None
    pairs: int = 1
    announce: bool = False
    commands: dict[str, int] = field(default_factory=dict)

    def reset(self, features: int) -> None:
        """The driver (re)negotiated ``features``: the state a reset leaves.

        §5.1.9.5.2: the MAC filtering table is empty; §5.1.9.5.3: the VLAN
        table is empty with CTRL_VLAN (every tagged frame passes without);
        §5.1.9.5.6: one queue pair.  Promiscuous mode starts on, as QEMU's
        device does, until the driver sets its receive mode (Linux does when
        the interface comes up).
        """
        self.features = features
        self.pairs = 1
        self.announce = False
        self.commands.clear()
        has = self._has
        if has(NetFeature.CTRL_VQ) and (has(NetFeature.CTRL_RX) or has(NetFeature.CTRL_VLAN)):
            self.filter = RxFilter(
                mac=self.mac, promisc=has(NetFeature.CTRL_RX),
                vlans=set() if has(NetFeature.CTRL_VLAN) else None,
            )
        else:
            self.filter = None

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def execute(self, cls: int, command: int, data: bytes) -> CtrlResult:
        """Run one command (class, command, its data) and answer it."""
        name = _command_name(cls, command)
        self.commands[name] = self.commands.get(name, 0) + 1
        if cls == CtrlClass.RX:
            return self._rx(command, data)
        if cls == CtrlClass.MAC:
            return self._mac(command, data)
        if cls == CtrlClass.VLAN:
            return self._vlan(command, data)
        if cls == CtrlClass.ANNOUNCE:
            return self._announce(command, data)
        if cls == CtrlClass.MQ:
            return self._mq(command, data)
        return CtrlResult.error(f"command class {cls} is not supported by this device")

    def _rx(self, command: int, data: bytes) -> CtrlResult:
        """§5.1.9.5.1: one byte, 0 (off) or 1 (on)."""
        basic = (CtrlRx.PROMISC, CtrlRx.ALLMULTI)
        extra = (CtrlRx.ALLUNI, CtrlRx.NOMULTI, CtrlRx.NOUNI, CtrlRx.NOBCAST)
        if command in basic and not self._has(NetFeature.CTRL_RX):
            return CtrlResult.error("an RX command, but CTRL_RX was not negotiated "
                                    "(VIRTIO 1.4 §5.1.9.5.1)")
        # A driver that took CTRL_RX_EXTRA without the CTRL_RX it requires (§5.1.3.1)
        # has no receive mode to change.
        if command in extra and not (self._has(NetFeature.CTRL_RX_EXTRA)
                                     and self._has(NetFeature.CTRL_RX)):
            return CtrlResult.error(f"RX command {command}, but CTRL_RX_EXTRA and the "
                                    "CTRL_RX it requires were not negotiated (VIRTIO 1.4 "
                                    "§5.1.3.1, §5.1.9.5.1)")
        if command not in basic + extra:
            return CtrlResult.error(f"RX command {command} does not exist")
        if len(data) != 1 or data[0] > 1:
            return CtrlResult.error(f"RX command {command} takes one byte, 0 or 1, not "
                                    f"{data.hex() or 'nothing'} (VIRTIO 1.4 §5.1.9.5.1)")
        if self.filter is None:
            return _NO_FILTER
        setattr(self.filter, CtrlRx(command).name.lower(), bool(data[0]))
        return _OK

    def _mac(self, command: int, data: bytes) -> CtrlResult:
        """§5.1.9.5.2: TABLE_SET (two counted tables) or ADDR_SET (six bytes)."""
        if command == CtrlMac.ADDR_SET:
            if not self._has(NetFeature.CTRL_MAC_ADDR):
                return CtrlResult.error("MAC_ADDR_SET, but CTRL_MAC_ADDR was not negotiated")
            if len(data) != ETH_ALEN or data[0] & 1:
                return CtrlResult.error(f"MAC_ADDR_SET takes a 6-byte unicast address, not "
                                        f"{data.hex() or 'nothing'} (VIRTIO 1.4 §5.1.9.5.2)")
            self.mac = bytes(data)
            if self.filter is not None:
                self.filter.mac = self.mac
            return _OK
        if command != CtrlMac.TABLE_SET:
            return CtrlResult.error(f"MAC command {command} does not exist")
        if not self._has(NetFeature.CTRL_RX):
            return CtrlResult.error("MAC_TABLE_SET, but CTRL_RX was not negotiated "
                                    "(VIRTIO 1.4 §5.1.9.5.2)")
        tables: list[list[bytes]] = []
        offset = 0
        for kind in ("unicast", "multicast"):
            if offset + 4 > len(data):
                return CtrlResult.error(f"MAC_TABLE_SET: the {kind} table's count is "
                                        f"missing ({len(data)} bytes; VIRTIO 1.4 §5.1.9.5.2)")
            (entries,) = _U32.unpack_from(data, offset)
            offset += 4
            end = offset + entries * ETH_ALEN
            if end > len(data):
                return CtrlResult.error(f"MAC_TABLE_SET: {entries} {kind} addresses do not "
                                        f"fit the {len(data)}-byte command")
            macs = [bytes(data[i : i + ETH_ALEN]) for i in range(offset, end, ETH_ALEN)]
            wrong = [m for m in macs if bool(m[0] & 1) != (kind == "multicast")]
            if wrong:
                return CtrlResult.error(f"MAC_TABLE_SET: {_mac_text(wrong[0])} in the {kind} "
                                        "table (VIRTIO 1.4 §5.1.9.5.2)")
            tables.append(macs)
            offset = end
        if offset != len(data):
            return CtrlResult.error(f"MAC_TABLE_SET: {len(data) - offset} bytes after the "
                                    "two tables")
        if self.filter is None:
            return _NO_FILTER
        self.filter.set_tables(tables[0], tables[1])
        return _OK

    def _vlan(self, command: int, data: bytes) -> CtrlResult:
        """§5.1.9.5.3: a little-endian 16-bit VLAN ID to add or remove."""
        if not self._has(NetFeature.CTRL_VLAN):
            return CtrlResult.error("a VLAN command, but CTRL_VLAN was not negotiated")
        if command not in (CtrlVlan.ADD, CtrlVlan.DEL):
            return CtrlResult.error(f"VLAN command {command} does not exist")
        if len(data) != 2:
            return CtrlResult.error(f"a VLAN command takes 2 bytes, not {len(data)}")
        (vid,) = _U16.unpack(data)
        if vid >= MAX_VLAN:
            return CtrlResult.error(f"VLAN {vid} is beyond 4095")
        if self.filter is None or self.filter.vlans is None:
            return _NO_FILTER
        if command == CtrlVlan.ADD:
            self.filter.vlans.add(vid)
        else:
            self.filter.vlans.discard(vid)
        return _OK

    def _announce(self, command: int, data: bytes) -> CtrlResult:
        """§5.1.9.5.4: ANNOUNCE_ACK clears VIRTIO_NET_S_ANNOUNCE before the buffer is used."""
        if not self._has(NetFeature.GUEST_ANNOUNCE):
            return CtrlResult.error("ANNOUNCE_ACK, but GUEST_ANNOUNCE was not negotiated")
        if command != CtrlAnnounce.ACK or data:
            return CtrlResult.error(f"ANNOUNCE command {command} with {len(data)} bytes; only "
                                    "ACK, without data, exists")
        self.announce = False
        return _OK

    def _mq(self, command: int, data: bytes) -> CtrlResult:
        """§5.1.9.5.6: VQ_PAIRS_SET with 1..max_virtqueue_pairs."""
        if not self._has(NetFeature.MQ):
            return CtrlResult.error("an MQ command, but MQ was not negotiated")
        if command != CtrlMq.VQ_PAIRS_SET:
            return CtrlResult.error(f"MQ command {command} is not supported (no RSS)")
        if len(data) != 2:
            return CtrlResult.error(f"VQ_PAIRS_SET takes 2 bytes, not {len(data)}")
        (pairs,) = _U16.unpack(data)
        if not 1 <= pairs <= self.max_pairs:
            return CtrlResult.error(f"VQ_PAIRS_SET {pairs}: max_virtqueue_pairs is "
                                    f"{self.max_pairs} (VIRTIO 1.4 §5.1.9.5.6)")
        self.pairs = pairs
        return _OK


def _command_name(cls: int, command: int) -> str:
    """``RX_PROMISC``, ``VLAN_ADD``... (the spec's names without VIRTIO_NET_CTRL_)."""
    kinds: dict[int, type[CtrlRx | CtrlMac | CtrlVlan | CtrlAnnounce | CtrlMq]] = {
        CtrlClass.RX: CtrlRx, CtrlClass.MAC: CtrlMac, CtrlClass.VLAN: CtrlVlan,
        CtrlClass.ANNOUNCE: CtrlAnnounce, CtrlClass.MQ: CtrlMq,
    }
    kind = kinds.get(cls)
    try:
        return f"{CtrlClass(cls).name}_{kind(command).name}" if kind else f"class {cls}"
    except ValueError:
        return f"{CtrlClass(cls).name} command {command}"
