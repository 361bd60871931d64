"""virtio-scsi over image files (VIRTIO 1.4 §5.6 SCSI Host Device).

One target (0) with a logical unit per image.  The queues (§5.6.2):

- the control queue (0): task management functions (§5.6.6.2).  ABORT TASK,
  ABORT/CLEAR TASK SET, LOGICAL UNIT RESET and I_T NEXUS RESET complete only after
  every request they end has completed (with ABORTED or RESET), as Linux relies on;
- the event queue (1): the driver's buffers stay available until a LUN is added or
  removed (``pyvirtio scsi SOCK add-lun``/``remove-lun``); each then carries a
  TRANSPORT_RESET event with reason RESCAN or REMOVED (§5.6.6.3.1);
- the request queues (2 and up): the loop decodes each request and answers every
  command that needs no medium I/O at once (:class:`ScsiTarget`); reads, writes,
  syncs and discards go to the unit's own worker threads and complete later
  (:data:`~pyvirtio.devices.base.DEFERRED`), so units and queues never wait on
  each other.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from pyvirtio.devices.base import (
    DEFERRED,
    ControlCommand,
    ControlReply,
    Deferred,
    Tally,
    VirtioDevice,
)
from pyvirtio.devices.scsi.lun import Lun, LunSpec, ScsiOptions, open_lun
from pyvirtio.devices.scsi.responses import KINDS, respond, tmf_answer
from pyvirtio.devices.scsi.sense import (
    I_T_NEXUS_LOSS,
    POWER_ON_RESET,
    READ_ERROR,
    WRITE_ERROR,
    Status,
)
from pyvirtio.devices.scsi.target import Reply, ScsiTarget
from pyvirtio.devices.scsi.tasks import Task, TaskSet, Tmf
from pyvirtio.errors import RequestTooShort
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.scsi import (
    CDB_SIZE,
    CONTROL_QUEUE,
    CTRL_AN_REQ,
    CTRL_AN_RESP,
    CTRL_TMF_REQ,
    CTRL_TYPE,
    EVENT,
    EVENT_QUEUE,
    EVENTS_MISSED,
    MAX_LUN,
    REQ_HEADER,
    RESP_HEADER,
    SENSE_SIZE,
    ControlType,
    Event,
    EventReason,
    Response,
    ScsiConfig,
    ScsiFeature,
    TmfSubtype,
    decode_lun,
    encode_lun,
)
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["MAX_EVENTS", "ScsiDevice", "ScsiOptions"]

log = logging.getLogger(__name__)

#: Events kept for want of event queue buffers; beyond, EVENTS_MISSED (§5.6.6.3).
MAX_EVENTS = 64
_MAX_SENSE_SIZE = 252
_CONFIG_SENSE_SIZE = 20
_CONFIG_CDB_SIZE = 24


class ScsiDevice(VirtioDevice):
    """A virtio-scsi host with one target whose LUNs are image files.

    Raises:
        OSError: an image cannot be opened.
        ValueError: an image is smaller than one block.
    """

    device_id = DeviceId.SCSI

    def __init__(self, options: ScsiOptions) -> None:
        super().__init__()
        self.options = options
        self.num_queues = 2 + options.queues
        self.max_queue_size = options.queue_size
        self.sense_size = SENSE_SIZE
        self.cdb_size = CDB_SIZE
        self.target = ScsiTarget()
        self.luns: dict[int, Lun] = {}
        self._lock = threading.Lock()
        self.tasks = TaskSet()
        #: Per LUN, the batch of tasks no worker has taken yet (under the lock).
        self._open_batches: dict[Lun, list[Task]] = {}
        self._events: deque[bytes] = deque()
        self._missed = False
        try:
            for number, spec in enumerate(options.specs()):
                self._add(spec, number)
        except BaseException:
            self.close()
            raise

    # -- features and config -------------------------------------------------------------

    def device_features(self) -> int:
        """§5.6.3: HOTPLUG (LUNs come and go through the event queue) and CHANGE
        (QEMU's vhost-user-scsi offers the driver CHANGE whatever the back-end says,
        so the driver may accept it: parameter changes would be reported as events;
        none is sent)."""
        return 1 << ScsiFeature.HOTPLUG | 1 << ScsiFeature.CHANGE

    def config_space(self) -> bytes:
        """``struct virtio_scsi_config`` (§5.6.4); QEMU's vhost-user-scsi has its own."""
        return ScsiConfig(
            num_queues=self.options.queues, seg_max=max(1, self.max_queue_size - 2),
            max_sectors=0xFFFF, cmd_per_lun=128, sense_size=self.sense_size,
            cdb_size=self.cdb_size, max_target=0, max_lun=MAX_LUN,
        ).pack()

    def write_config(self, offset: int, data: bytes) -> bool:
        """§5.6.4: the driver may set ``sense_size`` and ``cdb_size``."""
        if offset not in (_CONFIG_SENSE_SIZE, _CONFIG_CDB_SIZE) or len(data) != 4:
            return super().write_config(offset, data)
        value = int.from_bytes(data, "little")
        if offset == _CONFIG_SENSE_SIZE and value <= _MAX_SENSE_SIZE:
            self.sense_size = value
            return True
        if offset == _CONFIG_CDB_SIZE and 6 <= value <= 255:
            self.cdb_size = value
            return True
        log.warning("driver wrote %d at config offset %d: out of range, ignored", value, offset)
        return False

    def start(self) -> None:
        """A front-end connected: counters reset, config sizes back to the defaults."""
        super().start()
        self.sense_size = SENSE_SIZE
        self.cdb_size = CDB_SIZE
        self._events.clear()
        self._missed = False

    # -- logical units -------------------------------------------------------------------

    def _add(self, spec: LunSpec, number: int) -> Lun:
        lun = open_lun(spec, number, self.options.workers)
        self.luns[number] = lun
        self.target.units[number] = lun.unit
        log.info("LUN %d: %s %s, %d bytes%s", number, lun.unit.kind, spec.path, lun.unit.size,
                 " (read-only)" if lun.unit.readonly else "")
        return lun

    def add_lun(self, spec: LunSpec) -> Lun:
        """Hot-add a unit as the LUN after the highest one; tell the driver (RESCAN).

        Raises:
            OSError: the image cannot be opened.
            ValueError: it is too small, or no LUN number is left.
        """
        number = max(self.luns, default=-1) + 1
        if number > MAX_LUN:
            raise ValueError("no LUN number left")
        lun = self._add(spec, number)
        self._post_event(Event.TRANSPORT_RESET, number, EventReason.RESCAN)
        return lun

    def remove_lun(self, number: int) -> None:
        """Hot-remove LUN ``number``; tell the driver (REMOVED).  Its queued I/O
        finishes in the background, then its image is closed.

        Raises:
            KeyError: there is no such LUN.
        """
        lun = self.luns.pop(number)
        del self.target.units[number]
        self._post_event(Event.TRANSPORT_RESET, number, EventReason.REMOVED)
        threading.Thread(target=lun.close, name=f"scsi-close-lun{number}", daemon=True).start()
        log.info("LUN %d removed (%s)", number, lun.spec.path)

    def _post_event(self, event: int, lun: int, reason: int) -> None:
        if not self.has_feature(ScsiFeature.HOTPLUG):
            return
        if len(self._events) >= MAX_EVENTS:
            self._missed = True
            return
        self._events.append(EVENT.pack(event, encode_lun(0, lun), reason))
        if self.host is not None:
            self.host.process_queue(EVENT_QUEUE)

    def has_work(self, queue: int) -> bool:
        """The event queue's buffers stay with the driver until an event is due."""
        if queue == EVENT_QUEUE:
            return bool(self._events) or self._missed
        return True

    # -- requests ------------------------------------------------------------------------

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """One chain of the control, event or a request queue (§5.6.6)."""
        if queue == CONTROL_QUEUE:
            return self._control(chain)
        if queue == EVENT_QUEUE:
            return self._event(chain)
        return self._request(queue, chain)

    def _event(self, chain: DescriptorChain) -> int:
        """§5.6.6.3: one event into the buffer (the oldest pending, or EVENTS_MISSED)."""
        stats = self.stats[EVENT_QUEUE]
        if self._events:
            event = self._events.popleft()
        else:
            event = EVENT.pack(Event.NO_EVENT | EVENTS_MISSED, bytes(8), 0)
            self._missed = False
        if self._missed and self._events:
            (kind, lun, reason) = EVENT.unpack(event)
            event = EVENT.pack(kind | EVENTS_MISSED, lun, reason)
            self._missed = False
        writer = chain.writer()
        try:
            writer.write(event)
        except RequestTooShort:
            stats.errors += 1
            log.warning("event buffer of %d bytes is too short for an event", chain.writable_len)
            return 0
        stats.kinds["event"] += 1
        stats.bytes_in += len(event)
        return writer.written

    def _request(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """§5.6.6.1: decode, answer at once or start the medium I/O."""
        stats = self.stats[queue]
        head_len = RESP_HEADER.size + self.sense_size
        if chain.writable_len < head_len:
            stats.errors += 1
            log.warning("request without room for its %d-byte response: dropped", head_len)
            return 0
        reader = chain.reader()
        try:
            lun_field, tag, _attr, _prio, _crn = reader.read_obj(REQ_HEADER)
            cdb = reader.read(self.cdb_size)
        except RequestTooShort:
            stats.errors += 1
            return respond(chain, head_len, Response.FAILURE, resid=chain.writable_len - head_len)
        data_room = chain.writable_len - head_len
        data_out = reader.remaining
        address = decode_lun(lun_field)
        if address is None or address[0] != 0:
            stats.kinds["bad_target"] += 1
            return respond(chain, head_len, Response.BAD_TARGET, resid=data_room + data_out)
        if data_out and data_room:  # bidirectional needs VIRTIO_SCSI_F_INOUT
            stats.errors += 1
            return respond(chain, head_len, Response.FAILURE, resid=data_room + data_out)
        number = address[1]

        def params(n: int) -> bytes:
            return reader.read(min(n, reader.remaining))

        answer = self.target.execute(number, cdb, params)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("queue %d chain %d: LUN %d tag %d opcode %02x: %s", queue, chain.head,
                      number, tag, cdb[0] if cdb else -1, answer)
        stats.kinds[KINDS.get(cdb[0] if cdb else -1, "other")] += 1
        if isinstance(answer, Reply):
            if answer.status != Status.GOOD:
                stats.kinds["check_condition"] += 1
            data = answer.data[:data_room]
            stats.bytes_in += len(data)
            return respond(chain, head_len, Response.OK, status=answer.status,
                            resid=data_room - len(data), sense=self._sense(answer), data=data)
        lun = self.luns[number]
        io = answer
        views: list[memoryview] = []
        if io.op == "read":
            if io.length > data_room:
                return respond(chain, head_len, Response.OVERRUN, resid=data_room)
            writer = chain.writer()
            writer.skip(head_len)
            views = writer.take(io.length)
        elif io.op == "write":
            if io.length > data_out:
                return respond(chain, head_len, Response.OVERRUN, resid=data_out)
            views = reader.take(io.length)
            stats.bytes_out += io.length
        request = Task(queue, chain, tag, lun, io, views, head_len,
                           data_room if io.op == "read" else reader.remaining)
        if self.options.aio == "sync":
            _, written, _, tally = self._execute(request)
            tally.add_to(stats)  # the loop's thread
            return written
        self.tasks.add(request)
        with self._lock:
            batch = self._open_batches.get(lun)
            if batch is None:
                # A new batch for one of the LUN's threads; requests of this drain join
                # it until a thread takes it (_run_batch), so that they complete together
                # and the driver gets one notification for them, not one each.
                batch = self._open_batches[lun] = []
                lun.pool.submit(lambda: self._run_batch(lun, batch))
            batch.append(request)
        return DEFERRED

    def _run_batch(self, lun: Lun, batch: list[Task]) -> None:
        """A worker thread: take the batch (closed to new requests from now on), do
        its I/O in order, then complete its requests, then the TMFs waiting on them."""
        with self._lock:
            if self._open_batches.get(lun) is batch:
                del self._open_batches[lun]
        done = [self._execute(request) for request in batch]
        host = self.host
        if host is None:
            return
        for request, written, _, tally in done:
            host.complete(request.queue, request.chain, written, tally)
        for _, _, waiters, _ in done:
            for tmf in waiters:
                if self.tasks.settle(tmf):
                    host.complete(CONTROL_QUEUE, tmf.chain, tmf_answer(tmf.chain, Response.OK))

    def _sense(self, reply: Reply) -> bytes:
        if reply.sense is None:
            return b""
        return reply.sense.fixed()[: self.sense_size]

    def _execute(self, request: Task) -> tuple[Task, int, list[Tmf], Tally]:
        """The medium I/O and the response of one request (in a worker thread, or
        on the loop with ``--aio sync``); returns it with its used length, the TMFs
        waiting for it, and what its queue's counters get."""
        status, sense, moved = Status.GOOD, b"", 0
        if request.ended is None:
            try:
                moved = request.lun.run(request.io, request.views)
            except OSError as exc:
                log.error("LUN %d: %s failed: %s", request.lun.number, request.io.op, exc)
                status = Status.CHECK_CONDITION
                error = READ_ERROR if request.io.op == "read" else WRITE_ERROR
                sense = error.fixed()[: self.sense_size]
        ended, waiters = self.tasks.finish(request)
        chain = request.chain
        if ended is not None:
            written = respond(chain, request.head_len, ended, resid=request.data_room)
        else:
            # A read's residual is what it did not fill; any other request's, the
            # data-out it left (known when it was taken).
            resid = request.data_room - (moved if request.io.op == "read" else 0)
            written = respond(chain, request.head_len, Response.OK, status=status, resid=resid,
                              sense=sense, data_len=moved if request.io.op == "read" else 0)
        bytes_in = moved if request.io.op == "read" and ended is None else 0
        return request, written, waiters, Tally(errors=int(status != Status.GOOD),
                                                bytes_in=bytes_in)

    # -- the control queue ---------------------------------------------------------------

    def _control(self, chain: DescriptorChain) -> int | Deferred:
        """§5.6.6.2: task management functions and asynchronous notification."""
        stats = self.stats[CONTROL_QUEUE]
        reader = chain.reader()
        try:
            (kind,) = reader.read_obj(CTRL_TYPE)
        except RequestTooShort:
            stats.errors += 1
            return 0
        if kind == ControlType.TMF:
            try:
                _type, subtype, lun_field, tag = chain.reader().read_obj(CTRL_TMF_REQ)
            except RequestTooShort:
                stats.errors += 1
                return 0
            stats.kinds["tmf"] += 1
            return self._tmf(chain, subtype, lun_field, tag)
        if kind in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
            stats.kinds["an"] += 1
            writer = chain.writer()
            try:  # no asynchronous notification classes are served: event_actual 0
                reader.read(CTRL_AN_REQ.size - CTRL_TYPE.size)
                writer.write_obj(CTRL_AN_RESP, 0, Response.OK)
            except RequestTooShort:
                stats.errors += 1
            return writer.written
        stats.errors += 1
        log.warning("control request of unknown type %d", kind)
        return 0

    def _tmf(self, chain: DescriptorChain, subtype: int, lun_field: bytes,
             tag: int) -> int | Deferred:
        address = decode_lun(lun_field)
        if address is None or address[0] != 0:
            return tmf_answer(chain, Response.BAD_TARGET)
        number = address[1]
        if subtype != TmfSubtype.I_T_NEXUS_RESET and number not in self.luns:
            return tmf_answer(chain, Response.INCORRECT_LUN)
        lun = self.luns.get(number)
        if subtype in (TmfSubtype.QUERY_TASK, TmfSubtype.QUERY_TASK_SET):
            found = self.tasks.query(lun, tag if subtype == TmfSubtype.QUERY_TASK else None)
            return tmf_answer(chain, Response.FUNCTION_SUCCEEDED if found else Response.OK)
        if subtype == TmfSubtype.LOGICAL_UNIT_RESET and lun is not None:
            lun.unit.unit_attention = POWER_ON_RESET
        elif subtype == TmfSubtype.I_T_NEXUS_RESET:
            for each in self.luns.values():
                each.unit.unit_attention = I_T_NEXUS_LOSS
        tmf = Tmf(chain)
        refused = self.tasks.manage(tmf, subtype, lun, tag)
        if refused is not None:
            return tmf_answer(chain, refused)
        log.info("TMF %s on LUN %d: %d request(s) in flight end", TmfSubtype(subtype).name,
                 number, tmf.pending)
        if tmf.pending == 0:
            return tmf_answer(chain, Response.OK)
        return DEFERRED

    # -- control socket ------------------------------------------------------------------

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``scsi add-lun PATH [ro] [cdrom]``, ``scsi remove-lun N``, ``scsi list``."""
        return {"scsi": self._scsi_command}

    def _scsi_command(self, args: list[str], reply: ControlReply) -> None:
        if not args:
            reply({"ok": False, "error": "usage: scsi add-lun PATH [ro] [cdrom] | "
                   "remove-lun N | list"})
            return
        verb, rest = args[0], args[1:]
        notified = self.has_feature(ScsiFeature.HOTPLUG)
        if verb == "list":
            reply({"ok": True, "luns": [lun.describe() for _, lun in sorted(self.luns.items())]})
        elif verb == "add-lun" and rest and set(rest[1:]) <= {"ro", "cdrom"}:
            spec = LunSpec(Path(rest[0]), cdrom="cdrom" in rest[1:],
                           readonly="ro" in rest[1:] or self.options.readonly)
            try:
                lun = self.add_lun(spec)
            except (OSError, ValueError) as exc:
                reply({"ok": False, "error": str(exc)})
                return
            reply({"ok": True, **lun.describe(), "notified": notified})
        elif verb == "remove-lun" and len(rest) == 1 and rest[0].isdigit():
            try:
                self.remove_lun(int(rest[0]))
            except KeyError:
                reply({"ok": False, "error": f"no LUN {rest[0]}"})
                return
            reply({"ok": True, "lun": int(rest[0]), "notified": notified})
        else:
            reply({"ok": False, "error": f"unknown scsi command {' '.join(args)!r}"})

    def close(self) -> None:
        """Finish every unit's I/O, flush and close the images."""
        for lun in list(self.luns.values()):
            lun.close()
