"""Every relative link in README.md and docs/ leads to a file that exists, and its
``#anchor`` to a heading of that file (GitHub's anchors: lower case, punctuation
dropped, spaces turned into hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: ``[text](target)``, not images; the target up to the first space or ``)``.
_LINK = re.compile(r"(?<!!)\[(?:[^\]]|\n)*?\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*```")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(path: Path) -> str:
    """The file without its fenced code blocks."""
    kept, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path).splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        base = anchor(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def test_anchor_follows_github() -> None:
    assert anchor("Link down and up (`pyvirtio link SOCKET [up|down]`)") == (
        "link-down-and-up-pyvirtio-link-socket-updown")
    assert anchor("The switch's tap uplink (`--switch NAME --tap TAP`)") == (
        "the-switchs-tap-uplink---switch-name---tap-tap")


def test_relative_links_resolve() -> None:
    broken = []
    checked = 0
    for path in _doc_files():
        for target in _LINK.findall(_prose(path)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            checked += 1
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif fragment and (linked.suffix != ".md" or fragment not in _anchors(linked)):
                broken.append(f"{where}: no heading #{fragment}")
    assert checked >= 30
    assert not broken, "\n".join(broken)
