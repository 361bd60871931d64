"""``pyvirtio bench fs``: time FUSE requests against any vhost-user-fs back-end.

pyvirtio's FUSE driver (:class:`~pyvirtio.frontend.fs.FuseDriver`) connects to the
back-end's socket (``pyvirtio serve fs``, QEMU's C virtiofsd, Rust virtiofsd...), sends
INIT as Linux does, then requests for ``--time`` seconds (``--iodepth`` in flight, one
by default), laid out as
Linux's virtio-fs posts them (header, arguments, then 4 KiB pages; in an indirect
table when the back-end offers INDIRECT_DESC), and reports requests per second and the
latency of each (mean, p50, p99, max).  Operations:

- ``getattr``: GETATTR of the share's root;
- ``lookup``: LOOKUP of the bench file in the root (the lookups are forgotten at the end);
- ``read`` / ``write``: ``--bs`` bytes at random ``--bs``-aligned offsets of the bench
  file (``--file``, in the share's root: created and filled to ``--size`` when missing;
  ``write`` overwrites its contents).

Every reply is checked: an error reply counts in ``errors`` (the command then fails),
a short READ or WRITE too.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from pyvirtio.errors import FuseError
from pyvirtio.frontend.bench import latency_summary
from pyvirtio.frontend.fs import FuseDriver, Reply
from pyvirtio.spec.fuse import (
    FUSE_ROOT_ID,
    GETATTR_IN,
    OUT_HEADER,
    READ_IN,
    WRITE_IN,
    WRITE_OUT,
    InitFlag,
    Opcode,
)

__all__ = ["FS_OPERATIONS", "FsBenchConfig", "FsBenchResult", "run_fs_bench"]

FS_OPERATIONS = ("getattr", "lookup", "read", "write")
PAGE = 4096
#: The largest ``--bs``: FUSE's 256-page requests.
MAX_BS = 1 << 20
#: The most requests in flight (each has buffers of its own).
MAX_IODEPTH = 32
#: Bytes per WRITE that fills a new bench file.
FILL_CHUNK = 256 << 10
#: The ring size asked for: room for a 1 MiB request's 259 descriptors.
QUEUE_SIZE = 512
#: INIT flags offered, as Linux does (MAX_PAGES: 1 MiB requests).
INIT_FLAGS = int(InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS | InitFlag.DO_READDIRPLUS
                 | InitFlag.MAX_PAGES | InitFlag.BIG_WRITES)


@dataclass(frozen=True, slots=True)
class FsBenchConfig:
    """What to run: ``op`` of :data:`FS_OPERATIONS`, ``bs`` bytes per READ or WRITE
    (a multiple of 4 KiB up to 1 MiB), requests in flight, the bench file's name and
    size, how long."""

    op: str = "getattr"
    bs: int = PAGE
    iodepth: int = 1
    seconds: float = 5.0
    file: str = "pyvirtio-bench.dat"
    size: int = 64 << 20
    seed: int = 1

    def __post_init__(self) -> None:
        if self.op not in FS_OPERATIONS:
            raise ValueError(f"--op must be one of {', '.join(FS_OPERATIONS)}")
        if not 0 < self.bs <= MAX_BS or self.bs % PAGE:
            raise ValueError(f"--bs {self.bs} is not a multiple of 4 KiB up to 1 MiB")
        if not 1 <= self.iodepth <= MAX_IODEPTH:
            raise ValueError(f"--iodepth must be 1..{MAX_IODEPTH}")
        if self.seconds <= 0:
            raise ValueError("--time must be positive")
        name = self.file.encode()
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise ValueError(f"--file {self.file!r} is not a name in the share's root")
        if self.size < self.bs:
            raise ValueError(f"--size {self.size} is smaller than --bs {self.bs}")


@dataclass(slots=True)
class FsBenchResult:
    """What a run measured (``--json`` prints it)."""

    socket: str
    op: str
    bs: int
    iodepth: int
    seconds: float
    requests: int
    per_second: float
    mb_per_s: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_max_us: float
    errors: int
    tag: str

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly dict."""
        return asdict(self)

    def render(self) -> str:
        """One line for people."""
        size = f" bs={self.bs}" if self.op in ("read", "write") else ""
        size += f" iodepth={self.iodepth}" if self.iodepth > 1 else ""
        rate = f", {self.mb_per_s:.1f} MB/s" if self.op in ("read", "write") else ""
        return (f"fs {self.op}{size}: {self.per_second:,.0f} requests/s{rate}, latency mean "
                f"{self.lat_mean_us:.1f} us p50 {self.lat_p50_us:.1f} us p99 "
                f"{self.lat_p99_us:.1f} us max {self.lat_max_us:.1f} us; {self.requests} "
                f"requests in {self.seconds:.1f} s, {self.errors} errors")


def run_fs_bench(socket_path: Path | str, config: FsBenchConfig,
                 progress: TextIO | None = sys.stderr) -> FsBenchResult:
    """Connect, run ``config`` and disconnect.

    Raises:
        BackendError: the back-end refused the set-up or stopped answering.
        FuseError: INIT, or preparing the bench file, failed.
    """
    fs = FuseDriver.open(socket_path, queue_size=QUEUE_SIZE, slots=config.iodepth,
                         room=max(config.bs, FILL_CHUNK) + PAGE)
    try:
        fs.init(INIT_FLAGS)
        return _Run(fs, config, str(socket_path), progress).run()
    finally:
        fs.close()


