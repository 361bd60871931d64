"""virtio-vsock: hybrid vsock over Unix sockets (:mod:`pyvirtio.devices.vsock.device`)."""
