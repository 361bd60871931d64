"""Device models: each implements :class:`pyvirtio.devices.base.VirtioDevice`."""

from pyvirtio.devices.base import QueueStats, VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice

__all__ = ["BlockConfig", "BlockDevice", "QueueStats", "RngDevice", "VirtioDevice"]
