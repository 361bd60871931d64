"""``pyvirtio probe``: what a vhost-user back-end offers, decoded by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyvirtio.devices.registry import device_types
from pyvirtio.errors import BackendError
from pyvirtio.frontend.connection import VhostUserFrontend
from pyvirtio.spec.common import feature_names
from pyvirtio.vhost_user.protocol import ProtocolFeature

__all__ = ["DeviceMismatch", "ProbeReport", "config_read", "device_mismatch", "probe"]

#: Bits neither virtio 1.x nor the device define: legacy and vhost ones.
_OTHER_BITS = {
    "bit24": "NOTIFY_ON_EMPTY (legacy)",
    "bit26": "VHOST_F_LOG_ALL",
    "bit27": "ANY_LAYOUT (legacy)",
    "bit30": "VHOST_USER_F_PROTOCOL_FEATURES",
}


@dataclass(frozen=True, slots=True)
class DeviceMismatch:
    """The back-end evidently is not the device type asked for.

    ``evidence`` says why (feature bits the asked type does not define, a config
    space it would not have); ``looks_like`` names the types that fit instead.
    """

    expected: str
    looks_like: list[str]
    evidence: list[str]

    def describe(self) -> str:
        """One sentence for people."""
        guess = ("; it looks like " + " or ".join(f"virtio-{kind}" for kind in self.looks_like)
                 if self.looks_like else "")
        return (f"the back-end does not look like virtio-{self.expected}: "
                f"{'; '.join(self.evidence)}{guess} (decoded as virtio-{self.expected} "
                "anyway)")


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
    #: Why the back-end seems to be another device than ``device``, if it does.
    device_mismatch: DeviceMismatch | None = None
    #: What a user should know before trusting the decoding (``pyvirtio probe`` prints
    #: them on stderr).
    warnings: list[str] = field(default_factory=list)

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

    ``device`` names a device type of the registry
    (:func:`pyvirtio.devices.registry.device_types`), which names the feature bits
    and decodes the config space.

    Raises:
        BackendError: the back-end misbehaved.
        KeyError: unknown device type.
    """
    device_type = device_types()[device]
    with VhostUserFrontend.connect(socket_path) as fe:
        fe.probe()
        warnings: list[str] = []
        raw: bytes | None = None
        if fe.has_protocol_feature(ProtocolFeature.CONFIG):
            try:
                raw = fe.get_config(config_read(device))
            except BackendError as exc:
                warnings.append(f"cannot read the config space: {exc}")
        config: dict[str, int | bool | str] | None = None
        if device_type.decode_config is not None and raw is not None:
            config = device_type.decode_config(raw)
        mismatch = device_mismatch(device, fe.features_offered, raw)
        if mismatch is not None:
            warnings.insert(0, mismatch.describe())
        known = set(ProtocolFeature.__members__.values())
        proto_names = [
            ProtocolFeature(bit).name if bit in known else f"bit{bit}"
            for bit in range(64)
            if fe.protocol_features_offered >> bit & 1
        ]
        feature_list = [
            _OTHER_BITS.get(name, name)
            for name in feature_names(fe.features_offered, device_type.feature_names)
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
            device_mismatch=mismatch,
            warnings=warnings,
        )


#: Config bytes read from a device type without a config space (virtio-rng, §5.4.4):
#: enough to see whether there is one.
NO_CONFIG_READ = 8


def config_read(device: str) -> int:
    """Bytes of config space ``probe`` reads for the device type ``device``: the fields
    its decoder names, or :data:`NO_CONFIG_READ` for one without a config space.

    Raises:
        KeyError: unknown device type.
    """
    return device_types()[device].config_read or NO_CONFIG_READ


#: The device-specific feature bits (VIRTIO 1.4 §6: 0 to 23 and 50 to 127; the
#: vhost-user feature word holds the first 64).
DEVICE_SPECIFIC_BITS = ((1 << 24) - 1) | (((1 << 64) - 1) & ~((1 << 50) - 1))


def device_mismatch(device: str, features: int, config: bytes | None) -> DeviceMismatch | None:
    """Whether a back-end offering ``features`` and ``config`` is evidently not ``device``.

    The evidence, from the device types of the registry:

    - device-specific feature bits (0-23, 50-63) that ``device``'s type does not
      name (virtio-rng defines none, §5.4.3; virtio-blk none from 18 on, nor MTU's
      bit 3; virtio-net not blk's BLK_SIZE bit 6);
    - a config space with data, for a type without one (virtio-rng, §5.4.4);
    - for a type with a config space and feature bits of its own (blk, net), no
      device-specific feature at all *and* a config space that is missing or all
      zeros (a disk of 0 sectors, a MAC of zeros): what a device without config
      space (rng) offers.  A type without feature bits (virtio-input, §5.8.3) is not
      judged so: at rest its config space reads as zeros.

    ``config`` is what GET_CONFIG returned (None: not readable).  The types that fit
    instead are those naming every offered bit; when no bit is offered, those with
    a config space if it holds data, else those without a config space or without
    feature bits of their own.

    Raises:
        KeyError: unknown device type.
    """
    types = device_types()
    asked = types[device]
    offered = features & DEVICE_SPECIFIC_BITS
    config_empty = config is None or not any(config)
    evidence: list[str] = []
    undefined = offered & ~asked.defined_features
    if undefined:
        bits = [bit for bit in range(64) if undefined >> bit & 1]
        evidence.append(f"it offers feature bit{'s' if len(bits) > 1 else ''} "
                        f"{', '.join(map(str, bits))}, which virtio-{device} does not define")
    if not asked.has_config and not config_empty:
        assert config is not None
        evidence.append(f"its config space holds data ({config.hex()}...), "
                        f"and virtio-{device} has none")
    if asked.has_config and asked.defined_features and not offered and config_empty:
        evidence.append("it offers no device-specific feature and its config space is "
                        f"{'unreadable' if config is None else 'all zeros'}")
    if not evidence:
        return None
    others = [name for name in sorted(types) if name != device]
    if not offered:
        # A type without feature bits of its own offers none either, and its config
        # space may read as zeros at rest (virtio-input's before a selector is written).
        # With config data, any type with a config space fits (fs: a tag, no bits).
        looks_like = ([name for name in others
                       if not types[name].has_config or not types[name].defined_features]
                      if config_empty else [name for name in others if types[name].has_config])
    else:
        looks_like = [name for name in others
                      if not offered & ~types[name].defined_features]
    return DeviceMismatch(expected=device, looks_like=looks_like, evidence=evidence)
