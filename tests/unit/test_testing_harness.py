"""pyvirtio.testing.DeviceHarness: devices defined here, served in-process over real
memfds, rings and eventfds, answering at once, from a worker thread or from a timer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from pyvirtio.devices.base import DEFERRED, Deferred, VirtioDevice
from pyvirtio.errors import RequestTooShort
from pyvirtio.spec.common import Feature
from pyvirtio.testing import DeviceHarness, Used
from pyvirtio.virtqueue.chain import DescriptorChain

PROTOTYPE_ID = 0x3FFE


class Reverse(VirtioDevice):
    """Answers at once: the readable bytes, reversed."""

    device_id = PROTOTYPE_ID

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        writer = chain.writer()
        try:
            writer.write(chain.reader().read()[::-1])
        except RequestTooShort:
            self.stats[queue].errors += 1
        return writer.written


class Numbered(VirtioDevice):
    """Answers at once: one byte, the number of the request."""

    device_id = PROTOTYPE_ID

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        self.count += 1
        return chain.writer().write(bytes([self.count]))


class Held(VirtioDevice):
    """Defers every chain; the test completes them (upper-cased) when it likes."""

    device_id = PROTOTYPE_ID

    def __init__(self) -> None:
        super().__init__()
        self.held: list[DescriptorChain] = []

    def handle_chain(self, queue: int, chain: DescriptorChain) -> Deferred:
        self.held.append(chain)
        return DEFERRED

    def finish(self, chain: DescriptorChain) -> None:
        """Answer ``chain`` and hand it back (from any thread)."""
        assert self.host is not None
        writer = chain.writer()
        writer.write(chain.reader().read().upper())
        self.host.complete(0, chain, writer.written)

    def finish_in_thread(self, order: Sequence[int]) -> None:
        """Complete the held chains from a worker thread, in ``order``."""
        def work() -> None:
            for index in order:
                self.finish(self.held[index])

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()


class Delayed(VirtioDevice):
    """Answers each chain ``delay`` seconds later, from a ``call_later`` timer."""

    device_id = PROTOTYPE_ID
    delay = 0.1

    def handle_chain(self, queue: int, chain: DescriptorChain) -> Deferred:
        assert self.host is not None
        text = chain.reader().read()

        def answer() -> None:
            assert self.host is not None
            self.host.complete(queue, chain, chain.writer().write(text.upper()))

        self.host.call_later(self.delay, answer)
        return DEFERRED


# -- answering at once --------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_synchronous_device_is_tested_in_one_line(packed: bool) -> None:
    with DeviceHarness(Reverse(), packed=packed) as harness:
        used = harness.request(readable=b"virtio", writable=16)
        assert (used.queue, used.length, used.data) == (0, 6, b"oitriv")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_requests_over_several_descriptors_and_indirect_tables(packed: bool) -> None:
    with DeviceHarness(Reverse(), packed=packed) as harness:
        used = harness.request(readable=[b"ab", b"cd", b"ef"], writable=[1, 2, 3])
        assert (used.length, used.data) == (6, b"fedcba")
        used = harness.request(readable=[b"xy", b"z"], writable=[2, 8], indirect=True)
        assert (used.length, used.data) == (3, b"zyx")
        # VIRTIO 1.4 §2.7.8: the used length is what the device wrote, here nothing.
        assert harness.request(readable=b"too long", writable=4).length == 0
        assert harness.device.stats[0].errors == 1


def test_the_harness_negotiates_what_it_is_asked() -> None:
    with DeviceHarness(Reverse(), packed=True, in_order=True) as harness:
        assert harness.device.has_feature(Feature.RING_PACKED)
        assert harness.device.has_feature(Feature.IN_ORDER)
    with DeviceHarness(Reverse()) as harness:
        assert not harness.device.has_feature(Feature.RING_PACKED)
        assert not harness.device.has_feature(Feature.IN_ORDER)
        assert harness.device.has_feature(Feature.VERSION_1)


def test_posted_chains_wait_for_the_kick_and_come_back_in_use_order() -> None:
    with DeviceHarness(Reverse()) as harness:
        heads = [harness.post(readable=bytes([65 + i]) * 3, writable=3) for i in range(5)]
        assert harness.used() == []  # not notified yet
        used = harness.kick()
        assert [u.head for u in used] == heads
        assert [u.data for u in used] == [b"AAA", b"BBB", b"CCC", b"DDD", b"EEE"]
        assert harness.in_flight == 0


def test_each_used_element_is_returned_once_even_when_its_id_comes_back() -> None:
    with DeviceHarness(Numbered(), queue_size=2) as harness:
        _first, second = harness.post(writable=1), harness.post(writable=1)
        harness.host.process_queue(0)  # as a device with work from outside: no kick
        assert harness.wait_used(count=1)[0].data == b"\x01"
        used = harness.request(writable=1)  # the second's id again: it was used, not read
        assert (used.head, used.data) == (second, b"\x03")
        assert [(u.head, u.data) for u in harness.used()] == [(second, b"\x02")]


def test_buffer_space_is_reused_once_nothing_is_in_flight() -> None:
    with DeviceHarness(Reverse(), buffer_space=0x1000) as harness:
        for _ in range(100):  # 100 x 2 KiB through 4 KiB of buffer space
            assert harness.request(readable=bytes(1024), writable=1024).length == 1024


# -- completing from a worker thread ---------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_without_in_order_chains_are_used_in_completion_order(packed: bool) -> None:
    device = Held()
    with DeviceHarness(device, packed=packed) as harness:
        heads = [harness.post(readable=word, writable=8) for word in (b"one", b"two", b"six")]
        assert harness.kick() == []  # all three deferred
        assert len(device.held) == 3
        device.finish_in_thread([2, 0, 1])
        used = harness.wait_used(count=3)
        assert [u.head for u in used] == [heads[2], heads[0], heads[1]]
        assert [u.data for u in used] == [b"SIX", b"ONE", b"TWO"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_with_in_order_chains_are_used_in_the_order_they_were_taken(packed: bool) -> None:
    """VIRTIO 1.4 §6.2: a device that negotiated IN_ORDER uses buffers in the order they
    were made available; the engine holds back the ones completed early."""
    device = Held()
    with DeviceHarness(device, packed=packed, in_order=True) as harness:
        heads = [harness.post(readable=word, writable=8) for word in (b"one", b"two", b"six")]
        assert harness.kick() == []
        device.finish_in_thread([2, 1])
        with pytest.raises(TimeoutError):  # the first one is not done: nothing is used
            harness.wait_used(count=1, timeout=0.2)
        device.finish_in_thread([0])
        used = harness.wait_used(count=3)
        assert [u.head for u in used] == heads
        assert [(u.length, u.data) for u in used] == [(3, b"ONE"), (3, b"TWO"), (3, b"SIX")]


def test_request_waits_for_a_chain_a_worker_thread_completes() -> None:
    class Threaded(Held):
        def handle_chain(self, queue: int, chain: DescriptorChain) -> Deferred:
            threading.Thread(target=self.finish, args=(chain,)).start()
            return DEFERRED

    with DeviceHarness(Threaded()) as harness:
        assert harness.request(readable=b"later", writable=8).data == b"LATER"


def test_a_chain_never_completed_times_out() -> None:
    device = Held()
    with DeviceHarness(device) as harness:
        with pytest.raises(TimeoutError, match="not used within"):
            harness.request(readable=b"lost", writable=8, timeout=0.1)
        device.finish(device.held[0])  # so that closing does not wait for it
        assert harness.wait_used()[0].data == b"LOST"


def test_a_stopping_ring_waits_for_the_chains_the_device_holds() -> None:
    """QueueEngine.quiesce: GET_VRING_BASE asks the device to finish what it holds
    (stop_queue) and uses those chains before it answers."""

    class Stoppable(Held):
        def stop_queue(self, queue: int) -> None:
            for chain in self.held:
                self.finish(chain)

    with DeviceHarness(Stoppable()) as harness:
        harness.post(readable=b"a", writable=1)
        harness.post(readable=b"b", writable=1)
        assert harness.kick() == []
        assert harness.stop_queue() == 2  # the split ring's base: the next available index
        assert sorted(u.data for u in harness.used()) == [b"A", b"B"]


# -- completing from a timer --------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_timers_run_when_the_test_advances_the_clock(packed: bool) -> None:
    with DeviceHarness(Delayed(), packed=packed) as harness:
        head = harness.post(readable=b"tick", writable=8)
        assert harness.kick() == []
        assert harness.advance(0.05) == 0
        assert harness.used() == []
        assert harness.advance(0.05) == 1  # 0.1 s after the request: the timer runs
        assert harness.used() == [Used(0, head, 4, b"TICK")]
        assert harness.host.pending_timers == 0
