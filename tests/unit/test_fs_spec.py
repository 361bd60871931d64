"""FUSE 7.38 wire structs (Linux ``include/uapi/linux/fuse.h``) and the virtio-fs config
space (VIRTIO 1.4 §5.11.4): sizes as the header defines them."""

from __future__ import annotations

import pytest

from pyvirtio.spec import fs, fuse

#: ``sizeof`` of each struct in fuse.h 7.38 (x86_64, which is how every field packs).
SIZES = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "ATTR": 88, "ENTRY_OUT": 128, "ATTR_OUT": 104,
    "GETATTR_IN": 16, "SETATTR_IN": 88, "INIT_IN": 64, "INIT_OUT": 64, "FORGET_IN": 8,
    "BATCH_FORGET_IN": 8, "FORGET_ONE": 16, "INTERRUPT_IN": 8, "MKNOD_IN": 16,
    "MKDIR_IN": 8, "RENAME_IN": 8, "RENAME2_IN": 16, "LINK_IN": 8, "ACCESS_IN": 8,
    "OPEN_IN": 8, "CREATE_IN": 16, "OPEN_OUT": 16, "RELEASE_IN": 24, "FLUSH_IN": 24,
    "READ_IN": 40, "WRITE_IN": 40, "WRITE_OUT": 8, "FSYNC_IN": 16, "FALLOCATE_IN": 32,
    "LSEEK_IN": 24, "LSEEK_OUT": 8, "COPY_FILE_RANGE_IN": 56, "SYNCFS_IN": 8,
    "FILE_LOCK": 24, "LK_IN": 48, "LK_OUT": 24, "SETXATTR_IN": 8, "GETXATTR_IN": 8,
    "GETXATTR_OUT": 8, "KSTATFS": 80, "DIRENT": 24,
}


@pytest.mark.parametrize(("name", "size"), sorted(SIZES.items()))
def test_struct_size_matches_fuse_h(name: str, size: int) -> None:
    assert getattr(fuse, name).size == size


def test_every_struct_is_little_endian_and_checked() -> None:
    structs = {n for n in fuse.__all__ if hasattr(getattr(fuse, n), "size")
               and hasattr(getattr(fuse, n), "format")}
    assert structs == set(SIZES)
    for name in structs:
        assert getattr(fuse, name).format.startswith("<"), name


def test_protocol_version_and_opcodes() -> None:
    assert (fuse.FUSE_KERNEL_VERSION, fuse.FUSE_KERNEL_MINOR_VERSION) == (7, 38)
    numbers = {op.name: int(op) for op in fuse.Opcode}
    assert (numbers["INIT"], numbers["SETLKW"]) == (26, 33)
    assert (numbers["BATCH_FORGET"], numbers["SYNCFS"]) == (42, 50)
    assert fuse.InitFlag.INIT_EXT == 1 << 30 and fuse.InitFlag.HAS_EXPIRE_ONLY == 1 << 35
    assert fuse.COMPAT_INIT_IN_SIZE == 16


def test_dirent_records_pad_names_to_eight_bytes() -> None:
    assert fuse.dirent_size(1) == 32
    assert fuse.dirent_size(8) == 32
    assert fuse.dirent_size(9) == 40


def test_virtio_fs_config_space_layout() -> None:
    assert fs.CONFIG.size == 44 and fs.TAG_SIZE == 36
    tag, queues, notify = fs.CONFIG.unpack(fs.CONFIG.pack(b"mytag", 2, 0))
    assert tag.rstrip(b"\0") == b"mytag" and (queues, notify) == (2, 0)
    assert int(fs.FsFeature.NOTIFICATION) == 0 and fs.HIPRIO_QUEUE == 0
