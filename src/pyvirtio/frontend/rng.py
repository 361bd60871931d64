"""A virtio-rng driver on top of the vhost-user front-end (VIRTIO 1.4 §5.4)."""

from __future__ import annotations

from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import BackendError
from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.spec.common import Feature

__all__ = ["RngDriver"]


class RngDriver(Closing):
    """An entropy device driven through a vhost-user back-end.

    Args:
        frontend: a connected front-end, not yet negotiated.
        max_request: largest single read.
    """

    def __init__(self, frontend: VhostUserFrontend, *, max_request: int = 1 << 16) -> None:
        self.frontend = frontend
        frontend.probe()
        frontend.negotiate((1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX))
        self.ram = GuestRam(max_request + (1 << 20))
        frontend.share_memory(self.ram)
        self.queue = frontend.setup_queue(0, 64)
        frontend.driver_ok()
        self.max_request = max_request
        self._buffer = self.ram.alloc(max_request, 4096)
        self.timeout = 10.0

    @classmethod
    def open(cls, socket_path: Path | str) -> RngDriver:
        """Connect to ``socket_path`` and set the device up."""
        frontend = VhostUserFrontend.connect(socket_path)
        try:
            return cls(frontend)
        except BaseException:
            frontend.close()
            raise

    def read(self, length: int) -> bytes:
        """Ask for ``length`` random bytes; return what the device gave (§5.4.6.2: >= 1).

        Raises:
            BackendError: no answer in time, or a used length outside 1..length.
        """
        if not 0 < length <= self.max_request:
            raise ValueError(f"length must be 1..{self.max_request}")
        q = self.queue
        got = q.submit((), [(self._buffer, length)], timeout=self.timeout,
                       what="entropy request")
        if not 0 < got <= length:
            raise BackendError(f"device wrote {got} bytes for a {length}-byte request "
                               "(VIRTIO 1.4 §5.4.6.2: 1..length)", request="virtqueue")
        return bytes(self.ram.view(self._buffer, got))

    def close(self) -> None:
        """Stop the ring and disconnect."""
        self.frontend.close()

