"""Device models: the device API (:mod:`.base`) and the built-in devices, each
implementing :class:`pyvirtio.devices.base.VirtioDevice` in its own module.

The package imports none of its modules itself, so importing the API does not
load every device.
"""
