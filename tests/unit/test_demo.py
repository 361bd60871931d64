"""The demo's host port: ARP and ICMP echo replies (RFC 826, RFC 792); its report."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pyvirtio.demo import _checksum, answer, backend_summary, command_hint
from pyvirtio.devices.base import QueueStats

MAC = bytes.fromhex("020000000001")
PEER = bytes.fromhex("020000000002")
IP, PEER_IP = bytes([10, 217, 0, 1]), bytes([10, 217, 0, 2])


def test_arp_request_for_our_address_gets_a_reply_and_others_do_not() -> None:
    request = (b"\xff" * 6 + PEER + b"\x08\x06" + bytes.fromhex("0001080006040001")
               + PEER + PEER_IP + bytes(6) + IP)
    reply = answer(request, MAC, IP)
    assert reply is not None
    assert reply[:6] == PEER and reply[6:12] == MAC and reply[20:22] == b"\x00\x02"
    assert reply[22:28] == MAC and reply[28:32] == IP and reply[32:38] == PEER
    assert answer(request[:38] + bytes([10, 217, 0, 9]), MAC, IP) is None


def test_echo_request_gets_an_echo_reply_with_valid_checksums() -> None:
    icmp = bytearray(b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"payload!")
    icmp[2:4] = _checksum(bytes(icmp)).to_bytes(2, "big")
    ip = bytearray(bytes([0x45, 0, 0, 20 + len(icmp), 0, 0, 0x40, 0, 64, 1, 0, 0])
                   + PEER_IP + IP)
    ip[10:12] = _checksum(bytes(ip)).to_bytes(2, "big")
    reply = answer(MAC + PEER + b"\x08\x00" + bytes(ip) + bytes(icmp), MAC, IP)
    assert reply is not None and reply[:6] == PEER and reply[6:12] == MAC
    header, body = reply[14:34], reply[34:]
    assert header[12:16] == IP and header[16:20] == PEER_IP
    assert _checksum(header) == 0 and _checksum(body) == 0  # both checksums verify
    assert body[0] == 0 and body[4:] == icmp[4:]  # echo reply, same id/seq/data
    assert answer(MAC + PEER + b"\x08\x00" + bytes(ip) + b"\x00" + bytes(icmp[1:]),
                  MAC, IP) is None  # an echo reply is not answered


def snapshot(*queues: QueueStats) -> dict[str, Any]:
    """A ``pyvirtio stats --json`` answer whose totals are ``queues``."""
    entries = [{"queue": i, **q.as_json()} for i, q in enumerate(queues)]
    return {"queues": entries, "totals": entries, "last_connection": None}


def test_the_net_backend_line_shows_both_directions() -> None:
    """Receive queues count frames to the guest, transmit queues frames from it."""
    rx = QueueStats(requests=4, bytes_in=336)
    tx = QueueStats(requests=9, bytes_out=762, kinds=Counter({"switch sent": 9}))
    control = QueueStats(requests=1, errors=1)
    line = backend_summary("net", snapshot(rx, tx, control))
    assert line == ("4 frames (336 bytes) to the guest, 9 frames (762 bytes) from the guest, "
                    "1 errors, 0 driver violations")
    two_pairs = backend_summary("net", snapshot(rx, tx, rx, tx))
    assert two_pairs.startswith("8 frames (672 bytes) to the guest, 18 frames (1524 bytes)")


def test_the_blk_backend_line_adds_up_every_queue() -> None:
    line = backend_summary("blk", snapshot(QueueStats(requests=2, bytes_in=1024,
                                                      kinds=Counter({"in": 2})),
                                           QueueStats(requests=1, bytes_out=512,
                                                      kinds=Counter({"out": 1}))))
    assert line == ("3 requests, 1024 bytes to the guest, 512 bytes from the guest, 0 errors, "
                    "0 driver violations (in 2, out 1)")


def test_the_demo_says_where_the_pyvirtio_command_is() -> None:
    script = Path(sys.executable).parent / "pyvirtio"
    lines = command_hint(Path(sys.executable).parent.parent.parent)
    assert script.exists()  # the test venv has the console script
    assert f"the pyvirtio command: {script.parent.parent.name}/bin/pyvirtio" in lines[0]
    if len(lines) > 1:  # not on PATH: how to put it there
        assert "activate" in lines[1]
        assert lines[2].strip().startswith("pipx install ")
