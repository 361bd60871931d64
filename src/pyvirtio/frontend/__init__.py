"""The driver side: a vhost-user front-end and virtio drivers in Python.

pyvirtio can be the other end of the wire too: it drives any vhost-user
back-end (its own, qemu-storage-daemon, DPDK...) to inspect, test and measure it.
"""

from pyvirtio.frontend.blk import BlkDriver, BlkError, BlkInfo
from pyvirtio.frontend.connection import BackendError, GuestRam, VhostUserFrontend
from pyvirtio.frontend.net import NetDriver, NetDriverError
from pyvirtio.frontend.rng import RngDriver

__all__ = [
    "BackendError",
    "BlkDriver",
    "BlkError",
    "BlkInfo",
    "GuestRam",
    "NetDriver",
    "NetDriverError",
    "RngDriver",
    "VhostUserFrontend",
]
