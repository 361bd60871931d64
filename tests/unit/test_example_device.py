"""The example device of docs/writing-a-device.md (examples/uppercase), tested with
pyvirtio.testing as its author would: a few lines per case, no QEMU."""

from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyvirtio_uppercase import TOY_DEVICE_ID, UppercaseDevice

from pyvirtio.devices.registry import ENTRY_POINT_GROUP, discover
from pyvirtio.testing import DeviceHarness

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "uppercase"


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def harness(request: pytest.FixtureRequest) -> Iterator[DeviceHarness]:
    with DeviceHarness(UppercaseDevice(), packed=request.param) as harness:
        yield harness


def test_the_text_comes_back_in_upper_case(harness: DeviceHarness) -> None:
    used = harness.request(readable=b"hello, virtio", writable=64)
    assert (used.length, used.data) == (13, b"HELLO, VIRTIO")


def test_a_too_small_writable_buffer_gets_nothing_and_counts_as_an_error(
    harness: DeviceHarness,
) -> None:
    assert harness.request(readable=b"hello", writable=4).length == 0
    assert harness.device.stats[0].errors == 1


def test_text_spread_over_several_descriptors(harness: DeviceHarness) -> None:
    used = harness.request(readable=[b"hel", b"lo, ", b"virtio"], writable=[4, 4, 8])
    assert used.data == b"HELLO, VIRTIO"


def test_the_entry_point_its_pyproject_declares_registers_it() -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][ENTRY_POINT_GROUP]
    registry = discover([importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP)
                         for name, value in declared.items()])
    assert not registry.problems
    device_type = registry["uppercase"]
    assert device_type.device_id == TOY_DEVICE_ID
    device, _options = device_type.factory(argparse.Namespace())
    assert isinstance(device, UppercaseDevice)


def test_the_example_stays_small() -> None:
    """docs/writing-a-device.md promises a complete device in under 80 lines."""
    lines = (EXAMPLE / "pyvirtio_uppercase.py").read_text().splitlines()
    assert len([line for line in lines if line.strip()]) < 80
