"""virtio-rng end to end: the guest's hwrng is pyvirtio's entropy device."""

from __future__ import annotations

from collections.abc import Callable

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

Serve = Callable[..., BackendProcess]


def test_guest_hwrng_is_virtio_and_gives_distinct_random_bytes(
    kit: GuestKit, serve: Serve
) -> None:
    rng = serve("rng")
    script = """
        echo RESULT current=$(cat /sys/class/misc/hw_random/rng_current)
        echo RESULT a=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
        echo RESULT b=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
    """
    result = kit.run(script, ["virtio-rng"], vhost_user_device_args("rng", rng.socket_path, "r0"))
    assert result.exit_code == 0, result.console
    assert result.results["current"].startswith("virtio_rng"), result.results
    a, b = result.results["a"], result.results["b"]
    assert len(a) == 64 and len(b) == 64
    assert a != b
    assert a != "0" * 64
    assert rng.stop() == 0
    assert "bytes to the guest" in rng.log
