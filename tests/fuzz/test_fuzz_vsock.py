"""Fuzz target: virtio-vsock's packet headers and protocol (VIRTIO 1.4 §5.10.6), hostile driver.

A case is a list of tx chains (a header near the valid ones — right CIDs, ports a
host program listens on, every op and type, lengths around the payload — or
arbitrary bytes, cut into descriptors at arbitrary points) and the rx buffers the
driver posts (some smaller than a header).  They go through the real back-end and
engine (:class:`~pyvirtio.testing.DeviceHarness`, split or packed rings) into
:class:`~pyvirtio.devices.vsock.VsockDevice`, whose host side is a real Unix
socket listener that accepts and never reads.

Invariants:

- nothing escapes and nothing is logged with a traceback; every tx chain is used
  with length 0;
- the ``dropped_*`` counters of the header checks count exactly the headers a model
  of §5.10.6 rejects (short, ``len`` beyond the chain or 64 KiB, unknown op, source
  CID not the guest's, destination the guest itself or reserved, unknown type);
- buffering stays bounded: no connection holds more than the credit it published,
  the RSTs waiting for rx buffers stay under their cap;
- the device keeps serving: afterwards a REQUEST to a listening host port gets its
  RESPONSE.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from pyvirtio.devices.vsock.device import MAX_ORPHAN_RSTS, VsockConfig, VsockDevice
from pyvirtio.devices.vsock.packet import MAX_PAYLOAD, Header, encode_header
from pyvirtio.spec.vsock import HEADER, RXQ, TXQ, VsockOp, VsockType
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

GUEST = 3
PORT = 80
BUF = 8192
CHECKS = ("short_header", "bad_len", "bad_op", "bad_cid", "bad_type")


@dataclass(frozen=True)
class TxChain:
    """One driver-to-device packet: its bytes cut at ``cuts``."""

    data: bytes
    cuts: tuple[int, ...]


@dataclass(frozen=True)
class VsockCase:
    packed: bool
    rx_buffers: tuple[int, ...]
    chains: tuple[TxChain, ...]


def _packet() -> st.SearchStrategy[bytes]:
    def build(header: Header, payload: bytes, delta: int) -> bytes:
        return encode_header(header._replace(len=max(0, len(payload) + delta))) + payload

    headers = st.builds(
        Header,
        st.sampled_from([GUEST, GUEST, GUEST, 2, 4, GUEST | 1 << 32]),
        st.sampled_from([2, 2, 2, GUEST, 0, 1, 0xFFFFFFFF, 4]),
        st.integers(1000, 1002),
        st.just(PORT),
        st.just(0),
        st.sampled_from([1, 1, 2, 0, 3, 0xFFFF]),
        st.one_of(st.sampled_from(list(VsockOp)), st.integers(0, 0xFFFF)),
        st.integers(0, 3),
        st.sampled_from([0, 4096, 65536, 0xFFFFFFFF]),
        st.integers(0, 0xFFFFFFFF),
    )
    near = st.builds(build, headers, st.binary(max_size=300),
                     st.sampled_from([0, 0, 0, 1, -1, 1 << 20, MAX_PAYLOAD]))
    return st.one_of(near, near, st.binary(min_size=1, max_size=60))


def _chain() -> st.SearchStrategy[TxChain]:
    return _packet().flatmap(lambda data: st.builds(
        TxChain, st.just(data),
        st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3, unique=True).map(
            lambda cuts: tuple(sorted(cuts)))))


def vsock_cases() -> st.SearchStrategy[VsockCase]:
    return st.builds(
        VsockCase,
        st.booleans(),
        st.lists(st.sampled_from([8, 44, 100, 4140]), max_size=10).map(tuple),
        st.lists(_chain(), max_size=14).map(tuple),
    )


def _rejected(data: bytes, seqpacket: bool) -> str | None:
    """The model (§5.10.6): why a header is dropped, written apart from the decoder."""
    if len(data) < 44:
        return "short_header"
    src_cid = int.from_bytes(data[0:8], "little")
    dst_cid = int.from_bytes(data[8:16], "little")
    length = int.from_bytes(data[24:28], "little")
    type_ = int.from_bytes(data[28:30], "little")
    op = int.from_bytes(data[30:32], "little")
    if length > len(data) - 44 or length > 65536:
        return "bad_len"
    if not 1 <= op <= 7:
        return "bad_op"
    if src_cid != GUEST or dst_cid in (0, 1, GUEST) or dst_cid >= 0xFFFFFFFF:
        return "bad_cid"
    if type_ not in ((1, 2) if seqpacket else (1,)):
        return "bad_type"
    return None


def _pieces(chain: TxChain) -> list[bytes]:
    bounds = [0, *[c for c in chain.cuts if c < len(chain.data)], len(chain.data)]
    return [chain.data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@fuzz_target("vsock", vsock_cases(), types=[VsockCase, TxChain], quick_examples=150)
def test_vsock_survives_a_hostile_driver(case: VsockCase) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-vsock-") as tmp:
        uds = Path(tmp) / "v.uds"
        device = VsockDevice(VsockConfig(GUEST, uds, tx_buffer_size=BUF))
        listeners = []
        for port, kind in ((PORT, socket.SOCK_STREAM), (PORT + 1, socket.SOCK_SEQPACKET)):
            listener = socket.socket(socket.AF_UNIX, kind)
            listener.bind(f"{uds}_{port}")
            listener.listen(64)
            listeners.append(listener)
        try:
            with DeviceHarness(device, packed=case.packed, queue_size=64) as harness:
                for size in case.rx_buffers:
                    harness.post(RXQ, writable=size)
                harness.kick(RXQ)
                expected = {kind: 0 for kind in CHECKS}
                for chain in case.chains:
                    reason = _rejected(chain.data, seqpacket=True)
                    if reason is not None:
                        expected[reason] += 1
                    used = harness.request(TXQ, _pieces(chain))
                    assert used.length == 0
                    for conn in device.conns.values():
                        assert conn.held() <= BUF
                harness.advance(0)
                kinds = device.stats[TXQ].kinds
                assert {kind: kinds[f"dropped_{kind}"] for kind in CHECKS} == expected
                assert len(device._orphans) <= MAX_ORPHAN_RSTS
                # Still serving: a REQUEST from a fresh port gets its RESPONSE.
                harness.used(RXQ)
                for _ in range(40):
                    harness.post(RXQ, writable=4140)
                harness.kick(RXQ)
                request = Header(GUEST, 2, 4000, PORT, 0, VsockType.STREAM, VsockOp.REQUEST, 0,
                                 65536, 0)
                harness.request(TXQ, encode_header(request))
                harness.advance(0)
                answers = [Header._make(HEADER.unpack_from(u.data)) for u in harness.used(RXQ)
                           if u.length >= HEADER.size]
                assert any(a.op == VsockOp.RESPONSE and a.dst_port == 4000 for a in answers)
        finally:
            device.close()
            for listener in listeners:
                listener.close()
