"""Ring views that follow guest memory changes, shared by both ring layouts."""

from __future__ import annotations

import abc
from typing import Generic, TypeVar

from pyvirtio.memory import GuestMemory

__all__ = ["MappedRing"]

Views = TypeVar("Views")


class MappedRing(abc.ABC, Generic[Views]):
    """A device-side queue's memoryviews of its ring parts.

    The views are made again whenever :attr:`GuestMemory.generation` changes
    (``SET_MEM_TABLE``, ``ADD/REM_MEM_REG``), so a view into unmapped memory is
    never used.
    """

    memory: GuestMemory
    _views: Views
    _generation: int

    @abc.abstractmethod
    def _make_views(self) -> Views:
        """Translate the ring's addresses into views (raises if not in guest memory)."""

    def _translate(self) -> Views:
        views = self._make_views()
        self._generation = self.memory.generation
        return views

    def remap(self) -> None:
        """Re-translate the ring addresses after guest memory changed.

        Raises:
            VirtqueueError: the ring is no longer inside guest memory
                (:class:`~pyvirtio.errors.RingOutOfMemory` or its packed twin).
        """
        self._views = self._translate()

    def _ring(self) -> Views:
        if self._generation != self.memory.generation:
            self._views = self._translate()
        return self._views
