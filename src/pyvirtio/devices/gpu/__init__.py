"""virtio-gpu 2D (VIRTIO 1.4 §5.7) served to QEMU's ``vhost-user-gpu-pci``.

:mod:`.device` is the model (controlq and cursorq commands, scanouts),
:mod:`.resources` the resources and their guest backing with every bounds check,
:mod:`.display` the vhost-user-gpu socket to QEMU's display, :mod:`.edid` and
:mod:`.png` the images it makes, :mod:`.entry` its ``pyvirtio serve gpu`` and
``pyvirtio screenshot`` entry.
"""

from __future__ import annotations

from pyvirtio.devices.gpu.device import GpuConfig, GpuDevice

__all__ = ["GpuConfig", "GpuDevice"]
