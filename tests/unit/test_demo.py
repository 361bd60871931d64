"""The demo's host port: ARP and ICMP echo replies (RFC 826, RFC 792)."""

from __future__ import annotations

from pyvirtio.demo import _checksum, answer

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
