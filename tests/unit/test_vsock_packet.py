"""vsock wire structs, header checks and the host-side handshake helpers (VIRTIO 1.4 §5.10)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.devices.vsock.bridge import (
    LINE_LIMIT,
    parse_connect,
    port_path,
    rendezvous,
    take_line,
)
from pyvirtio.devices.vsock.connection import Connection, Initiator
from pyvirtio.devices.vsock.packet import (
    MAX_PAYLOAD,
    Header,
    HeaderProblem,
    decode_header,
    encode_header,
)
from pyvirtio.spec.vsock import CONFIG, EVENT, HEADER, VsockOp, VsockType

GUEST = 3


def _hdr(**fields: int) -> Header:
    values = {"src_cid": GUEST, "dst_cid": 2, "src_port": 1000, "dst_port": 80, "len": 0,
              "type": VsockType.STREAM, "op": VsockOp.RW, "flags": 0, "buf_alloc": 4096,
              "fwd_cnt": 0}
    values.update(fields)
    return Header(*(values[name] for name in Header._fields))


def _decode(header: Header, available: int = 0, seqpacket: bool = True) -> Header | HeaderProblem:
    return decode_header(encode_header(header), available, guest_cid=GUEST, seqpacket=seqpacket)


def test_struct_sizes_match_the_spec() -> None:
    """§5.10.6: the header is 44 bytes; §5.10.4: the config 8; §5.10.6.7: an event 4."""
    assert (HEADER.size, CONFIG.size, EVENT.size) == (44, 8, 4)


@given(st.tuples(*(st.integers(0, 0xFFFFFFFF) for _ in range(10))))
def test_header_round_trip(values: tuple[int, ...]) -> None:
    header = Header._make((*values[:5], values[5] & 0xFFFF, values[6] & 0xFFFF, *values[7:]))
    assert Header._make(HEADER.unpack(encode_header(header))) == header


def test_a_good_header_decodes() -> None:
    header = _hdr(len=10)
    assert _decode(header, 10) == header


@pytest.mark.parametrize(("header", "available", "kind"), [
    (_hdr(len=11), 10, "bad_len"),                       # len beyond the chain
    (_hdr(len=MAX_PAYLOAD + 1), 1 << 20, "bad_len"),      # huge len
    (_hdr(op=0), 0, "bad_op"),                            # INVALID
    (_hdr(op=8), 0, "bad_op"),
    (_hdr(op=0xFFFF), 0, "bad_op"),
    (_hdr(src_cid=4), 0, "bad_cid"),                      # §5.10.6.3: guest_cid as source
    (_hdr(src_cid=GUEST | 1 << 32), 0, "bad_cid"),        # upper bits set
    (_hdr(dst_cid=GUEST), 0, "bad_cid"),                  # to itself
    (_hdr(dst_cid=1), 0, "bad_cid"),
    (_hdr(dst_cid=0xFFFFFFFF), 0, "bad_cid"),
    (_hdr(type=3), 0, "bad_type"),                        # DGRAM is not offered
    (_hdr(type=0), 0, "bad_type"),
])
def test_hostile_headers_are_problems(header: Header, available: int, kind: str) -> None:
    problem = _decode(header, available)
    assert isinstance(problem, HeaderProblem) and problem.kind == kind, problem


def test_seqpacket_type_needs_the_feature() -> None:
    header = _hdr(type=VsockType.SEQPACKET)
    assert _decode(header) == header
    problem = _decode(header, seqpacket=False)
    assert isinstance(problem, HeaderProblem) and problem.kind == "bad_type"
    assert problem.header == header  # kept: answered with RST (§5.10.6.3)


@given(st.binary(max_size=100), st.integers(0, 1 << 20))
def test_any_bytes_decode_to_a_header_or_a_problem(raw: bytes, available: int) -> None:
    result = decode_header(raw, available, guest_cid=GUEST, seqpacket=True)
    assert isinstance(result, Header | HeaderProblem)
    if len(raw) < HEADER.size:
        assert isinstance(result, HeaderProblem) and result.kind == "short_header"


def test_parse_connect() -> None:
    assert parse_connect(b"CONNECT 1234", 1) == [1234]
    assert parse_connect(b"CONNECT 1 3 4", 3) == [1, 3, 4]
    for bad in (b"CONNECT", b"CONNECT x", b"CONNECT -1", b"CONNECT 4294967296", b"connect 1",
                b"CONNECT 1 2", b"", b"OK 1"):
        assert parse_connect(bad, 1) is None


def test_take_line_keeps_what_follows_the_line() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        buffer = bytearray()
        a.sendall(b"CONNECT 5")
        assert take_line(buffer, b, seqpacket=False) is None
        a.sendall(b"000\nearly data")
        assert take_line(buffer, b, seqpacket=False) == b"CONNECT 5000"
        assert buffer == b"early data"


def test_take_line_refuses_long_lines_and_early_close() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * (LINE_LIMIT + 1))
        with pytest.raises(ValueError, match="too long"):
            take_line(bytearray(), b, seqpacket=False)
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(ConnectionError):
            take_line(bytearray(), b, seqpacket=False)


def test_addresses() -> None:
    assert port_path(__import__("pathlib").Path("/run/v.sock"), 1234) == "/run/v.sock_1234"
    assert rendezvous("lab", 4, seqpacket=True) == b"\0pyvirtio-vsock/lab/4/seqpacket"


def test_credit_accounting_wraps_at_32_bits() -> None:
    """§5.10.6.3: peer_free = buf_alloc - (tx_cnt - fwd_cnt), free-running u32 counters."""
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(1, 2, 3, VsockType.STREAM, a, Initiator.GUEST, 4096)
        conn.tx_cnt = 5
        conn.update_peer_credit(1000, 0xFFFFFFFF - 10)  # 16 bytes in flight across the wrap
        assert conn.peer_free() == 1000 - 16
        conn.rx_cnt = 3
        conn.fwd_cnt = conn.sent_fwd_cnt = 0xFFFFFFFE
        assert conn.held() == 5
        assert conn.accepts(4091) and not conn.accepts(4092)
        conn.forwarded(1023)
        assert not conn.want_credit_update
        conn.forwarded(1)
        assert conn.want_credit_update  # a quarter of the buffer freed: tell the guest
