"""Spies on ring stores: tests check the order and number of stores a ring operation makes."""

from __future__ import annotations

from collections.abc import Callable

from pyvirtio.virtqueue.words import Words


class StoreSpy:
    """Stands in for one word view of a ring part (:class:`Words`) and logs every store.

    Tests use it to check the order and number of ring stores, e.g. that a batch
    moves the used index once.  Loads and stores still reach the ring.
    """

    def __init__(self, real: memoryview, before: Callable[[int, int], None] | None) -> None:
        self.real = real
        self.before = before
        self.stores: list[tuple[int, int]] = []

    def __getitem__(self, index: int) -> int:
        return int(self.real[index])

    def __setitem__(self, index: int, value: int) -> None:
        if self.before is not None:
            self.before(index, value)
        self.stores.append((index, value))
        self.real[index] = value


def spy_on_stores(
    words: Words, width: str = "u16", before: Callable[[int, int], None] | None = None
) -> StoreSpy:
    """Replace ``words``' ``u16``/``u32``/``u64`` view by a :class:`StoreSpy`.

    ``before(word, value)``, if given, runs before each store reaches the ring.
    """
    spy = StoreSpy(getattr(words, width), before)
    setattr(words, width, spy)
    return spy
