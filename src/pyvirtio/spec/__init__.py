"""Constants and wire structures of the VIRTIO 1.4 specification."""
