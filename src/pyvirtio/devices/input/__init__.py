"""virtio-input (VIRTIO 1.4 §5.8): a keyboard, mouse, tablet or touch screen fed from the host.

:mod:`.device` is the model, :mod:`.caps` what each kind advertises, :mod:`.keymap`
the events ``pyvirtio input`` makes, :mod:`.client` that command and :mod:`.entry`
the ``pyvirtio serve input`` entry.
"""

from __future__ import annotations

from pyvirtio.devices.input.caps import AbsAxis, Capabilities, Kind, capabilities
from pyvirtio.devices.input.device import InputDevice

__all__ = ["AbsAxis", "Capabilities", "InputDevice", "Kind", "capabilities"]
