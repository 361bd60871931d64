"""The guest test kit: boot a scripted Linux guest under QEMU to test devices end to end.

Typical use, with a vhost-user back-end already listening on ``sock``::

    kit = GuestKit.ensure()
    result = kit.run(
        "dd if=/dev/vda bs=4k count=1 >/dev/null && echo RESULT read=ok",
        modules=["virtio_blk"],
        qemu_args=["-chardev", f"socket,id=c0,path={sock}",
                   "-device", "vhost-user-blk-pci,chardev=c0"],
    )
    assert result.exit_code == 0 and result.results["read"] == "ok"

:mod:`~pyvirtio.guestkit.assets` provides QEMU, busybox and the Debian kernel
(cached in ``$PYVIRTIO_CACHE`` or ``~/.cache/pyvirtio``),
:mod:`~pyvirtio.guestkit.initramfs` builds the guest's initramfs, and
:mod:`~pyvirtio.guestkit.vm` boots it.  The kit's errors are in :mod:`pyvirtio.errors`,
under :class:`~pyvirtio.errors.GuestError`.
"""

from pyvirtio.guestkit.assets import (
    default_cache_dir,
    qemu_binary,
)
from pyvirtio.guestkit.initramfs import binary_files
from pyvirtio.guestkit.vm import (
    GuestKit,
    GuestResult,
    GuestVM,
)

__all__ = [
    "GuestKit",
    "GuestResult",
    "GuestVM",
    "binary_files",
    "default_cache_dir",
    "qemu_binary",
]
