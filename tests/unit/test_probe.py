"""``pyvirtio probe --device X``: a back-end that is evidently another device is
reported (its feature bits or its config space say so), a matching one is not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.balloon import BalloonDevice
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.console import ConsoleConfig, ConsoleDevice
from pyvirtio.devices.fs.device import FsDevice
from pyvirtio.devices.fs.server import FsConfig
from pyvirtio.devices.gpu import GpuDevice
from pyvirtio.devices.input import InputDevice, Kind, capabilities
from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.registry import device_types
from pyvirtio.devices.rng import RngDevice
from pyvirtio.devices.scsi import ScsiDevice, ScsiOptions
from pyvirtio.devices.vsock.device import VsockDevice
from pyvirtio.devices.vsock.farside import VsockConfig
from pyvirtio.frontend.probe import config_read, device_mismatch

KINDS = sorted(r.device_type.name for r in device_types().registrations if r.builtin)
#: What qemu-storage-daemon's vhost-user-blk export offers (README, "probe").
QSD_BLK_FEATURES = 0x175007E46


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[dict[str, VirtioDevice]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    made: dict[str, VirtioDevice] = {
        "blk": BlockDevice(BlockConfig(image=image)),
        "net": NetDevice(NetDeviceConfig(mac=bytes.fromhex("020000000001")), None),
        "rng": RngDevice(),
        "balloon": BalloonDevice(),
        "console": ConsoleDevice(ConsoleConfig(console_socket=tmp_path / "console.sock")),
        "fs": FsDevice(FsConfig(shared_dir=tmp_path, tag="probe", sandbox="none")),
        "gpu": GpuDevice(),
        "input": InputDevice(capabilities(Kind.KEYBOARD)),
        "vsock": VsockDevice(VsockConfig(3, tmp_path / "v.uds")),
        "scsi": ScsiDevice(ScsiOptions(disks=(image,))),
    }
    for device in made.values():
        device.start()
    yield made
    for device in made.values():
        device.close()


def get_config(device: VirtioDevice, size: int) -> bytes:
    """What pyvirtio's back-end answers GET_CONFIG: the space, cut or padded with zeros."""
    return (device.config_space() + bytes(size))[:size]


#: Pairs (served, asked) that feature bits and config space cannot tell apart: every bit
#: the served device offers is one the asked type defines too, and both have a config
#: space (vhost-user carries no device ID).  Probing one as the other is not flagged.
#: fs offers no feature bit of its own, and a tag in its config space; input none at all
#: (and zeros at rest); scsi, vsock and gpu offer only low bits that many types define.
_LOOK_ALIKE = {
    "balloon": "gpu net",
    "console": "balloon gpu net scsi vsock",
    "fs": "balloon blk console gpu input net scsi vsock",
    "gpu": "balloon blk console net scsi vsock",
    "input": "rng",
    "rng": "input",
    "scsi": "balloon blk console gpu net vsock",
    "vsock": "balloon console gpu net scsi",
}
INDISTINGUISHABLE = {(served, asked) for served, types in _LOOK_ALIKE.items()
                     for asked in types.split()}


@pytest.mark.parametrize("served", KINDS)
@pytest.mark.parametrize("asked", KINDS)
def test_a_device_probed_as_another_type_is_named_and_as_itself_is_not(
    devices: dict[str, VirtioDevice], served: str, asked: str
) -> None:
    device = devices[served]
    mismatch = device_mismatch(asked, device.offered_features(),
                               get_config(device, config_read(asked)))
    if served == asked or (served, asked) in INDISTINGUISHABLE:
        assert mismatch is None
        return
    assert mismatch is not None
    assert mismatch.expected == asked and served in mismatch.looks_like
    assert asked not in mismatch.looks_like
    assert mismatch.evidence
    assert f"does not look like virtio-{asked}" in mismatch.describe()
    assert f"virtio-{served}" in mismatch.describe()


def test_rng_has_no_feature_bits_and_no_config_space() -> None:
    mismatch = device_mismatch("rng", 1 << 5, None)  # blk's RO or net's MAC
    assert mismatch is not None
    assert mismatch.evidence == ["it offers feature bit 5, which virtio-rng does not define"]
    assert mismatch.looks_like == ["balloon", "blk", "gpu", "net"]  # each defines bit 5
    mismatch = device_mismatch("rng", 0, b"\x01" + bytes(7))
    assert mismatch is not None and "config space holds data" in mismatch.evidence[0]
    assert device_mismatch("rng", 0, None) is None  # no CONFIG protocol feature
    assert device_mismatch("rng", 0, bytes(8)) is None


def test_qemu_storage_daemon_features_fit_blk_only() -> None:
    assert device_mismatch("blk", QSD_BLK_FEATURES, None) is None
    net = device_mismatch("net", QSD_BLK_FEATURES, None)
    assert net is not None and net.looks_like == ["blk"]
    assert "bit 6" in net.evidence[0]  # BLK_SIZE; virtio-net leaves it to legacy GSO


def test_no_device_feature_and_an_empty_config_look_like_rng() -> None:
    for asked in ("blk", "net"):
        mismatch = device_mismatch(asked, 1 << 32, bytes(config_read(asked)))  # VERSION_1
        # input defines no feature bit, and its config space is all zeros at rest
        assert mismatch is not None and mismatch.looks_like == ["input", "rng"]
        mismatch = device_mismatch(asked, 1 << 32, None)
        assert mismatch is not None and "unreadable" in mismatch.evidence[0]
    # Either alone is not evidence: a blk device without optional features...
    assert device_mismatch("blk", 1 << 32, (2048).to_bytes(8, "little") + bytes(52)) is None
    # ... and a net back-end without the CONFIG protocol feature (DPDK's).
    assert device_mismatch("net", 1 << 32 | 1 << 15, None) is None
