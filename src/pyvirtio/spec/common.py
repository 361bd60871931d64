"""Device IDs, device status bits and reserved feature bits.

VIRTIO 1.4 §2.1 (Device Status Field), §5 (Device Types), §6 (Reserved Feature Bits).
"""

from __future__ import annotations

import enum

__all__ = ["DeviceId", "DeviceStatus", "Feature", "feature_names"]


class DeviceId(enum.IntEnum):
    """Virtio device IDs (VIRTIO 1.4 §5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON_TRADITIONAL = 5
    SCSI = 8
    NINEP = 9
    BALLOON = 13
    GPU = 16
    RTC = 17
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    IOMMU = 23
    MEMORY = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    I2C = 34
    GPIO = 41


class DeviceStatus(enum.IntFlag):
    """Bits of the device status field (VIRTIO 1.4 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(enum.IntEnum):
    """Reserved (device-independent) feature bit numbers (VIRTIO 1.4 §6)."""

    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41
    SUSPEND = 43


def feature_names(bits: int, device_features: type[enum.IntEnum] | None = None) -> list[str]:
    """Name every set bit of a feature word, device-specific names first.

    Bits neither enum knows are named ``bit<N>``.
    """
    names: list[str] = []
    for bit in range(64):
        if not bits & (1 << bit):
            continue
        name = None
        if device_features is not None:
            try:
                name = device_features(bit).name
            except ValueError:
                name = None
        if name is None:
            try:
                name = Feature(bit).name
            except ValueError:
                name = f"bit{bit}"
        names.append(name)
    return names
