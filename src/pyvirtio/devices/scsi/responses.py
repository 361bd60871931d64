"""Writing virtio-scsi responses into a chain (VIRTIO 1.4 §5.6.6.1, §5.6.6.2)."""

from __future__ import annotations

from pyvirtio.errors import RequestTooShort
from pyvirtio.spec.scsi import CTRL_TMF_RESP, RESP_HEADER, Response
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["KINDS", "respond", "tmf_answer"]


def respond(chain: DescriptorChain, head_len: int, response: int, *, status: int = 0,
             resid: int = 0, sense: bytes = b"", data: bytes = b"", data_len: int = 0) -> int:
    """Write a ``virtio_scsi_cmd_resp`` (§5.6.6.1) at the start of the writable part;
    ``data`` follows the sense field, or ``data_len`` bytes already there (a read).
    Returns the used length."""
    writer = chain.writer()
    writer.write_obj(RESP_HEADER, len(sense), max(resid, 0), 0, status, response)
    if sense:
        writer.write(sense)
    if data:
        writer.skip(head_len - writer.written)
        writer.write(data)
        return writer.written
    if data_len:
        return head_len + data_len
    return head_len


def tmf_answer(chain: DescriptorChain, response: Response) -> int:
    """Write a task management function's ``response`` (§5.6.6.2); the used length."""
    writer = chain.writer()
    try:
        writer.write_obj(CTRL_TMF_RESP, response)
    except RequestTooShort:
        return 0
    return writer.written


#: The ``kinds`` counter of each operation code (``pyvirtio stats``).
KINDS: dict[int, str] = {
    0x00: "tur", 0x03: "request_sense", 0x08: "read", 0x0A: "write", 0x12: "inquiry",
    0x15: "mode_select", 0x1A: "mode_sense", 0x1B: "start_stop", 0x1E: "prevent_allow",
    0x25: "read_capacity", 0x28: "read", 0x2A: "write", 0x2E: "write", 0x2F: "verify",
    0x35: "sync", 0x41: "write_same", 0x42: "unmap", 0x43: "read_toc",
    0x46: "get_configuration", 0x4A: "get_event_status", 0x51: "read_disc_info",
    0x55: "mode_select", 0x5A: "mode_sense", 0x88: "read", 0x8A: "write", 0x8E: "write",
    0x8F: "verify", 0x91: "sync", 0x93: "write_same", 0x9E: "read_capacity",
    0xA0: "report_luns", 0xA3: "report_opcodes", 0xA8: "read", 0xAA: "write",
}
