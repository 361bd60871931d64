"""Unit tests of pyvirtio, one module per layer (no QEMU, no guest)."""
