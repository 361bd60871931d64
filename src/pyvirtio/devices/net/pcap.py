"""A pcap capture file (the classic libpcap format, LINKTYPE_ETHERNET).

``tcpdump -r FILE`` and Wireshark read it.  Every record is flushed as it is
written, so the file is readable while the daemon runs and complete after a
SIGKILL.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

__all__ = ["LINKTYPE_ETHERNET", "PCAP_HEADER", "PCAP_MAGIC", "PCAP_RECORD", "PcapWriter"]

#: Magic of a microsecond-resolution capture, written in native order (readers detect it).
PCAP_MAGIC = 0xA1B2C3D4
#: Global header: magic, version 2.4, thiszone, sigfigs, snaplen, link type.
PCAP_HEADER = struct.Struct("<IHHiIII")
#: Record header: seconds, microseconds, captured length, original length.
PCAP_RECORD = struct.Struct("<IIII")
LINKTYPE_ETHERNET = 1


class PcapWriter:
    """Appends Ethernet frames to a new pcap file.

    Args:
        path: the file (truncated if it exists).
        snaplen: the largest captured length; longer frames are cut, their
            original length kept in the record (tcpdump's default: a GSO packet,
            up to 64 KiB and its headers, is whole).

    Raises:
        OSError: the file cannot be created.
    """

    def __init__(self, path: Path, snaplen: int = 262144) -> None:
        self.path = path
        self.snaplen = snaplen
        self.frames = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        self._file.flush()

    def write(self, frame: bytes, timestamp: float | None = None) -> None:
        """Record one frame (at ``timestamp``, default now)."""
        if self._file.closed:
            return
        now = time.time() if timestamp is None else timestamp
        seconds = int(now)
        micros = min(int((now - seconds) * 1_000_000), 999_999)
        data = frame[: self.snaplen]
        self._file.write(PCAP_RECORD.pack(seconds, micros, len(data), len(frame)) + data)
        self._file.flush()
        self.frames += 1

    def close(self) -> None:
        """Close the file."""
        self._file.close()
