"""Compare `pyvirtio serve fs` with QEMU 7.2's C virtiofsd on the same guest workload.

One Linux guest under QEMU 7.2 (TCG) mounts both back-ends at once, each on a share of
its own (``cache=none`` on both sides: virtiofsd ``-o cache=none``, pyvirtio ``--cache
never``), and runs each workload on virtiofsd then on pyvirtio, round after round, so
that both meet the same machine load:

- **metadata**: create N empty files (a shell builtin, no process per file), look
  each up again (``[ -e ]``: with no caching every one is a LOOKUP), then ``rm -rf``
  them (READDIRPLUS and UNLINK); rates in operations per second;
- **data**, with fio on a 64 MiB file: 4k random read at qd1 (psync) and qd16
  (libaio), 4k random write at qd1, 1 MiB sequential read and write (direct I/O).

The ratios pyvirtio / virtiofsd are reported per round and as the median.  With
``--baseline SRC`` (the ``src/`` folder of another pyvirtio, e.g. a copy from before a
change) a third share is served by that code and measured in the same rounds, and the
ratios pyvirtio / baseline are reported too.  Usage: ``python benchmarks/compare_fs.py
[--files N] [--time S] [--repeat R] [--baseline SRC] [--json FILE]`` (as root:
virtiofsd's chroot sandbox needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
TAG_C, TAG_P, TAG_B = "cbench", "pbench", "bbench"
#: Shares by key: virtiofsd, pyvirtio, and (``--baseline``) another pyvirtio.
LABELS = {"c": "virtiofsd", "p": "pyvirtio", "b": "baseline"}
#: fio jobs: name, fio arguments, terse v3 field (1-based) of the figure.
FIO_JOBS = [
    ("4k randread qd1 (IOPS)", "--rw=randread --bs=4k --ioengine=psync", 8),
    ("4k randread qd16 (IOPS)", "--rw=randread --bs=4k --ioengine=libaio --iodepth=16", 8),
    ("4k randwrite qd1 (IOPS)", "--rw=randwrite --bs=4k --ioengine=psync", 49),
    ("1M seq read (MiB/s)", "--rw=read --bs=1M --ioengine=psync", 7),
    ("1M seq write (MiB/s)", "--rw=write --bs=1M --ioengine=psync", 48),
]
META = ["create", "lookup", "unlink"]


def _script(files: int, seconds: int, rounds: int, keys: tuple[str, ...]) -> str:
    """Every share mounted; per round, each workload on virtiofsd then on the others."""
    tags = {"c": TAG_C, "p": TAG_P, "b": TAG_B}
    lines = ["up() { cut -d' ' -f1 /proc/uptime; }\n"]
    for t in keys:
        lines.append(f"""mkdir -p /mnt/{t}
mount -t virtiofs {tags[t]} /mnt/{t} || echo RESULT mount=failed
dd if=/dev/zero of=/mnt/{t}/fio.dat bs=1048576 count=64 2>/dev/null
""")
    for n in range(rounds):
        for t in keys:
            lines.append(f"""
