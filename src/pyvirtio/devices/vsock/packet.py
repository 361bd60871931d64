"""vsock packet headers: decoding with the checks an untrusted driver needs (VIRTIO 1.4 §5.10.6).

:func:`decode_header` never raises for what a driver sends: a header is either a
:class:`Header` or a :class:`HeaderProblem`, the reason the device drops it (and
counts it under that reason's ``kind``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pyvirtio.spec.vsock import HEADER, MAX_CID, VsockOp, VsockType

__all__ = ["MAX_PAYLOAD", "Header", "HeaderProblem", "decode_header", "encode_header"]

#: The largest payload one packet may carry: Linux sends at most 64 KiB
#: (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); anything longer is a hostile ``len``.
MAX_PAYLOAD = 64 * 1024

_OPS = frozenset(int(op) for op in VsockOp) - {int(VsockOp.INVALID)}


class Header(NamedTuple):
    """A decoded ``struct virtio_vsock_hdr`` (§5.10.6)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


@dataclass(frozen=True, slots=True)
class HeaderProblem:
    """Why a header is dropped.

    Attributes:
        kind: the counter it goes to (``short_header``, ``bad_len``, ``bad_op``,
            ``bad_cid``, ``bad_type``).
        detail: for the log.
        header: the decoded header when there was one (a ``bad_type`` one is answered
            with RST, §5.10.6.3).
    """

    kind: str
    detail: str
    header: Header | None = None


def decode_header(
    raw: bytes, available: int, *, guest_cid: int, seqpacket: bool
) -> Header | HeaderProblem:
    """Decode and check a packet the driver sent on tx.

    ``raw``: the header bytes (at least :data:`HEADER.size` to be a header);
    ``available``: the readable bytes that follow it in the chain.  A header is
    dropped when it is short, when its ``len`` exceeds what follows or
    :data:`MAX_PAYLOAD`, when its op is unknown, when its source CID is not the
    guest's (§5.10.6.3: the driver MUST use ``guest_cid`` as the source) or its
    destination is the guest itself or reserved, and when its type is neither
    STREAM nor (with VIRTIO_VSOCK_F_SEQPACKET) SEQPACKET.
    """
    if len(raw) < HEADER.size:
        return HeaderProblem("short_header", f"{len(raw)} bytes, a header is {HEADER.size}")
    header = Header._make(HEADER.unpack_from(raw))
    if header.len > available or header.len > MAX_PAYLOAD:
        return HeaderProblem("bad_len", f"len {header.len} with {available} bytes after the "
                             f"header (at most {MAX_PAYLOAD})", header)
    if header.op not in _OPS:
        return HeaderProblem("bad_op", f"op {header.op}", header)
    if header.src_cid != guest_cid:
        return HeaderProblem("bad_cid", f"source CID {header.src_cid}, the guest's is "
                             f"{guest_cid}", header)
    if header.dst_cid in (0, 1, guest_cid) or header.dst_cid > MAX_CID:
        return HeaderProblem("bad_cid", f"destination CID {header.dst_cid}", header)
    if header.type != VsockType.STREAM and not (
            seqpacket and header.type == VsockType.SEQPACKET):
        return HeaderProblem("bad_type", f"type {header.type}", header)
    return header


def encode_header(header: Header) -> bytes:
    """``struct virtio_vsock_hdr`` (§5.10.6), little-endian; ``fwd_cnt`` wraps at 2**32."""
    return HEADER.pack(*header[:-1], header.fwd_cnt & 0xFFFFFFFF)
