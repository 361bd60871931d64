"""Smoke tests of the guest test kit: boot a real Debian guest under QEMU (TCG).

Each test boots a guest (about 2 s); the first run also fetches the kernel.
"""

from __future__ import annotations

import pytest

from pyvirtio.guestkit import GuestKit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kit() -> GuestKit:
    """Provide QEMU and the guest kernel, installing or fetching them if need be."""
    return GuestKit.ensure()


def test_script_results_reach_the_host(kit: GuestKit) -> None:
    """A ``RESULT key=value`` line printed by the guest script lands in ``results``."""
    result = kit.run("echo RESULT uname=$(uname -r)", modules=[])

    assert result.results["uname"] == kit.version
    assert result.exit_code == 0
    assert result.qemu_returncode == 0


def test_script_exit_status_is_reported(kit: GuestKit) -> None:
    """The script's exit status is the result's ``exit_code``."""
    result = kit.run("echo RESULT before=exit\nexit 3", modules=[])

    assert result.exit_code == 3
    assert result.results == {"before": "exit"}


def test_requested_module_is_loaded_after_its_dependencies(kit: GuestKit) -> None:
    """virtio_blk loads once virtio_ring, virtio and virtio_pci are in."""
    script = (
        "for m in virtio_ring virtio virtio_pci virtio_blk; do\n"
        "  [ -d /sys/module/$m ] && echo RESULT $m=loaded\n"
        "done\n"
    )
    result = kit.run(script, modules=["virtio-blk"])

    assert result.results == dict.fromkeys(
        ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"], "loaded"
    )


def test_virtio_rng_driver_binds_to_a_qemu_device(kit: GuestKit) -> None:
    """Extra QEMU arguments add devices: virtio-rng-pci becomes the guest's hwrng."""
    result = kit.run(
        "echo RESULT rng=$(cat /sys/class/misc/hw_random/rng_current)",
        modules=["virtio-rng"],
        qemu_args=["-device", "virtio-rng-pci"],
    )

    assert result.results["rng"] == "virtio_rng.0"


def test_started_guest_can_be_watched_while_it_runs(kit: GuestKit) -> None:
    """``start`` returns at once; ``wait_for`` follows the console, ``wait`` ends it."""
    with kit.start("echo RESULT step=1\necho RESULT step=2", modules=[]) as vm:
        assert vm.wait_for("RESULT step=", timeout=60).endswith("step=1")
        assert vm.wait_for("RESULT step=", timeout=60).endswith("step=2")
        result = vm.wait(timeout=60)

    assert result.results == {"step": "2"}
    assert result.exit_code == 0