mkdir /mnt/{t}/m
t0=$(up)
i=0; while [ $i -lt {files} ]; do : > /mnt/{t}/m/f$i; i=$((i + 1)); done
t1=$(up)
i=0; while [ $i -lt {files} ]; do [ -e /mnt/{t}/m/f$i ] || echo missing; i=$((i + 1)); done
t2=$(up)
rm -rf /mnt/{t}/m
t3=$(up)
echo RESULT r{n}{t}meta=$t0,$t1,$t2,$t3
""")
        for i, (_, args, field) in enumerate(FIO_JOBS):
            for t in keys:
                lines.append(
                    f"v=$(/usr/bin/fio --name=j{i} --filename=/mnt/{t}/fio.dat --size=64M "
                    f"--direct=1 {args} --runtime={seconds} --time_based --output-format=terse "
                    f"--terse-version=3 2>/tmp/fio.err | cut -d';' -f{field})\n"
                    f"echo RESULT r{n}{t}fio{i}=$v\n[ -n \"$v\" ] || cat /tmp/fio.err\n")
    lines.append("".join(f"umount /mnt/{t}\n" for t in keys))
    return "".join(lines)


def _virtiofsd(socket: Path, share: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={socket}", "-o", f"source={share}", "-o", "sandbox=chroot",
         "-o", "cache=none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not socket.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("virtiofsd did not start")
        time.sleep(0.05)
    return process


def _figures(r: dict[str, str], key: str, files: int) -> dict[str, float]:
    t = [float(x) for x in r[f"{key}meta"].split(",")]
    out = {name: files / max(t[i + 1] - t[i], 0.01) for i, name in enumerate(META)}
    for i, (name, _, field) in enumerate(FIO_JOBS):
        value = float(r.get(f"{key}fio{i}") or 0)
        out[name] = value / 1024 if field in (7, 48) else value
    return out


def _pyvirtio(socket: Path, share: Path, tag: str, src: Path | None) -> BackendProcess:
    """``pyvirtio serve fs --cache never``, importing pyvirtio from ``src`` if given."""
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    try:
        return BackendProcess("fs", socket, ["--shared-dir", str(share), "--tag", tag,
                                             "--cache", "never"], log_level="warning")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _run(kit: GuestKit, work: Path, files: int, seconds: int, rounds: int, *,
         baseline: Path | None) -> list[dict[str, dict[str, float]]]:
    """One guest, every back-end; ``rounds`` rounds of every workload, alternating."""
    keys = ("c", "b", "p") if baseline else ("c", "p")
    shares = {t: work / f"share-{t}" for t in keys}
    for share in shares.values():
        shutil.rmtree(share, ignore_errors=True)
        share.mkdir()
    sockets = {t: work / f"{t}.sock" for t in keys}
    for sock in sockets.values():
        sock.unlink(missing_ok=True)
    fio = shutil.which("fio")
    if fio is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    reference = _virtiofsd(sockets["c"], shares["c"])
    ours = [_pyvirtio(sockets["p"], shares["p"], TAG_P, None)]
    if baseline:
        ours.append(_pyvirtio(sockets["b"], shares["b"], TAG_B, baseline))
    try:
        devices = (vhost_user_device_args("fs", sockets["c"], "fs0", tag=TAG_C)
                   + vhost_user_device_args("fs", sockets["p"], "fs1", tag=TAG_P))
        if baseline:
            devices += vhost_user_device_args("fs", sockets["b"], "fs2", tag=TAG_B)
        result = kit.run(_script(files, seconds, rounds, keys), ["virtiofs"], devices,
                         files=binary_files(Path(fio)),
                         timeout=120 + rounds * len(keys) * (6 * seconds + 30))
    finally:
        for daemon in ours:
            daemon.stop()
        reference.terminate()
        reference.wait(10)
    r = result.results
    if r.get("mount") == "failed" or f"r{rounds - 1}pmeta" not in r:
        raise SystemExit(f"guest run failed:\n{result.console[-3000:]}")
    return [{LABELS[t]: _figures(r, f"r{n}{t}", files) for t in keys} for n in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="files of the metadata test")
    parser.add_argument("--time", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds (each: every workload on both back-ends)")
    parser.add_argument("--baseline", type=Path,
                        help="a src/ folder of another pyvirtio (before a change): served "
                        "too, on a third share, and compared with this tree")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("virtiofsd -o sandbox=chroot needs root")
    kit = GuestKit.ensure()
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fsbench-") as tmp:
        rounds = _run(kit, Path(tmp), args.files, args.time, args.repeat,
                      baseline=args.baseline)
    for n, row in enumerate(rounds):
        for label in row:
            print(f"round {n + 1} {label}: " + ", ".join(
                f"{k} {v:,.0f}" for k, v in row[label].items()), flush=True)
    names = [f"{m} (ops/s)" for m in META] + [name for name, _, _ in FIO_JOBS]
    keys = META + [name for name, _, _ in FIO_JOBS]
    base = "baseline" in rounds[0]
    print(f"\n{'workload':<26} {'virtiofsd':>10} {'pyvirtio':>10} {'ratio':>7}  per round"
          + ("   | baseline  ratio pyvirtio/baseline, per round" if base else ""))
    summary = []
    for label, key in zip(names, keys, strict=True):
        c = statistics.median(r["virtiofsd"][key] for r in rounds)
        p = statistics.median(r["pyvirtio"][key] for r in rounds)
        ratios = [r["pyvirtio"][key] / r["virtiofsd"][key] if r["virtiofsd"][key] else 0.0
                  for r in rounds]
        line = (f"{label:<26} {c:>10,.1f} {p:>10,.1f} {statistics.median(ratios):>7.0%}  "
                + " ".join(f"{x:.0%}" for x in ratios))
        entry: dict[str, object] = {"workload": label, "virtiofsd": c, "pyvirtio": p,
                                    "ratios": ratios}
        if base:
            b = statistics.median(r["baseline"][key] for r in rounds)
            gains = [r["pyvirtio"][key] / r["baseline"][key] if r["baseline"][key] else 0.0
                     for r in rounds]
            line += (f"   | {b:>9,.1f} {statistics.median(gains):>6.0%}  "
                     + " ".join(f"{x:.0%}" for x in gains))
            entry.update(baseline=b, gains=gains)
        print(line, flush=True)
        summary.append(entry)
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
