"""virtio-rng (entropy device) definitions (VIRTIO 1.4 §5.4 Entropy Device).

The entropy device has one queue (``requestq``), no feature bits and no
configuration space: the driver posts device-writable buffers and the device
fills them with random bytes.
"""

from __future__ import annotations

__all__ = ["REQUESTQ"]

#: Index of the only virtqueue (§5.4.2).
REQUESTQ = 0
