"""The vhost-user protocol: wire format (sans I/O, :mod:`.protocol`), the back-end
request channel (:mod:`.channel`), and the back-end: protocol state
(:mod:`.backend`), rings (:mod:`.rings`) and the queue engine (:mod:`.engine`).

The wire format and channel sit below the device API (:mod:`pyvirtio.devices.base`);
the back-end above it.  The package imports none of its modules itself.
"""
