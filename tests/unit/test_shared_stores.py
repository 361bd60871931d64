"""The ring rule: every store the other process may read is one aligned store.

``struct.pack_into`` clears its target before writing, so a ring field written
with it reads as 0 (or half written) in the other process for an instant
(issue #10: DPDK and qemu-storage-daemon broke on it).  These tests keep it out
of the ring code three ways: statically, by tracing the ring operations, and by
reading a published index from another process.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from pyvirtio.errors import RingMisaligned
from pyvirtio.memory import GuestMemory
from pyvirtio.testing import DATA_GPA, RING_GPA, ring_addresses
from pyvirtio.virtqueue import words as words_module
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.inflight import InflightRegion, region_size
from pyvirtio.virtqueue.packed import PackedQueue, PackedRingAddresses
from pyvirtio.virtqueue.split import SplitQueue
from pyvirtio.virtqueue.words import Words

ROOT = Path(__file__).resolve().parents[2]
RING_MODULES = sorted((ROOT / "src" / "pyvirtio" / "virtqueue").glob("*.py"))


def _private_buffers(func: ast.AST) -> set[str]:
    """Names a function binds to a fresh ``bytearray(...)``: memory nobody else sees."""
    names: set[str] = set()
    for node in ast.walk(func):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "bytearray"
        ):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def pack_into_uses(path: Path) -> list[str]:
    """Every ``pack_into`` in ``path`` that does not target a private bytearray."""
    tree = ast.parse(path.read_text(), str(path))
    bad: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    allowed_calls: set[int] = set()
    for func in functions:
        private = _private_buffers(func)
        for node in ast.walk(func):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "pack_into"
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id in private
            ):
                allowed_calls.add(id(node.func))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "pack_into"
            and id(node) not in allowed_calls
        ):
            bad.append(f"{path.name}:{node.lineno}")
    return bad


def test_ring_code_calls_pack_into_only_on_private_buffers() -> None:
    """Not on a ring view, and never through an alias (``_pack = S.pack_into``)."""
    assert RING_MODULES, "no ring modules found"
    bad = [use for path in RING_MODULES for use in pack_into_uses(path)]
    assert bad == []


def test_the_static_check_finds_a_pack_into_on_a_ring_view(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import struct\n"
        "_pack = struct.Struct('<H').pack_into\n"
        "def ok(n):\n    table = bytearray(n)\n    struct.Struct('<H').pack_into(table, 0, 1)\n"
        "def bad(view):\n    struct.Struct('<H').pack_into(view, 2, 1)\n"
    )
    assert pack_into_uses(sample) == ["sample.py:2", "sample.py:7"]


def _device_round(device: SplitQueue | PackedQueue, count: int, round_: int) -> None:
    """Take ``count`` chains; use one alone and the rest as a batch; notify as asked."""
    device.disable_notifications()
    chains = [device.pop() for _ in range(count)]
    device.push(chains[0].head if chains[0] else 0, 8)
    device.push_many([(c.head, round_) for c in chains[1:] if c])
    device.enable_notifications()
    device.needs_notification()


def _exercise_split(memory: GuestMemory, start: Callable[[], None]) -> None:
    addrs = ring_addresses(RING_GPA, 8)
    driver = DriverSplitQueue(memory, 8, addrs, event_idx=True)
    device = SplitQueue(memory, 0, 8, addrs, event_idx=True)
    inflight_buffer = bytearray(region_size(8))
    device.attach_inflight(InflightRegion(memoryview(inflight_buffer), 8))
    start()
    for round_ in range(20):  # wraps the ring
        heads = [driver.add([(DATA_GPA, 8)], [(DATA_GPA + 64, 8)], publish=False)
                 for _ in range(3)]
        driver.publish_many(heads)
        driver.should_kick()
        _device_round(device, len(heads), round_)
        assert len(driver.get_used()) == 3


def _exercise_packed(memory: GuestMemory, start: Callable[[], None]) -> None:
    addrs = PackedRingAddresses(desc=RING_GPA, driver=RING_GPA + 0x400, device=RING_GPA + 0x440)
    driver = DriverPackedQueue(memory, 5, addrs, event_idx=True)
    device = PackedQueue(memory, 0, 5, addrs, event_idx=True)
    start()
    for round_ in range(20):
        bufs = [driver.add([(DATA_GPA, 8)], [(DATA_GPA + 64, 8)]) for _ in range(2)]
        driver.should_kick()
        driver.enable_interrupts()
        _device_round(device, len(bufs), round_)
        assert len(driver.get_used()) == 2


@pytest.mark.parametrize("exercise", [_exercise_split, _exercise_packed])
def test_ring_operations_never_call_pack_into(
    memory: GuestMemory, exercise: Callable[[GuestMemory, Callable[[], None]], None]
) -> None:
    """Driver and device sides, notifications and inflight records, over many wraps."""
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call":
            calls.append(getattr(arg, "__name__", ""))

    def start() -> None:  # trace the ring operations, not the set-up that zeroes rings
        sys.setprofile(profile)

    try:
        exercise(memory, start)
    finally:
        sys.setprofile(None)
    assert len(calls) > 100, "the trace saw nothing"
    assert "pack_into" not in calls


def test_words_refuse_a_misaligned_area(memory: GuestMemory) -> None:
    view = memory.view(RING_GPA + 2, 64)
    with pytest.raises(RingMisaligned, match="not 4-aligned"):
        Words(view, 4, "used ring")
    Words(view, 2, "available ring")  # 2-aligned is enough for the available ring


def test_a_split_ring_at_a_misaligned_address_is_refused(memory: GuestMemory) -> None:
    """VIRTIO 1.4 §2.7: the used ring is 4-aligned."""
    addrs = ring_addresses(RING_GPA, 8)
    addrs.used += 2
    with pytest.raises(RingMisaligned, match="used ring"):
        SplitQueue(memory, 0, 8, addrs)


def test_words_store_little_endian_fields() -> None:
    buffer = bytearray(16)
    words = Words(memoryview(buffer), 8, "test")
    words.u16[1] = 0x0102
    words.u32[1] = 0x03040506
    words.u64[1] = 0x0708090A0B0C0D0E
    assert bytes(buffer) == bytes.fromhex("0000020106050403" "0e0d0c0b0a090807")
    assert words_module.host_address(memoryview(buffer)) % 8 == 0


def test_another_process_never_reads_a_torn_used_index() -> None:
    """The device publishes its used index 2,000,000 times while a second process reads
    it; every read must be a value the device stored (tools/shm_coherence.py).  The
    same harness with ``struct.pack_into`` as the writer must catch torn reads, or it
    proves nothing."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "shm_coherence.py"), "--pushes", "2000000",
         "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    results = {r["writer"]: r for r in map(json.loads, out.stdout.splitlines())}
    device, control = results["device"], results["pack_into"]
    assert device["reads"] > 100_000, device
    assert device["torn"] == 0, device
    assert control["torn"] > 0, control
    assert out.returncode == 0, out.stderr
