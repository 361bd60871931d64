"""virtio-rng: an entropy source (VIRTIO 1.4 §5.4 Entropy Device).

The driver posts device-writable buffers on ``requestq``; the device fills them
with bytes from ``os.getrandom`` (the kernel's CSPRNG).
"""

from __future__ import annotations

import argparse
import logging
import os

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import DeviceType, ServeOptions
from pyvirtio.spec.common import DeviceId
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["MAX_FILL", "RNG_TYPE", "RngDevice"]

log = logging.getLogger(__name__)

#: Bytes filled per request at most: a guest asking for gigabytes gets a short
#: answer (§5.4.6.2 lets the device fill less; ``len`` tells the driver how much).
MAX_FILL = 64 * 1024


class RngDevice(VirtioDevice):
    """The entropy device: one queue, no features, no config space."""

    device_id = DeviceId.ENTROPY
    num_queues = 1

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers with random bytes (§5.4.6.2)."""
        stats = self.stats[queue]
        if chain.readable:
            stats.violations += 1
            log.warning("queue %d: request %d has %d device-readable bytes; the driver "
                        "must post only writable buffers (VIRTIO 1.4 §5.4.6.1)",
                        queue, chain.head, chain.readable_len)
        want = min(chain.writable_len, MAX_FILL)
        data = os.getrandom(want)
        pos = 0
        for view in chain.writable:
            if pos >= want:
                break
            n = min(len(view), want - pos)
            view[:n] = data[pos : pos + n]
            pos += n
        stats.bytes_in += pos
        return pos


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    # The logger ``pyvirtio serve`` always used for its start-up lines.
    logging.getLogger("pyvirtio").info("virtio-rng: entropy from getrandom()")
    return RngDevice(), ServeOptions()


RNG_TYPE = DeviceType(
    name="rng",
    summary="virtio-rng entropy source",
    description="Serve a virtio-rng device (QEMU: -device vhost-user-rng-pci).",
    device_id=DeviceId.ENTROPY,
    qemu_device="vhost-user-rng-pci",
    factory=_make,
)
"""virtio-rng's registry entry: no options of its own, no feature bits (§5.4.3) and no
config space (§5.4.4)."""