class _Run:
    def __init__(self, fs: FuseDriver, config: FsBenchConfig, socket: str,
                 progress: TextIO | None) -> None:
        self.fs = fs
        self.config = config
        self.socket = socket
        self.progress = progress
        self.rng = random.Random(config.seed)
        self.errors = 0
        self.nodeid = FUSE_ROOT_ID
        self.fh = -1
        self.lookups = 0

    def run(self) -> FsBenchResult:
        config, fs = self.config, self.fs
        submit = self._submitter()
        latencies: list[int] = []
        sent: dict[int, int] = {}  # unique -> when it was submitted
        clock = time.perf_counter_ns
        start = last = clock()
        end = start + int(config.seconds * 1e9)
        report = start + 1_000_000_000
        done_at_report = 0
        try:
            while sent or clock() < end:
                while len(sent) < config.iodepth and clock() < end:
                    sent[submit()] = clock()
                reply = fs.wait_any(sent)
                after = clock()
                latencies.append(after - sent.pop(reply.unique))
                self.errors += _failed(config.op, config.bs, reply)
                if self.progress is not None and after >= report:
                    n = len(latencies) - done_at_report
                    self.progress.write(f"\r{(after - start) / 1e9:6.1f}s "
                                        f"{n / ((after - last) / 1e9):10,.0f} requests/s ")
                    self.progress.flush()
                    done_at_report, last, report = len(latencies), after, after + 1_000_000_000
        finally:
            if not sent:  # else a failure left requests in flight: the back-end forgets
                self._finish()  # everything of ours when we disconnect
        elapsed = (clock() - start) / 1e9
        if self.progress is not None:
            self.progress.write("\n")
        count = len(latencies)
        mean, p50, p99, worst = latency_summary(latencies)
        moved = config.bs if config.op in ("read", "write") else 0
        return FsBenchResult(
            socket=self.socket, op=config.op, bs=config.bs, iodepth=config.iodepth,
            seconds=round(elapsed, 3), requests=count, per_second=round(count / elapsed, 1),
            mb_per_s=round(count * moved / elapsed / 1e6, 2), lat_mean_us=mean,
            lat_p50_us=p50, lat_p99_us=p99, lat_max_us=worst, errors=self.errors,
            tag=fs.tag)

    # -- the operations ---------------------------------------------------------------------

    def _submitter(self) -> Callable[[], int]:
        """What posts one request of ``--op`` and returns its unique."""
        fs, config = self.fs, self.config
        if config.op == "getattr":
            args = GETATTR_IN.pack(0, 0, 0)
            return lambda: fs.submit(Opcode.GETATTR, FUSE_ROOT_ID, args, out_len=256)
        name = config.file.encode() + b"\0"
        self.nodeid, size = self._prepare_file()
        if config.op == "lookup":
            def lookup() -> int:
                self.lookups += 1
                return fs.submit(Opcode.LOOKUP, FUSE_ROOT_ID, name, out_len=256)
            return lookup
        bs, nodeid = config.bs, self.nodeid
        if size < bs:
            raise FuseError(f"{config.file} holds {size} bytes, less than --bs", errno.EINVAL)
        self.fh = fs.open_file(nodeid, os.O_RDWR if config.op == "write" else os.O_RDONLY)
        fh, rng, blocks = self.fh, self.rng, size // bs
        if config.op == "read":
            return lambda: fs.submit(
                Opcode.READ, nodeid, READ_IN.pack(fh, rng.randrange(blocks) * bs, bs, 0, 0, 0, 0),
                out_len=OUT_HEADER.size + bs, segment=PAGE)
        data = os.urandom(bs)
        return lambda: fs.submit(
            Opcode.WRITE, nodeid,
            WRITE_IN.pack(fh, rng.randrange(blocks) * bs, bs, 0, 0, 0, 0) + data,
            out_len=OUT_HEADER.size + WRITE_OUT.size, segment=PAGE)

    def _prepare_file(self) -> tuple[int, int]:
        """The bench file's node id (one lookup held, forgotten at the end) and size;
        the file is created and filled when missing."""
        fs, config = self.fs, self.config
        name = config.file.encode()
        try:
            entry = fs.lookup(FUSE_ROOT_ID, name)
        except FuseError as exc:
            if exc.errno != errno.ENOENT:
                raise
            entry, fh = fs.create(FUSE_ROOT_ID, name, os.O_RDWR, 0o644)
            chunk = os.urandom(FILL_CHUNK)
            try:
                for offset in range(0, config.size, FILL_CHUNK):
                    fs.write(fh, offset, chunk[: config.size - offset], entry.nodeid)
            except BaseException:  # no half-filled file left for the next run
                fs.release(fh, entry.nodeid)
                fs.request(Opcode.UNLINK, FUSE_ROOT_ID, name + b"\0")
                fs.forget(entry.nodeid, 1)
                raise
            fs.release(fh, entry.nodeid)
            return entry.nodeid, config.size
        return entry.nodeid, entry.size

    def _finish(self) -> None:
        """Close the bench file and forget its lookups."""
        fs = self.fs
        if self.fh >= 0:
            fs.release(self.fh, self.nodeid)
        if self.nodeid != FUSE_ROOT_ID:
            fs.forget(self.nodeid, 1 + self.lookups)


def _failed(op: str, bs: int, reply: Reply) -> bool:
    """Whether ``reply`` counts as an error: an error reply, a READ that brought fewer
    than ``bs`` bytes, or a WRITE whose reply is short or says fewer were written."""
    if reply.error:
        return True
    if op == "read":
        return len(reply.payload) < bs
    if op == "write":
        payload = reply.payload
        return len(payload) < WRITE_OUT.size or WRITE_OUT.unpack_from(payload)[0] < bs
    return False
