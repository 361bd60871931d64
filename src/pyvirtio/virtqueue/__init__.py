"""Virtqueues: the rings a driver and a device share (VIRTIO 1.4 §2.6, §2.7)."""

from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter, take_views
from pyvirtio.virtqueue.split import DriverSplitQueue, RingAddresses, SplitQueue

__all__ = [
    "DescriptorChain",
    "DriverSplitQueue",
    "RingAddresses",
    "SplitQueue",
    "gather",
    "scatter",
    "take_views",
]
