"""virtio-fs's entry in the device registry: ``pyvirtio serve fs``, QEMU, ``probe``.

QEMU 7.2: ``-chardev socket,id=c0,path=SOCK -device vhost-user-fs-pci,chardev=c0,tag=TAG``
(QEMU keeps the tag itself); user-mode Linux: ``virtio_uml.device=SOCK:26``, which
reads the tag from the back-end's config space.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.fs.device import FsDevice
from pyvirtio.devices.fs.safe import openat2_available
from pyvirtio.devices.fs.server import CACHE_MODES, SANDBOXES, FsConfig, Sandbox
from pyvirtio.devices.registry import DeviceType, ServeOptions, positive_int
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.fs import CONFIG, TAG_SIZE, FsFeature

__all__ = ["FS_TYPE"]

#: The daemon's start-up lines (the logger ``pyvirtio serve`` always used for them).
log = logging.getLogger("pyvirtio")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared-dir", type=Path, required=True,
                        help="the host directory the guest mounts")
    parser.add_argument("--tag", required=True,
                        help=f"the mount tag (mount -t virtiofs TAG), <= {TAG_SIZE} bytes")
    parser.add_argument(
        "--cache", choices=CACHE_MODES, default="auto",
        help="guest caching: never (no caching, direct I/O: virtiofsd's cache=none), auto "
        "(1 s, the default) or always (a day; the page cache survives opens)",
    )
    parser.add_argument("--readonly", action="store_true",
                        help="refuse every change (EROFS)")
    parser.add_argument("--xattr", action="store_true", help="serve extended attributes")
    parser.add_argument("--writeback", action="store_true",
                        help="let the guest cache writes (FUSE_WRITEBACK_CACHE)")
    parser.add_argument("--announce-submounts", action="store_true",
                        help="directories on other host file systems become submounts "
                        "in the guest (own st_dev)")
    parser.add_argument("--thread-pool-size", type=positive_int, default=4,
                        help="worker threads running requests (default 4)")
    parser.add_argument(
        "--sandbox", choices=SANDBOXES, default=None,
        help="confinement once a guest connects: chroot (into the shared dir), namespace "
        "(a private mount namespace, then chroot) or none; default chroot as root, none "
        "otherwise",
    )
    parser.add_argument("--request-queues", type=positive_int, default=1,
                        help="request queues (QEMU's num-request-queues, default 1)")
    parser.add_argument("--max-inodes", type=positive_int, default=16384,
                        help="inodes a guest may hold at once (default 16384)")
    parser.add_argument("--max-handles", type=positive_int, default=4096,
                        help="files a guest may hold open at once (default 4096)")
    parser.add_argument("--allow-devices", action="store_true",
                        help="let the guest create character and block device nodes")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    shared: Path = args.shared_dir.resolve()
    if not shared.is_dir():
        raise ValueError(f"--shared-dir {shared} is not a directory")
    root = os.geteuid() == 0
    sandbox: Sandbox = args.sandbox or ("chroot" if root else "none")
    if sandbox != "none" and not root:
        raise ValueError(f"--sandbox {sandbox} needs root (use --sandbox none)")
    config = FsConfig(
        shared_dir=shared, tag=args.tag, cache=args.cache, readonly=args.readonly,
        xattr=args.xattr, writeback=args.writeback,
        announce_submounts=args.announce_submounts, thread_pool_size=args.thread_pool_size,
        sandbox=sandbox, request_queues=args.request_queues, max_inodes=args.max_inodes,
        max_handles=args.max_handles, allow_devices=args.allow_devices,
    )
    device = FsDevice(config)
    log.info("virtio-fs: %s as tag %r, cache %s%s%s, %d worker(s), sandbox %s, %d request "
             "queue(s), openat2 %s", shared, config.tag, config.cache,
             ", read-only" if config.readonly else "", ", xattr" if config.xattr else "",
             config.thread_pool_size, sandbox, config.request_queues,
             "yes" if openat2_available() else "no (safe walk)")
    return device, ServeOptions()


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_fs_config`` (VIRTIO 1.4 §5.11.4)."""
    tag, queues, notify = CONFIG.unpack_from(raw.ljust(CONFIG.size, b"\0"))
    return {"tag": tag.rstrip(b"\0").decode(errors="replace"), "num_request_queues": queues,
            "notify_buf_size": notify}


FS_TYPE = DeviceType(
    name="fs",
    summary="virtio-fs: a host directory the guest mounts (FUSE 7.38)",
    description="Serve a host directory as a virtio-fs file system (QEMU: -device "
    "vhost-user-fs-pci,chardev=ID,tag=TAG; user-mode Linux: virtio_uml.device=SOCKET:26). "
    "The guest mounts it with 'mount -t virtiofs TAG /mnt'.",
    device_id=DeviceId.FS,
    qemu_device="vhost-user-fs-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=FsFeature,
    config_read=CONFIG.size,
    decode_config=_decode_config,
)
"""virtio-fs (:mod:`pyvirtio.devices.fs.device`)."""
