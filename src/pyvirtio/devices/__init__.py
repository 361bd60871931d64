"""Device models: each implements :class:`pyvirtio.devices.base.VirtioDevice`."""

from pyvirtio.devices.base import DeviceHost, QueueStats, VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.rng import RngDevice

__all__ = [
    "BlockConfig",
    "BlockDevice",
    "DeviceHost",
    "NetDevice",
    "NetDeviceConfig",
    "QueueStats",
    "RngDevice",
    "VirtioDevice",
]
