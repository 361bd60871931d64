"""Every command block of the README and of docs/ runs, as a reader would paste it.

The convention (docs/testing.md, "The docs are tested"):

- A fenced block tagged ``sh`` is a command block: this test runs it.
- Output, synopses and transcripts are in ``text`` blocks (or untagged ones), which are
  not run; a line starting with ``$ `` (a shell prompt) is refused in them, so that a
  command cannot hide there. Tags such as ``bash``, ``shell`` or ``console`` are refused.
- A command block that cannot run here has ``<!-- docs-test: skip: REASON -->`` on the
  line just before its fence; the reason must be given.

Each block runs with ``bash -e`` in a scratch folder of its own (also its ``TMPDIR`` and
``XDG_RUNTIME_DIR``, so that switch folders are private to the block), with the
virtualenv's ``bin`` first on ``PATH``: ``pyvirtio`` is ``.venv/bin/pyvirtio``. It runs
in a process group of its own, which is sent SIGTERM when bash exits (daemons started
with ``&`` stop there) and SIGKILL a few seconds later. A block fails if bash exits
non-zero or runs longer than :data:`BLOCK_TIMEOUT` seconds. Network namespaces a block
leaves behind are deleted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a block may run (the longest boot two guests under TCG).
BLOCK_TIMEOUT = 120.0
#: Seconds the block's processes get between SIGTERM and SIGKILL.
STOP_GRACE = 5.0

_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!-- docs-test: skip: (?P<reason>\S.*?) -->\s*$")
_REFUSED_TAGS = {"bash", "shell", "console", "zsh", "shell-session", "sh-session"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path``, their indentation removed."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent = len(opening["indent"])
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not re.match(r"^ *```\s*$", lines[index]):
            line = lines[index]
            body.append(line[indent:] if line[:indent] == " " * indent else line.lstrip())
            index += 1
        if index == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        skip = _SKIP.match(previous)
        blocks.append(Block(path, start + 1, opening["info"].strip(), "\n".join(body) + "\n",
                            skip["reason"] if skip else None))
        index += 1
    return blocks


def _all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in fenced_blocks(path)]


def _command_blocks() -> list[Block]:
    return [block for block in _all_blocks() if block.info == "sh"]


def test_commands_are_in_sh_blocks_and_skips_say_why() -> None:
    problems = []
    for block in _all_blocks():
        tag = block.info.split()[0] if block.info else ""
        if tag in _REFUSED_TAGS:
            problems.append(f"{block.name}: tag {tag!r}: use sh (run) or text (not run)")
        if tag != "sh":
            if block.skip_reason is not None:
                problems.append(f"{block.name}: a skip marker on a block that is not run")
            prompts = [line for line in block.text.splitlines() if line.startswith("$ ")]
            if prompts:
                problems.append(f"{block.name}: a command in a {tag or 'untagged'} block "
                                f"({prompts[0]!r}): put it in an sh block")
    assert not problems, "\n".join(problems)
    assert len(_command_blocks()) >= 20


def test_skipped_blocks_are_few() -> None:
    blocks = _command_blocks()
    skipped = [block for block in blocks if block.skip_reason is not None]
    assert len(skipped) * 4 <= len(blocks), [block.name for block in skipped]


@pytest.fixture(scope="module")
def venv_bin() -> Path:
    """The virtualenv's bin folder (where ``pyvirtio`` is), with QEMU and the kernel ready."""
    GuestKit.ensure()
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "pyvirtio").exists(), f"no pyvirtio in {bin_dir}"
    return bin_dir


def _netns() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def _stop_group(pgid: int) -> None:
    """SIGTERM the block's process group, then SIGKILL what is left after a grace."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.mark.parametrize("block", _command_blocks(), ids=lambda block: block.name)
def test_command_block_runs(block: Block, tmp_path: Path, venv_bin: Path) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"docs say: {block.skip_reason}")
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["TMPDIR"] = str(tmp_path)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    env.pop("VIRTUAL_ENV", None)
    script = tmp_path / "block.sh"
    script.write_text(block.text)
    output = tmp_path / "block.out"
    namespaces = _netns()
    started = time.monotonic()
    with open(output, "wb") as out:
        process = subprocess.Popen(["bash", "-e", str(script)], cwd=tmp_path, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status: int | None = process.wait(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        _stop_group(process.pid)
        process.wait()
        for name in _netns() - namespaces:
            subprocess.run(["ip", "netns", "delete", name], check=False)
    seconds = time.monotonic() - started
    text = output.read_text(errors="replace")
    print(f"{block.name}: exit {status} in {seconds:.1f} s\n{text[-4000:]}")
    assert status is not None, f"{block.name}: still running after {BLOCK_TIMEOUT:.0f} s"
    assert status == 0, f"{block.name}: bash exited {status}:\n{block.text}\n---\n{text[-4000:]}"
