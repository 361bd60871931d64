"""virtio-balloon: guest memory given back to the host (VIRTIO 1.4 §5.5).

The host sets a target (``num_pages``, a config field; the driver learns of a
change by a configuration change notification, §2.5.1, CONFIG_CHANGE_MSG over
vhost-user).  The driver inflates the balloon with pages it no longer uses
(inflateq: arrays of le32 page frame numbers, §5.5.6) and takes them back
(deflateq).  Pages given to the device are *really* released: the device
discards them from the shared guest RAM with ``madvise(MADV_REMOVE)``
(:meth:`pyvirtio.memory.GuestMemory.discard`), which punches a hole into the
memfd (QEMU) or the memory file (user-mode Linux): the host's memory use falls.

The optional queues (§5.5.2), each with its feature:

- statsq (STATS_VQ, §5.5.6.3): the device keeps the driver's last stats buffer
  (:data:`~pyvirtio.devices.base.DEFERRED`) and uses it when the host wants new
  statistics; the driver answers with a fresh buffer;
- free_page_vq (FREE_PAGE_HINT, §5.5.6.4): a round of hints starts when the host
  sets ``free_page_hint_cmd_id``; the hinted pages are discarded, and when the
  driver ends the round (STOP) the device answers DONE so it frees them again;
- reporting_vq (PAGE_REPORTING, §5.5.6.6): chains of free pages, discarded and
  used.

The guest is untrusted: every PFN and buffer is checked against guest memory; a
malformed request is counted as a violation, logged, and the device goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyvirtio.devices.base import (
    DEFERRED,
    ControlCommand,
    ControlReply,
    Deferred,
    QueueStats,
    VirtioDevice,
)
from pyvirtio.errors import BackendChannelError, GuestMemoryError, NoBackendChannel, NoFrontend
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.balloon import (
    BALLOON_PAGE_SHIFT,
    BALLOON_PAGE_SIZE,
    CMD_ID,
    CONFIG,
    CONFIG_SIZE,
    FIRST_HINT_CMD_ID,
    PFN,
    STAT,
    BalloonFeature,
    BalloonQueue,
    CmdId,
    StatTag,
    queue_roles,
)
from pyvirtio.spec.common import DeviceId
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.words import host_address

__all__ = ["STATS_WAIT", "BalloonDevice", "BalloonOptions"]

log = logging.getLogger(__name__)

#: Seconds a ``balloon`` control command waits for the driver's fresh statistics.
STATS_WAIT = 3.0
#: Violations logged one by one before the log only samples them (a hostile guest
#: must not flood it): then every 1000th.
_LOGGED_VIOLATIONS = 20
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class BalloonOptions:
    """What ``pyvirtio serve balloon`` offers.

    Attributes:
        stats: offer STATS_VQ (§5.5.3).
        deflate_on_oom: offer DEFLATE_ON_OOM.  Linux then leaves ``MemTotal``
            alone when it inflates (the pages may come back under pressure).
        free_page_hint: offer FREE_PAGE_HINT.
        page_reporting: offer PAGE_REPORTING.
        discard: release inflated, hinted and reported pages on the host
            (``MADV_REMOVE``); False only counts them.
        target: the initial target, in bytes (a multiple of 4096 is used).
    """

    stats: bool = True
    deflate_on_oom: bool = True
    free_page_hint: bool = True
    page_reporting: bool = True
    discard: bool = True
    target: int = 0

    def features(self) -> int:
        """The device-specific feature bits these options offer."""
        bits = 0
        for on, bit in ((self.stats, BalloonFeature.STATS_VQ),
                        (self.deflate_on_oom, BalloonFeature.DEFLATE_ON_OOM),
                        (self.free_page_hint, BalloonFeature.FREE_PAGE_HINT),
                        (self.page_reporting, BalloonFeature.PAGE_REPORTING)):
            if on:
                bits |= 1 << bit
        return bits


def _stat_name(tag: int) -> str:
    try:
        return StatTag(tag).name.lower()
    except ValueError:
        return f"tag_{tag}"


class BalloonDevice(VirtioDevice):
    """The traditional memory balloon (§5.5), with up to five queues.

    Attributes:
        target_pages: ``num_pages``, the balloon size the host asks for (4 KiB pages).
        actual_pages: ``actual``, as the driver last wrote it.
        inflated: the PFNs in the balloon, as the device saw them inflated and deflated.
        released: bytes given back to the host, by source (inflate, hint, reporting).
        guest_stats: the driver's last memory statistics, by lower-case tag name.
    """

    device_id = DeviceId.BALLOON_TRADITIONAL
    num_queues = 5

    def __init__(self, options: BalloonOptions | None = None) -> None:
        super().__init__()
        self.options = options or BalloonOptions()
        self.target_pages = min(self.options.target >> BALLOON_PAGE_SHIFT, _U32_MAX)
        self.actual_pages = 0
        self.poison_val = 0
        self.cmd_id: int = CmdId.STOP
        self._next_cmd_id = FIRST_HINT_CMD_ID
        self._hint_cmd_id: int | None = None  # the cmd id the driver is hinting under
        self.inflated: set[int] = set()
        self.released = {"inflate": 0, "hint": 0, "reporting": 0}
        self.guest_stats: dict[str, int] = {}
        self.stats_updates = 0
        self._stats_time: float | None = None
        self._held: tuple[int, DescriptorChain] | None = None
        self._stats_waiters: list[Callable[[], None]] = []
        self._roles: list[BalloonQueue] = queue_roles(0)
        self._violations = 0
        self._regions: tuple[int, list[tuple[int, int, int]]] | None = None
        self.stats = [QueueStats() for _ in range(self.num_queues)]

    # -- features and config space (§5.5.3, §5.5.4) ------------------------------------

    def device_features(self) -> int:
        """STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT and PAGE_REPORTING, as the options say.

        PAGE_POISON is not offered: discarded pages read as zeros, not ``poison_val``
        (§5.5.6.5); MUST_TELL_HOST is not needed, since the device never refills
        a page.
        """
        return self.options.features()

    def set_features(self, features: int) -> None:
        """The queues that exist follow the features (§5.5.2, :func:`queue_roles`)."""
        super().set_features(features)
        self._roles = queue_roles(features)

    def start(self) -> None:
        """A new front-end: an empty balloon (its guest is new), the target kept."""
        super().start()
        self._roles = queue_roles(0)
        self.inflated.clear()
        self.actual_pages = 0
        self.poison_val = 0
        self.cmd_id = CmdId.STOP
        self._hint_cmd_id = None
        self._held = None
        self._regions = None

    def config_space(self) -> bytes:
        """``struct virtio_balloon_config`` (§5.5.4)."""
        return CONFIG.pack(self.target_pages, self.actual_pages, self.cmd_id, self.poison_val)

    def write_config(self, offset: int, data: bytes) -> bool:
        """The driver writes ``actual`` (§5.5.6: "MUST update actual") and ``poison_val``.

        ``num_pages`` and ``free_page_hint_cmd_id`` are read-only for the driver
        (§5.5.4); QEMU's generic vhost-user device writes the whole config space
        with the values the driver last read, so other bytes there are ignored.
        Byte-wise writes of ``actual`` (legacy drivers) are taken as they come.
        """
        if offset < 0 or offset + len(data) > CONFIG_SIZE or not data:
            log.warning("driver wrote %d bytes at config offset %d: outside the balloon's "
                        "%d-byte config space (VIRTIO 1.4 §5.5.4)", len(data), offset,
                        CONFIG_SIZE)
            return False
        shadow = bytearray(self.config_space())
        shadow[offset : offset + len(data)] = data
        _, actual, _, poison = CONFIG.unpack(shadow)
        if actual != self.actual_pages:
            log.debug("driver: actual %d -> %d pages", self.actual_pages, actual)
        self.actual_pages = actual
        self.poison_val = poison
        return True

    # -- the queues ------------------------------------------------------------------------

    def role(self, queue: int) -> BalloonQueue | None:
        """What ``queue`` is for, with the negotiated features (None: no such queue)."""
        return self._roles[queue] if 0 <= queue < len(self._roles) else None

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """One request of any queue (§5.5.6); never raises for what the driver sent."""
        role = self.role(queue)
        stats = self.stats[queue]
        if role is None:
            self._violation(stats, f"queue {queue} does not exist with features "
                            f"{self.features:#x} (VIRTIO 1.4 §5.5.2)")
            return 0
        if role is BalloonQueue.INFLATE or role is BalloonQueue.DEFLATE:
            self._pfns(role, stats, chain)
            return 0
        if role is BalloonQueue.STATS:
            return self._stats_buffer(queue, stats, chain)
        if role is BalloonQueue.FREE_PAGE:
            self._free_page(stats, chain)
            return 0
        self._report(stats, chain)
        return 0

    def _violation(self, stats: QueueStats, message: str) -> None:
        """Count a malformed request; log it (sampled once :data:`_LOGGED_VIOLATIONS` went)."""
        stats.violations += 1
        self._violations += 1
        n = self._violations
        if n <= _LOGGED_VIOLATIONS or n % 1000 == 0:
            log.warning("violation: %s (driver violation #%d)", message, n)

    def _memory(self) -> GuestMemory | None:
        """Guest memory, once a daemon serves the device (:attr:`DeviceHost.memory`)."""
        return None if self.host is None else self.host.memory

    def _pfns(self, role: BalloonQueue, stats: QueueStats, chain: DescriptorChain) -> None:
        """Inflate or deflate (§5.5.6): an array of le32 PFNs of 4 KiB pages."""
        if chain.writable_len:
            self._violation(stats, f"{role.value} request {chain.head} has "
                            f"{chain.writable_len} device-writable bytes; the driver sends "
                            "output buffers only (VIRTIO 1.4 §5.5.6)")
        data = chain.reader().read()
        stats.bytes_out += len(data)
        whole = len(data) - len(data) % PFN.size
        if whole != len(data):
            self._violation(stats, f"{role.value} request {chain.head}: {len(data)} bytes "
                            "is not an array of le32 page frame numbers (VIRTIO 1.4 §5.5.6); "
                            f"the last {len(data) - whole} ignored")
        memory = self._memory()
        pfns = [p for (p,) in PFN.iter_unpack(data[:whole])]
        outside = 0
        kept: list[int] = []
        for pfn in pfns:
            gpa = pfn << BALLOON_PAGE_SHIFT
            if memory is None or not self._backed(memory, gpa, BALLOON_PAGE_SIZE):
                outside += 1
            else:
                kept.append(pfn)
        if outside:
            self._violation(stats, f"{role.value} request {chain.head}: {outside} of "
                            f"{len(pfns)} page frame numbers are not in guest memory "
                            f"(first {pfns[0]:#x}); ignored")
        if role is BalloonQueue.INFLATE:
            stats.kinds["inflated pages"] += len(kept)
            new = [p for p in kept if p not in self.inflated]
            self.inflated.update(new)
            if self.options.discard and memory is not None:
                self.released["inflate"] += self._discard_pfns(memory, stats, new)
        else:
            stats.kinds["deflated pages"] += len(kept)
            unknown = [p for p in kept if p not in self.inflated]
            self.inflated.difference_update(kept)
            if unknown:
                stats.kinds["deflated pages not in the balloon"] += len(unknown)

    @staticmethod
    def _backed(memory: GuestMemory, gpa: int, length: int) -> bool:
        try:
            memory.slices(gpa, length, [])
        except GuestMemoryError:
            return False
        return True

    def _discard_pfns(self, memory: GuestMemory, stats: QueueStats, pfns: list[int]) -> int:
        """Discard the pages, contiguous runs at a time; the bytes released."""
        runs: list[list[int]] = []
        for pfn in sorted(pfns):
            if runs and runs[-1][1] == pfn:
                runs[-1][1] += 1
            else:
                runs.append([pfn, pfn + 1])
        return sum(self._discard(memory, stats, start << BALLOON_PAGE_SHIFT,
                                 (end - start) << BALLOON_PAGE_SHIFT) for start, end in runs)

    def _discard(self, memory: GuestMemory, stats: QueueStats, gpa: int, length: int) -> int:
        try:
            return memory.discard(gpa, length)
        except GuestMemoryError as exc:
            self._violation(stats, f"{exc}; not discarded")
        except OSError as exc:
            stats.errors += 1
            if stats.errors <= _LOGGED_VIOLATIONS:
                log.warning("cannot discard guest range %#x+%#x: %s", gpa, length, exc)
        return 0

    def _view_gpa(self, memory: GuestMemory, view: memoryview) -> int | None:
        """The guest address of ``view``, a buffer of a chain (in guest memory)."""
        if self._regions is None or self._regions[0] != memory.generation:
            bases = [(host_address(r.view), r.size, r.guest_addr)
                     for r in memory.regions if len(r.view)]
            self._regions = (memory.generation, bases)
        address = host_address(view)
        for base, size, guest in self._regions[1]:
            if base <= address and address + len(view) <= base + size:
                return guest + address - base
        return None

    def _discard_views(self, stats: QueueStats, views: list[memoryview], source: str) -> int:
        """Discard the pages of a chain's writable buffers (hints, reports)."""
        memory = self._memory()
        if memory is None or not self.options.discard:
            return 0
        released = 0
        for view in views:
            if not len(view):
                continue
            gpa = self._view_gpa(memory, view)
            if gpa is None:  # cannot be: the chain's buffers are guest memory
                stats.errors += 1
                continue
            released += self._discard(memory, stats, gpa, len(view))
        self.released[source] += released
        return released

    def _report(self, stats: QueueStats, chain: DescriptorChain) -> None:
        """Free page reporting (§5.5.6.6): the chain's buffers are free pages."""
        if chain.readable_len:
            self._violation(stats, f"reporting_vq request {chain.head} has "
                            f"{chain.readable_len} device-readable bytes; reported pages "
                            "are device-writable buffers (VIRTIO 1.4 §5.5.6.6)")
        stats.kinds["reported bytes"] += chain.writable_len
        self._discard_views(stats, chain.writable, "reporting")

    def _free_page(self, stats: QueueStats, chain: DescriptorChain) -> None:
        """Free page hinting (§5.5.6.4): a command ID, or hinted pages."""
        if chain.readable_len:
            if chain.readable_len != CMD_ID.size:
                self._violation(stats, f"free_page_vq request {chain.head}: a command ID is "
                                f"4 bytes, not {chain.readable_len} (VIRTIO 1.4 §5.5.6.4)")
                return
            (cmd_id,) = chain.reader().read_obj(CMD_ID)
            stats.kinds["command ids"] += 1
            if cmd_id == CmdId.STOP:
                self._hints_stopped()
            elif cmd_id == self.cmd_id and cmd_id >= FIRST_HINT_CMD_ID:
                self._hint_cmd_id = cmd_id
            else:
                stats.kinds["stale command ids"] += 1
                self._hint_cmd_id = None
        if chain.writable_len:
            if self._hint_cmd_id is None or self._hint_cmd_id != self.cmd_id:
                # §5.5.6.4.2: pages with a command ID not the current one are ignored.
                stats.kinds["ignored hints"] += 1
                return
            stats.kinds["hinted bytes"] += chain.writable_len
            self._discard_views(stats, chain.writable, "hint")

    def _hints_stopped(self) -> None:
        """The driver ended its round of hints: answer DONE so that it frees the
        hinted pages (§5.5.6.4.2: the device MUST report DONE when it no longer
        needs them)."""
        self._hint_cmd_id = None
        if self.cmd_id >= FIRST_HINT_CMD_ID:
            self.cmd_id = CmdId.DONE
            self._notify(None)

    def _stats_buffer(self, queue: int, stats: QueueStats,
                      chain: DescriptorChain) -> int | Deferred:
        """A stats buffer (§5.5.6.3): take the statistics, keep the buffer for the
        next request."""
        data = chain.reader().read()
        stats.bytes_out += len(data)
        whole = len(data) - len(data) % STAT.size
        if whole != len(data):
            self._violation(stats, f"statsq buffer {chain.head}: {len(data)} bytes is not "
                            "an array of 10-byte virtio_balloon_stat (VIRTIO 1.4 §5.5.6.3)")
        for tag, value in STAT.iter_unpack(data[:whole]):
            self.guest_stats[_stat_name(tag)] = value
        self.stats_updates += 1
        self._stats_time = time.monotonic()
        stats.kinds["stats updates"] += 1
        if self._held is not None:
            self._violation(stats, "a second statsq buffer while the device holds one "
                            "(VIRTIO 1.4 §5.5.6.3.1: at most one); the older one is used")
            self._give_back_held()
        self._held = (queue, chain)
        waiters, self._stats_waiters = self._stats_waiters, []
        for waiter in waiters:
            waiter()
        return DEFERRED

    def _give_back_held(self) -> bool:
        """Use the held stats buffer: the driver answers with new statistics."""
        held, self._held = self._held, None
        if held is None or self.host is None:
            return False
        self.host.complete(held[0], held[1], 0)
        return True

    def request_stats(self) -> bool:
        """Ask the driver for new statistics (§5.5.6.3); False when no buffer is held."""
        return self._give_back_held()

    def stop_queue(self, queue: int) -> None:
        """The stats queue stops: give its buffer back."""
        if self._held is not None and self._held[0] == queue:
            self._give_back_held()

    # -- the host's side ---------------------------------------------------------------------

    def set_target(self, size: int) -> None:
        """Ask the guest for a balloon of ``size`` bytes (rounded down to 4 KiB pages).

        The caller tells the driver (:meth:`DeviceHost.config_changed`).

        Raises:
            ValueError: ``size`` is negative or too large for ``num_pages``.
        """
        pages = size >> BALLOON_PAGE_SHIFT
        if size < 0 or pages > _U32_MAX:
            raise ValueError(f"balloon size {size} out of range (0..{_U32_MAX} pages)")
        memory = self._memory()
        total = sum(r.size for r in memory.regions) if memory is not None else 0
        if total and size > total:
            raise ValueError(f"balloon size {size} is larger than the guest's memory "
                             f"({total} bytes)")
        self.target_pages = pages

    def start_hinting(self) -> int:
        """Start a round of free page hinting (§5.5.6.4): a new command ID."""
        cmd_id = self._next_cmd_id
        self._next_cmd_id = cmd_id + 1 if cmd_id < _U32_MAX else FIRST_HINT_CMD_ID
        self.cmd_id = cmd_id
        return cmd_id

    def report(self) -> dict[str, object]:
        """What ``pyvirtio balloon`` shows."""
        age = None if self._stats_time is None else round(time.monotonic() - self._stats_time, 3)
        return {
            "ok": True,
            "target_bytes": self.target_pages << BALLOON_PAGE_SHIFT,
            "target_pages": self.target_pages,
            "actual_bytes": self.actual_pages << BALLOON_PAGE_SHIFT,
            "actual_pages": self.actual_pages,
            "inflated_pages": len(self.inflated),
            "released_bytes": sum(self.released.values()),
            "released": dict(self.released),
            "free_page_hint_cmd_id": self.cmd_id,
            "features": self.features,
            "stats": dict(self.guest_stats),
            "stats_updates": self.stats_updates,
            "stats_age_seconds": age,
        }

    def _notify(self, on_ack: Callable[[int | None], None] | None) -> str:
        """CONFIG_CHANGE_MSG; how it went (blk's ``notified`` words)."""
        host = self.host
        if host is None:
            return "no front-end"
        try:
            awaited = host.config_changed(on_ack)
        except NoFrontend:
            return "no front-end"
        except NoBackendChannel:
            return "no channel"
        except BackendChannelError as exc:
            log.warning("config change not sent: %s", exc)
            return "failed"
        return "awaited" if awaited else "sent"

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``balloon [BYTES] [hint]`` (``pyvirtio balloon``)."""
        return {"balloon": self._balloon_command}

    def _balloon_command(self, args: list[str], reply: ControlReply) -> None:
        """``balloon [BYTES] [hint]``: maybe a new target or a round of hints, then
        the state and the guest's fresh statistics (waited for up to
        :data:`STATS_WAIT` seconds, the loop serving meanwhile)."""
        size: int | None = None
        hint = False
        for word in args:
            if word == "hint":
                hint = True
            elif word.isdigit() and size is None:
                size = int(word)
            else:
                reply({"ok": False, "error": f"usage: balloon [BYTES] [hint], not {args!r}"})
                return
        if size is not None:
            try:
                self.set_target(size)
            except ValueError as exc:
                reply({"ok": False, "error": str(exc)})
                return
        pending = {"ack": False, "stats": False}
        notified: dict[str, object] = {}

        def finish(part: str) -> None:
            pending[part] = True
            if all(pending.values()):
                result = self.report()
                result.update(notified)
                reply(result)

        if size is not None or hint:
            if hint:
                notified["hint_cmd_id"] = self.start_hinting()

            def on_ack(status: int | None) -> None:
                notified["notified"] = ("no answer" if status is None
                                        else "acked" if status == 0 else "failed")
                finish("ack")

            how = self._notify(on_ack)
            if how != "awaited":
                notified["notified"] = how
                pending["ack"] = True
        else:
            pending["ack"] = True
        if self.host is not None and self.request_stats():
            timer = self.host.call_later(STATS_WAIT, lambda: finish("stats"))

            def fresh() -> None:
                timer.cancel()
                finish("stats")

            self._stats_waiters.append(fresh)
        else:
            finish("stats")
