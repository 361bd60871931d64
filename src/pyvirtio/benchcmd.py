"""``pyvirtio bench``: drive a vhost-user back-end from Python and measure it.

``bench blk`` (:mod:`pyvirtio.frontend.bench`), ``bench net``
(:mod:`pyvirtio.frontend.netbench`) and ``bench fs`` (:mod:`pyvirtio.frontend.fsbench`):
their command lines and how their results are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyvirtio.client import command_failed
from pyvirtio.devices.registry import parse_size, positive_int
from pyvirtio.errors import PyVirtioError
from pyvirtio.frontend.bench import WORKLOADS, BenchConfig, run_bench
from pyvirtio.frontend.fsbench import FS_OPERATIONS, FsBenchConfig, run_fs_bench
from pyvirtio.frontend.netbench import NetBenchConfig, run_net_bench

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parents: list[argparse.ArgumentParser]) -> None:
    """The ``bench`` sub-command and its device sub-commands."""
    common = parents[0]
    bench = sub.add_parser("bench", parents=[common], help="benchmark a vhost-user back-end")
    bench_devices = bench.add_subparsers(dest="device", required=True)
    bench_blk = bench_devices.add_parser(
        "blk",
        parents=[common],
        help="drive a vhost-user-blk back-end",
        description="Drive a vhost-user-blk back-end from Python (no guest) and report IOPS, "
        "throughput and latency. Writes destroy the disk's data.",
    )
    bench_blk.add_argument("socket", type=Path, help="the back-end's Unix socket")
    bench_blk.add_argument("--rw", choices=WORKLOADS, default="randread", help="workload")
    bench_blk.add_argument("--bs", type=parse_size, default=4096, help="block size (4k)")
    bench_blk.add_argument("--iodepth", type=positive_int, default=1, help="requests in flight "
                           "per queue (1..256)")
    bench_blk.add_argument("--queues", type=positive_int, default=1, help="queues to drive")
    bench_blk.add_argument("--time", type=float, default=5.0, help="seconds (5)")
    bench_blk.add_argument("--verify", action="store_true",
                           help="write a pattern, check every read, read all back at the end")
    bench_blk.add_argument("--span", type=parse_size,
                           help="bytes of the disk to use (default: all; 64M with --verify)")
    bench_blk.add_argument("--rwmixread", type=int, default=50, help="%% reads in randrw")
    bench_blk.add_argument("--packed", action="store_true",
                           help="use packed virtqueues (VIRTIO_F_RING_PACKED)")
    bench_blk.add_argument("--json", action="store_true", help="print the result as JSON")
    bench_blk.add_argument("--quiet", action="store_true", help="no live progress line")
    bench_net = bench_devices.add_parser(
        "net",
        parents=[common],
        help="forward frames from one virtio-net port to another",
        description="Drive two vhost-user-net ports of one switch from Python (no guest): "
        "keep SOCK_TX's transmit ring full of frames for SOCK_RX and SOCK_RX's receive ring "
        "full of buffers; report frames per second, Gbit/s, drops and each daemon's CPU "
        "time per packet.",
    )
    bench_net.add_argument("tx_socket", type=Path, metavar="SOCK_TX",
                           help="the port that transmits")
    bench_net.add_argument("rx_socket", type=Path, metavar="SOCK_RX",
                           help="the port that receives")
    bench_net.add_argument("--size", type=int, default=64,
                           help="frame size in bytes, without FCS (64; 16..1518)")
    bench_net.add_argument("--time", type=float, default=5.0, help="seconds measured (5)")
    bench_net.add_argument("--packed", action="store_true",
                           help="use packed virtqueues (VIRTIO_F_RING_PACKED)")
    bench_net.add_argument("--json", action="store_true", help="print the result as JSON")
    bench_fs = bench_devices.add_parser(
        "fs", parents=[common], help="time FUSE requests against a vhost-user-fs back-end",
        description="Drive a vhost-user-fs back-end (pyvirtio serve fs, virtiofsd...) from "
        "Python, requests laid out as Linux's virtio-fs lays them out; report requests "
        "per second and latency.")
    bench_fs.add_argument("socket", type=Path, help="the back-end's Unix socket")
    bench_fs.add_argument("--op", choices=FS_OPERATIONS, default="getattr", help="request")
    bench_fs.add_argument("--bs", type=parse_size, default=4096,
                          help="bytes per READ or WRITE (4k; up to 1M)")
    bench_fs.add_argument("--iodepth", type=positive_int, default=1,
                          help="requests in flight (1..32)")
    bench_fs.add_argument("--file", default="pyvirtio-bench.dat",
                          help="the bench file, in the share's root (made if missing)")
    bench_fs.add_argument("--size", type=parse_size, default=64 << 20,
                          help="the bench file's size when it is made (64M)")
    bench_fs.add_argument("--time", type=float, default=5.0, help="seconds (5)")
    bench_fs.add_argument("--json", action="store_true", help="print the result as JSON")
    bench_fs.add_argument("--quiet", action="store_true", help="no live progress line")


def _bench_net(args: argparse.Namespace) -> int:
    try:
        config = NetBenchConfig(size=args.size, seconds=args.time, packed=args.packed)
        result = run_net_bench(args.tx_socket, args.rx_socket, config)
    except (PyVirtioError, ValueError) as exc:
        return command_failed("bench", str(exc))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    cpu = ", ".join(f"pid {d['pid']} ({len(d['sockets'])} port{'s' * (len(d['sockets']) > 1)}) "
                    f"{d['cpu_us_per_packet']} us/packet at {d['cpu_util']:.0%}"
                    for d in result.daemons)
    print(f"net {result.size} B{' packed' if result.packed else ''}: {result.pps:,.0f} pps, "
          f"{result.gbit_per_s:.3f} Gbit/s, {result.drops} drops ({result.sent} sent, "
          f"{result.received} received); daemon CPU: {cpu}"
          + (f"; daemons' drop counters {result.daemon_drops}" if result.daemon_drops else ""))
    return 0


def _bench_fs(args: argparse.Namespace) -> int:
    try:
        config = FsBenchConfig(op=args.op, bs=args.bs, iodepth=args.iodepth,
                               seconds=args.time, file=args.file, size=args.size)
        result = run_fs_bench(args.socket, config, None if args.quiet else sys.stderr)
    except (PyVirtioError, ValueError) as exc:
        return command_failed("bench", str(exc))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.render())
    return command_failed("bench", f"{result.errors} requests failed") if result.errors else 0


def main(args: argparse.Namespace) -> int:
    """Run ``pyvirtio bench DEVICE``; the exit status."""
    if args.device == "net":
        return _bench_net(args)
    if args.device == "fs":
        return _bench_fs(args)
    try:
        config = BenchConfig(
            rw=args.rw, bs=args.bs, iodepth=args.iodepth, queues=args.queues,
            seconds=args.time, verify=args.verify, span=args.span, rwmixread=args.rwmixread,
            packed=args.packed,
        )
        result = run_bench(args.socket, config, None if args.quiet else sys.stderr)
    except (PyVirtioError, ValueError) as exc:
        return command_failed("bench", str(exc))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(
            f"{result.rw} bs={result.bs} iodepth={result.iodepth} queues={result.queues}"
            f"{' packed' if result.packed else ''}: "
            f"{result.iops:,.0f} IOPS, {result.mb_per_s:.1f} MB/s, latency mean "
            f"{result.lat_mean_us:.1f} us p50 {result.lat_p50_us:.1f} us "
            f"p99 {result.lat_p99_us:.1f} us; {result.ios} I/Os in {result.seconds:.1f} s, "
            f"load generator {result.frontend_cpu_per_io_us:.1f} us CPU per I/O"
        )
        if result.verify:
            print(f"verify: {result.verified_blocks} blocks read back, "
                  f"{result.failure_count} failures")
        for failure in result.verify_failures:
            print(f"  {failure}")
    if result.errors:
        command_failed("bench", f"{result.errors} requests failed")
    elif not result.ok:
        command_failed("bench", f"verify found {result.failure_count} failures")
    return 0 if result.ok else 1
