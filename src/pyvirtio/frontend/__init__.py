"""The driver side: a vhost-user front-end and virtio drivers in Python.

pyvirtio can be the other end of the wire too: it drives any vhost-user
back-end (its own, qemu-storage-daemon, DPDK...) to inspect, test and measure it.
Its errors are in :mod:`pyvirtio.errors`: :class:`~pyvirtio.errors.BackendError`
(and :class:`~pyvirtio.errors.NetDriverError`), :class:`~pyvirtio.errors.BlkError`,
:class:`~pyvirtio.errors.GuestRamExhausted`.
"""

from pyvirtio.frontend.blk import BlkDriver, BlkInfo
from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.frontend.net import NetDriver
from pyvirtio.frontend.rng import RngDriver

__all__ = [
    "BlkDriver",
    "BlkInfo",
    "GuestRam",
    "NetDriver",
    "RngDriver",
    "VhostUserFrontend",
]
