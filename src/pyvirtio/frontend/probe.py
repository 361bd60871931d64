"""``pyvirtio probe``: what a vhost-user back-end offers, decoded by name."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from pathlib import Path

from pyvirtio.frontend.blk import BLK_CONFIG_READ, BlkInfo
from pyvirtio.frontend.connection import VhostUserFrontend
from pyvirtio.spec.blk import BlkFeature
from pyvirtio.spec.common import feature_names
from pyvirtio.spec.net import CONFIG, CONFIG_SIZE, NetFeature, NetStatus
from pyvirtio.vhost_user.protocol import ProtocolFeature

__all__ = ["DEVICE_FEATURES", "ProbeReport", "probe"]

#: Bits neither virtio 1.x nor the device define: legacy and vhost ones.
_OTHER_BITS = {
    "bit24": "NOTIFY_ON_EMPTY (legacy)",
    "bit26": "VHOST_F_LOG_ALL",
    "bit27": "ANY_LAYOUT (legacy)",
    "bit30": "VHOST_USER_F_PROTOCOL_FEATURES",
}
#: Device-specific feature names per device kind.
DEVICE_FEATURES: dict[str, type[enum.IntEnum] | None] = {
    "blk": BlkFeature, "net": NetFeature, "rng": None,
}


@dataclass(slots=True)
class ProbeReport:
    """What the back-end said (``--json`` prints it)."""

    socket: str
    device: str
    features: int
    feature_names: list[str]
    protocol_features: int
    protocol_feature_names: list[str]
    queue_num: int | None
    max_mem_slots: int | None
    config: dict[str, int | bool | str] | None

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly dict."""
        return asdict(self)

    def render(self) -> str:
        """Human-readable lines."""
        lines = [
            f"back-end at {self.socket} ({self.device})",
            f"features         {self.features:#018x}",
            *(f"  {name}" for name in self.feature_names),
            f"protocol features {self.protocol_features:#x}",
            *(f"  {name}" for name in self.protocol_feature_names),
            f"queues           {self.queue_num if self.queue_num is not None else 'not said'}",
            f"max memory slots {self.max_mem_slots if self.max_mem_slots is not None else 'n/a'}",
        ]
        if self.config is None:
            lines.append("config space     none")
        else:
            lines.append("config space")
            lines.extend(f"  {key:<26} {value}" for key, value in self.config.items())
        return "\n".join(lines)


def probe(socket_path: Path | str, device: str) -> ProbeReport:
    """Connect, read features, protocol features, queue count, slots and config.

    Raises:
        BackendError: the back-end misbehaved.
        KeyError: unknown device kind.
    """
    names = DEVICE_FEATURES[device]
    with VhostUserFrontend.connect(socket_path) as fe:
        fe.probe()
        config: dict[str, int | bool | str] | None = None
        if device == "blk" and fe.has_protocol_feature(ProtocolFeature.CONFIG):
            config = asdict(BlkInfo.decode(fe.get_config(BLK_CONFIG_READ)))
        elif device == "net" and fe.has_protocol_feature(ProtocolFeature.CONFIG):
            config = _net_config(fe.get_config(CONFIG_SIZE))
        known = set(ProtocolFeature.__members__.values())
        proto_names = [
            ProtocolFeature(bit).name if bit in known else f"bit{bit}"
            for bit in range(64)
            if fe.protocol_features_offered >> bit & 1
        ]
        feature_list = [
            _OTHER_BITS.get(name, name) for name in feature_names(fe.features_offered, names)
        ]
        return ProbeReport(
            socket=str(socket_path),
            device=device,
            features=fe.features_offered,
            feature_names=feature_list,
            protocol_features=fe.protocol_features_offered,
            protocol_feature_names=proto_names,
            queue_num=fe.queue_num,
            max_mem_slots=fe.max_mem_slots,
            config=config,
        )


def _net_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_net_config`` (VIRTIO 1.4 §5.1.4), the fields pyvirtio fills in."""
    mac, status, pairs, mtu, *_ = CONFIG.unpack(raw)
    return {
        "mac": ":".join(f"{b:02x}" for b in mac),
        "link_up": bool(status & NetStatus.LINK_UP),
        "announce": bool(status & NetStatus.ANNOUNCE),
        "max_virtqueue_pairs": pairs,
        "mtu": mtu,
    }
