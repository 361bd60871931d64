"""Virtqueues: the rings a driver and a device share (VIRTIO 1.4 §2.6, §2.7, §2.8)."""

from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter, take_views
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import PackedQueue, PackedRingAddresses
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

__all__ = [
    "DescriptorChain",
    "DriverPackedQueue",
    "DriverSplitQueue",
    "PackedQueue",
    "PackedRingAddresses",
    "RingAddresses",
    "SplitQueue",
    "gather",
    "scatter",
    "take_views",
]
