"""virtio-fs's host-side rules: guest names, opens beneath a directory fd that follow
no link, and the bounded, reference-counted inode and handle tables."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyvirtio.devices.fs.inodes import HandleTable, InodeTable
from pyvirtio.devices.fs.safe import (
    check_name,
    fs_type,
    is_local_fs,
    open_beneath,
    openat2_available,
)


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"../x"])
def test_names_with_slash_dots_nul_or_empty_are_refused(name: bytes) -> None:
    with pytest.raises(OSError) as exc:
        check_name(name)
    assert exc.value.errno == errno.EINVAL


def test_names_up_to_255_bytes_pass_and_longer_ones_are_too_long() -> None:
    assert check_name(b"x" * 255) == b"x" * 255
    assert check_name(b"...") == b"..."
    with pytest.raises(OSError) as exc:
        check_name(b"x" * 256)
    assert exc.value.errno == errno.ENAMETOOLONG


def test_this_kernel_has_openat2() -> None:
    assert openat2_available()  # Linux >= 5.6: the tests below then exercise it


def test_open_beneath_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    share = tmp_path / "share"
    share.mkdir()
    (share / "out").symlink_to(tmp_path / "secret")
    (share / "outdir").symlink_to(tmp_path)
    dirfd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    try:
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as exc:
                open_beneath(dirfd, b"out", flags)
            assert exc.value.errno == errno.ELOOP
        fd = open_beneath(dirfd, b"out", os.O_PATH)  # the link itself
        assert os.readlink(b"", dir_fd=fd) == os.fsencode(tmp_path / "secret")
        os.close(fd)
        with pytest.raises(OSError):
            open_beneath(dirfd, b"outdir", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(OSError) as exc:
            open_beneath(dirfd, b"..", os.O_PATH)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            open_beneath(dirfd, b"x", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            open_beneath(dirfd, b"x", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    finally:
        os.close(dirfd)
    assert (tmp_path / "secret").read_text() == "s"


def _table(tmp_path: Path, limit: int) -> InodeTable:
    return InodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY), limit)


def _add(table: InodeTable, path: Path) -> int:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    inode = table.add(fd, os.fstat(fd))
    table.release(inode)
    return inode.nodeid


def test_hard_links_share_a_node_and_forget_closes_at_zero(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    os.link(tmp_path / "a", tmp_path / "b")
    table = _table(tmp_path, 8)
    first = _add(table, tmp_path / "a")
    assert _add(table, tmp_path / "b") == first and len(table) == 2
    inode = table.get(first)
    fd = inode.fd
    assert table.forget(first, 1) and table.forget(first, 5)  # more than held: to zero
    os.fstat(fd)  # still open: a request holds it
    table.release(inode)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed when the last user let go
    with pytest.raises(OSError) as exc:
        table.get(first)
    assert exc.value.errno == errno.ESTALE
    assert not table.forget(first, 1)
    table.close()


def test_the_inode_table_is_bounded_and_the_root_is_never_forgotten(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    table = _table(tmp_path, 3)
    ids = [_add(table, tmp_path / f"f{i}") for i in range(3)]
    with pytest.raises(OSError) as exc:
        _add(table, tmp_path / "f4")
    assert exc.value.errno == errno.ENFILE and table.refused == 1
    assert table.forget(1, 10**6)
    table.release(table.get(1))
    table.forget(ids[0], 1)
    _add(table, tmp_path / "f4")
    table.clear()
    assert len(table) == 1
    table.close()


def test_handles_are_bounded_and_closed_after_their_last_user(tmp_path: Path) -> None:
    handles = HandleTable(2)
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(3)]
    a = handles.add(fds[0], 5, is_dir=True)
    handles.add(fds[1], 5, is_dir=False)
    with pytest.raises(OSError) as exc:
        handles.add(fds[2], 5, is_dir=False)
    assert exc.value.errno == errno.EMFILE
    with pytest.raises(OSError):
        os.fstat(fds[2])  # refused: closed at once
    with pytest.raises(OSError):
        handles.get(a, is_dir=False)  # a directory handle is not a file handle
    held = handles.get(a, is_dir=True)
    handles.remove(a, is_dir=True)
    os.fstat(fds[0])
    handles.release(held)
    with pytest.raises(OSError):
        os.fstat(fds[0])
    handles.clear()
    assert len(handles) == 0


def test_local_file_systems_are_told_from_others(tmp_path: Path) -> None:
    """The loop runs short operations only on a local file system (ext4, tmpfs...)."""
    for path, local in ((tmp_path, True), (Path("/proc"), False)):
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        try:
            assert is_local_fs(fd) is local, path
        finally:
            os.close(fd)
    with pytest.raises(OSError):  # fs_type raises on a bad fd, is_local_fs says no
        fs_type(-1)
    assert is_local_fs(-1) is False


@pytest.mark.skipif(not openat2_available(), reason="the kernel has no openat2 (< 5.6)")
def test_same_mount_opens_never_enter_another_mount() -> None:
    """The event loop's opens stop at a mount point (``/proc`` in ``/``): a worker,
    which may wait, opens it instead."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            open_beneath(root, b"proc", os.O_PATH, same_mount=True)
        os.close(open_beneath(root, b"proc", os.O_PATH))
    finally:
        os.close(root)
