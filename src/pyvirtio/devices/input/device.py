"""virtio-input: a keyboard, mouse, tablet or touch screen fed from the host
(VIRTIO 1.4 §5.8 Input Device).

- Config space (§5.8.4): the driver writes ``select`` and ``subsel`` and reads
  ``size`` and ``u``. QEMU's vhost-user-input forwards each guest write as a
  SET_CONFIG of the whole 136 bytes (offset 0) and each read as a GET_CONFIG, so the
  device keeps the two selector bytes (:meth:`InputDevice.write_config`) and
  answers from them (:meth:`InputDevice.config_space`); the other bytes of a write
  are ignored, they are what the front-end read before.
- eventq (queue 0): the host's events wait in :attr:`InputDevice.pending` until the
  driver has buffers, one event per buffer (§5.8.6). The queue works as a receive
  queue: :meth:`InputDevice.has_work` is False while nothing waits, so the
  driver's buffers stay available in the ring (never completed empty when the ring
  stops: Linux would read a stale event from one), and new events process the queue.
  Events are never dropped one by one: a whole ``input send`` is queued or refused
  (§5.8.6.2: buffer or drop an entire sequence).
- statusq (queue 1): the driver's feedback (LEDs, sounds), one event per buffer;
  the LEDs' state is kept (:attr:`InputDevice.leds`) and shown in the stats
  (``led capslock 1``).

Events come from the control socket (``pyvirtio input``): ``input send
TYPE,CODE,VALUE...`` queues them, ``input info`` describes the device.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence

from pyvirtio.devices.base import ControlCommand, ControlReply, QueueStats, VirtioDevice
from pyvirtio.devices.input.caps import Capabilities, Kind
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.input import (
    CONFIG_HEADER,
    CONFIG_PAYLOAD_SIZE,
    CONFIG_SIZE,
    EVENT,
    EVENTQ,
    STATUSQ,
    SYN_REPORT,
    EventType,
    Led,
)
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["MAX_PENDING", "InputDevice", "parse_events"]

log = logging.getLogger(__name__)

#: Events waiting for eventq buffers at most; an ``input send`` beyond is refused.
MAX_PENDING = 4096
#: Violations logged per queue and connection (then only counted).
_LOGGED = 10
#: Kinds counted on the eventq, by event type.
_EVENT_KINDS: dict[int, str] = {EventType.SYN: "syn", EventType.KEY: "key", EventType.REL: "rel",
                EventType.ABS: "abs", EventType.MSC: "msc", EventType.SW: "sw"}
_LED_NAMES: dict[int, str] = {Led.NUML: "numlock", Led.CAPSL: "capslock", Led.SCROLLL: "scrolllock",
              Led.COMPOSE: "compose", Led.KANA: "kana"}


def parse_events(words: list[str]) -> list[tuple[int, int, int]]:
    """``TYPE,CODE,VALUE`` words (the ``input send`` command) as events.

    Raises:
        ValueError: a word that is not three integers, or a field out of range
            (type and code: 16 bits; value: signed 32 bits).
    """
    events = []
    for word in words:
        parts = word.split(",")
        try:
            type_, code, value = (int(part) for part in parts)
        except ValueError:
            raise ValueError(f"not TYPE,CODE,VALUE: {word!r}") from None
        if not (0 <= type_ <= 0xFFFF and 0 <= code <= 0xFFFF
                and -(1 << 31) <= value < 1 << 31):
            raise ValueError(f"event out of range: {word!r}")
        events.append((type_, code, value))
    return events


class InputDevice(VirtioDevice):
    """An input device (§5.8) with the given capabilities.

    Attributes:
        caps: what the config space answers.
        kind: the kind it was made as (``input info`` tells the client).
        pending: packed events waiting for eventq buffers, oldest first.
        leds: the LEDs the driver reported on the statusq (``LED_*`` -> 0 or 1).
        delivered: events written to the guest since the daemon started.
    """

    device_id = DeviceId.INPUT
    num_queues = 2

    def __init__(self, caps: Capabilities, kind: Kind | None = None) -> None:
        super().__init__()
        self.caps = caps
        self.kind = kind
        self.select = 0
        self.subsel = 0
        self._spaces: dict[tuple[int, int], bytes] = {}
        self.pending: deque[bytes] = deque()
        self.leds: dict[int, int] = {}
        self.delivered = 0
        self.stats = [QueueStats() for _ in range(self.num_queues)]

    def start(self) -> None:
        """A new front-end: selectors back to 0, events of the last one forgotten."""
        super().start()
        self.select = self.subsel = 0
        self.pending.clear()

    # -- config space (§5.8.4) -------------------------------------------------------

    def config_space(self) -> bytes:
        """``struct virtio_input_config`` for the current ``select``/``subsel``."""
        key = (self.select, self.subsel)
        space = self._spaces.get(key)
        if space is None:
            payload = self.caps.window(*key)[:CONFIG_PAYLOAD_SIZE]
            space = (CONFIG_HEADER.pack(self.select, self.subsel, len(payload))
                     + payload.ljust(CONFIG_PAYLOAD_SIZE, b"\0"))
            # Linux reads each answer byte by byte, one GET_CONFIG each: the answers
            # are kept, but only the device's own (a guest walking all 65536 pairs
            # does not grow the cache).
            if payload:
                self._spaces[key] = space
        return space

    def write_config(self, offset: int, data: bytes) -> bool:
        """Take ``select`` (byte 0) and ``subsel`` (byte 1) from a write.

        §5.8.5.1: the driver writes only those two; QEMU writes the whole space
        each time, the rest as it read it, so other bytes are ignored rather than
        refused. A write past the config space is refused.
        """
        if offset < 0 or offset + len(data) > CONFIG_SIZE:
            log.warning("config write of %d bytes at offset %d is outside the %d-byte "
                        "config space; refused", len(data), offset, CONFIG_SIZE)
            return False
        if offset == 0 and data:
            self.select = data[0]
        if offset <= 1 < offset + len(data):
            self.subsel = data[1 - offset]
        return True

    # -- queues ------------------------------------------------------------------------

    def has_work(self, queue: int) -> bool:
        """The eventq takes buffers only while events wait (a receive queue)."""
        return queue != EVENTQ or bool(self.pending)

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """One event into an eventq buffer; one status event out of a statusq buffer."""
        if queue == EVENTQ:
            return self._event(chain)
        if queue == STATUSQ:
            return self._status(chain)
        return 0

    def _violation(self, queue: int, message: str) -> None:
        stats = self.stats[queue]
        stats.violations += 1
        if stats.violations <= _LOGGED:
            log.warning("queue %d: %s", queue, message)

    def _event(self, chain: DescriptorChain) -> int:
        """§5.8.6.1: eventq buffers are device-writable and hold one event at least."""
        if chain.readable_len or chain.writable_len < EVENT.size:
            self._violation(EVENTQ, f"eventq buffer {chain.head} has {chain.readable_len} "
                            f"readable and {chain.writable_len} writable bytes; it must be "
                            f"writable only, {EVENT.size} bytes at least (VIRTIO 1.4 "
                            "§5.8.6.1); given back empty")
            return 0
        event = self.pending.popleft()
        writer = chain.writer()
        writer.write(event)
        stats = self.stats[EVENTQ]
        stats.bytes_in += EVENT.size
        stats.kinds[_EVENT_KINDS.get(EVENT.unpack(event)[0], "other")] += 1
        self.delivered += 1
        return writer.written

    def _status(self, chain: DescriptorChain) -> int:
        """§5.8.6.1: statusq buffers hold one event at least; the first is taken (the
        driver sends one per buffer)."""
        stats = self.stats[STATUSQ]
        if chain.readable_len < EVENT.size:
            self._violation(STATUSQ, f"statusq buffer {chain.head} has {chain.readable_len} "
                            f"readable bytes, less than an event ({EVENT.size}, VIRTIO 1.4 "
                            "§5.8.6.1); ignored")
            return 0
        type_, code, value = EVENT.unpack(chain.reader().read(EVENT.size))
        stats.bytes_out += EVENT.size
        if type_ == EventType.LED:
            state = 1 if value else 0
            self.leds[code] = state
            stats.kinds[f"led {_LED_NAMES.get(code, code)}"] = state
        elif type_ == EventType.SND:
            stats.kinds["sound"] += 1
        else:
            stats.kinds["other status"] += 1
        return 0

    # -- events from the host ----------------------------------------------------------------

    def send(self, events: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
        """Queue ``events`` for the guest; those the device does not advertise are
        left out (the guest would ignore them), and so is the SYN_REPORT of an update
        left empty. Returns (queued, left out: the events not advertised).

        Raises:
            ValueError: they would make more than :data:`MAX_PENDING` wait (nothing
                is queued then).
        """
        kept: list[bytes] = []
        left_out = 0
        update_kept = update_left_out = 0
        for type_, code, value in events:
            if not self.caps.supports(type_, code):
                left_out += 1
                update_left_out += 1
                continue
            if (type_, code) == (EventType.SYN, SYN_REPORT):
                # An update whose every event was left out ends with nothing to report.
                emptied = update_left_out and not update_kept
                update_kept = update_left_out = 0
                if emptied:
                    continue
            else:
                update_kept += 1
            kept.append(EVENT.pack(type_, code, value))
        if len(self.pending) + len(kept) > MAX_PENDING:
            raise ValueError(f"{len(self.pending)} events already wait for the guest's "
                             f"buffers; {len(kept)} more would pass {MAX_PENDING}")
        self.pending.extend(kept)
        if kept and self.host is not None:
            self.host.process_queue(EVENTQ)
        return len(kept), left_out

    def info(self) -> dict[str, object]:
        """What ``input info`` answers."""
        return {
            "ok": True, "kind": None if self.kind is None else str(self.kind),
            "name": self.caps.name, "pending": len(self.pending), "delivered": self.delivered,
            "leds": {_LED_NAMES.get(c, str(c)): v for c, v in sorted(self.leds.items())},
        }

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``input info`` and ``input send TYPE,CODE,VALUE...`` (``pyvirtio input``)."""
        return {"input": self._input_command}

    def _input_command(self, args: list[str], reply: ControlReply) -> None:
        if args == ["info"]:
            reply(self.info())
            return
        if args[:1] != ["send"]:
            reply({"ok": False, "error": "usage: input info | input send TYPE,CODE,VALUE..."})
            return
        try:
            events = parse_events(args[1:])
        except ValueError as exc:
            reply({"ok": False, "error": str(exc)})
            return
        try:
            queued, left_out = self.send(events)
        except ValueError as exc:  # the queue is full: the client may ask again
            reply({"ok": False, "error": str(exc), "full": True})
            return
        result = self.info()
        result.update(queued=queued, unsupported=left_out)
        reply(result)
