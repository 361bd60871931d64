"""virtio-net receive steering (§5.1.9.5.6): which receive queue a frame goes to."""

from __future__ import annotations

import zlib

from pyvirtio.spec.net import RECEIVEQ

__all__ = ["STEERING_FLOWS", "flow_hash", "flow_key", "pick_rx_queue", "remember_flow"]

#: Flows remembered for receive steering (their transmit queue); more start afresh.
STEERING_FLOWS = 4096

_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = (0x8100, 0x88A8)
_IPPROTO_PORTS = (6, 17, 132)  # TCP, UDP, SCTP: ports follow the IP header


def flow_key(frame: bytes, *, reverse: bool = False) -> bytes:
    """What identifies the frame's flow (one direction of it), for receive steering.

    IPv4 and IPv6 (after up to two VLAN tags): the protocol, source and
    destination addresses, and for TCP, UDP and SCTP the two ports (not for an
    IPv4 fragment: only the first has ports, and a flow's fragments must stay
    together).  Anything else: the two MAC addresses and the EtherType.  With
    ``reverse``, the key of the opposite direction: what a reply carries.
    """
    offset = 12
    ethertype = int.from_bytes(frame[12:14], "big")
    for _ in range(2):
        if ethertype not in _ETH_P_8021Q:
            break
        offset += 4
        ethertype = int.from_bytes(frame[offset : offset + 2], "big")
    ip = offset + 2
    if ethertype == _ETH_P_IP and len(frame) >= ip + 20:
        ihl = (frame[ip] & 0x0F) * 4
        proto = frame[ip + 9]
        src, dst = frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
        fragment = int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x3FFF
        ports = ip + ihl if proto in _IPPROTO_PORTS and not fragment and ihl >= 20 else None
    elif ethertype == _ETH_P_IPV6 and len(frame) >= ip + 40:
        proto = frame[ip + 6]
        src, dst = frame[ip + 8 : ip + 24], frame[ip + 24 : ip + 40]
        ports = ip + 40 if proto in _IPPROTO_PORTS else None
    else:
        src, dst = frame[6:12], frame[0:6]
        return dst + src + frame[12:14] if reverse else src + dst + frame[12:14]
    sport = dport = b""
    if ports is not None:
        sport, dport = frame[ports : ports + 2], frame[ports + 2 : ports + 4]
    if reverse:
        src, dst, sport, dport = dst, src, dport, sport
    return bytes([proto]) + src + dst + sport + dport


def flow_hash(frame: bytes) -> int:
    """A 32-bit hash of the frame's :func:`flow_key`: one flow, one receive queue."""
    return zlib.crc32(flow_key(frame))


def pick_rx_queue(frame: bytes, ready: list[int]) -> int:
    """The receive queue for ``frame`` among the ``ready`` ones (by :func:`flow_hash`).

    With no queue ready, ``receiveq1`` (0): the frame waits in its backlog.
    """
    if len(ready) <= 1:
        return ready[0] if ready else RECEIVEQ
    return ready[flow_hash(frame) % len(ready)]



def remember_flow(steering: dict[bytes, int], frame: bytes, pair: int) -> None:
    """The driver sent ``frame`` on ``pair``'s transmit queue: steer its replies there
    (at most :data:`STEERING_FLOWS` flows; then they start afresh)."""
    if len(steering) >= STEERING_FLOWS:
        steering.clear()
    steering[flow_key(frame)] = pair
