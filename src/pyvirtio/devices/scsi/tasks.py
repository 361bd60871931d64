"""Requests in flight and the task management functions that end them (VIRTIO 1.4
§5.6.6.2, SAM-5 §7).

A :class:`Task` is a request whose medium I/O a worker thread does.  A task management
function marks the tasks it ends (:meth:`TaskSet.manage`); each still completes, with
ABORTED or RESET, and the function itself completes only after the last of them
(:meth:`TaskSet.finish` hands its :class:`Tmf` back to whoever completed that task).
Everything here is shared by the event loop and the worker threads: one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.devices.scsi.answers import Io
from pyvirtio.devices.scsi.lun import Lun
from pyvirtio.spec.scsi import Response, TmfSubtype
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["Task", "TaskSet", "Tmf"]


@dataclass(eq=False, slots=True)
class Tmf:
    """A task management function waiting for the tasks it ends."""

    chain: DescriptorChain
    pending: int = 0


@dataclass(eq=False, slots=True)
class Task:
    """A request whose medium I/O is under way in a worker thread."""

    queue: int
    chain: DescriptorChain
    tag: int
    lun: Lun
    io: Io
    views: list[memoryview]
    head_len: int
    #: A read: its data-in room; otherwise the residual (the data-out not taken).
    data_room: int
    #: Set by a task management function: the response it completes with.
    ended: Response | None = None
    waiters: list[Tmf] = field(default_factory=list)


class TaskSet:
    """The tasks in flight, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: set[Task] = set()

    def add(self, task: Task) -> None:
        """``task`` is in flight."""
        with self._lock:
            self._tasks.add(task)

    def finish(self, task: Task) -> tuple[Response | None, list[Tmf]]:
        """``task``'s I/O is over: how a TMF ended it (None: it was not), and the TMFs
        waiting for it, for the caller to :meth:`settle` once it completed the task."""
        with self._lock:
            self._tasks.discard(task)
            waiters, task.waiters = task.waiters, []
            return task.ended, waiters

    def settle(self, tmf: Tmf) -> bool:
        """One task ``tmf`` waited for completed; True when it was the last one."""
        with self._lock:
            tmf.pending -= 1
            return tmf.pending == 0

    def query(self, lun: Lun | None, tag: int | None) -> bool:
        """QUERY TASK (``tag``) or QUERY TASK SET (None): is such a task in flight?"""
        with self._lock:
            return any(t.lun is lun and (tag is None or t.tag == tag) for t in self._tasks)

    def manage(self, tmf: Tmf, subtype: int, lun: Lun | None, tag: int) -> Response | None:
        """Mark the tasks ``subtype`` ends (ABORT TASK, ABORT/CLEAR TASK SET, LOGICAL
        UNIT RESET, I_T NEXUS RESET) as waited for by ``tmf``; return the response to
        give at once when the function is not one of those (FUNCTION REJECTED), else
        None (``tmf.pending`` says how many tasks it waits for)."""
        match: Callable[[Task], bool]
        if subtype == TmfSubtype.ABORT_TASK:
            ending = Response.ABORTED

            def match(t: Task) -> bool:
                return t.lun is lun and t.tag == tag
        elif subtype in (TmfSubtype.ABORT_TASK_SET, TmfSubtype.CLEAR_TASK_SET,
                         TmfSubtype.LOGICAL_UNIT_RESET):
            ending = Response.RESET if subtype == TmfSubtype.LOGICAL_UNIT_RESET \
                else Response.ABORTED

            def match(t: Task) -> bool:
                return t.lun is lun
        elif subtype == TmfSubtype.I_T_NEXUS_RESET:
            ending = Response.RESET

            def match(t: Task) -> bool:
                return True
        else:  # CLEAR ACA (no ACA here), or not a function at all
            return Response.FUNCTION_REJECTED
        with self._lock:
            for task in self._tasks:
                if match(task):
                    if task.ended is None:
                        task.ended = ending
                    task.waiters.append(tmf)
                    tmf.pending += 1
        return None
