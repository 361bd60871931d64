"""Temporary alias: virtio-net's registry entry moved to :mod:`pyvirtio.devices.net.entry`
(``registry.BUILTIN`` still names this module until it is updated)."""

from pyvirtio.devices.net.entry import NET_TYPE

__all__ = ["NET_TYPE"]
