"""The error tree: one module defines every exception class, and its docstring draws them.

Style guide, "Errors": one root exception type, precise subclasses that carry
context.  Issue #11: every exception class lives in :mod:`pyvirtio.errors`, under
:class:`~pyvirtio.errors.PeerError` (the other side broke a rule) or
:class:`~pyvirtio.errors.HostError` (this machine or its configuration), and the
module docstring's diagram is the tree, kept true by these tests.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from types import ModuleType

import pytest

import pyvirtio
from pyvirtio import errors
from pyvirtio.frontend.connection import GuestRam

#: Exception classes still defined outside pyvirtio.errors, because their module's
#: owner has not yet swapped the definition for an import.  Each entry is
#: "module.Class"; remove it together with the definition (the test below fails
#: while an entry is no longer needed, so the list cannot go stale).
PENDING_MOVES: frozenset[str] = frozenset()


def _modules() -> list[ModuleType]:
    """Every module of the pyvirtio package, imported."""
    modules = [pyvirtio]
    for info in pkgutil.walk_packages(pyvirtio.__path__, prefix="pyvirtio."):
        modules.append(importlib.import_module(info.name))
    return modules


def _exception_classes(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes *module* defines (not those it imports), nested ones included."""
    found: list[type[BaseException]] = []
    pending: list[object] = list(vars(module).values())
    while pending:
        obj = pending.pop()
        if not inspect.isclass(obj) or obj.__module__ != module.__name__:
            continue
        if issubclass(obj, BaseException):
            found.append(obj)
        pending.extend(value for name, value in vars(obj).items() if not name.startswith("__"))
    return found


def _errors_classes() -> dict[str, type[BaseException]]:
    return {cls.__name__: cls for cls in _exception_classes(errors)}


def test_every_exception_class_is_defined_in_pyvirtio_errors() -> None:
    outside = {
        f"{module.__name__}.{cls.__qualname__}"
        for module in _modules()
        if module is not errors
        for cls in _exception_classes(module)
    }
    assert outside - PENDING_MOVES == set(), (
        "define these in pyvirtio.errors (and draw them in its docstring's tree)"
    )
    assert PENDING_MOVES - outside == set(), (
        "moved to pyvirtio.errors now: remove these from PENDING_MOVES"
    )


def test_every_error_derives_from_the_root_and_is_either_peer_or_host() -> None:
    for name, cls in _errors_classes().items():
        if cls is errors.Terminated:  # not an error: unwinds like KeyboardInterrupt
            assert not issubclass(cls, Exception)
            continue
        assert issubclass(cls, errors.PyVirtioError), name
        if cls in (errors.PyVirtioError, errors.PeerError, errors.HostError):
            continue
        assert issubclass(cls, errors.PeerError) != issubclass(cls, errors.HostError), name


def test_all_lists_every_class() -> None:
    assert set(errors.__all__) == set(_errors_classes())
    assert errors.__all__ == sorted(errors.__all__)


# -- the docstring's diagram ---------------------------------------------------------------

_INDENT = "    "
_STEP = 5  # " +-- " at depth 1, " |    +-- " at depth 2...
_NODE = re.compile(r"(?P<name>[A-Za-z_]\w*)(?: \((?P<bases>\w+(?:, \w+)*)\))?(?: {2,}\S.*)?")


@dataclass(frozen=True)
class _Node:
    name: str
    depth: int
    extra_bases: tuple[str, ...]
    line: str


def _tree_block(doc: str) -> list[str]:
    """The literal block that starts with the root of the tree."""
    lines = doc.splitlines()
    for start, line in enumerate(lines):
        if line.startswith(f"{_INDENT}PyVirtioError") and lines[start - 1] == "":
            break
    else:
        raise AssertionError("no literal block starting with PyVirtioError in the docstring")
    block = []
    for line in lines[start:]:
        if line and not line.startswith(_INDENT):
            break
        block.append(line)
    while block and not block[-1]:
        block.pop()
    return block


def _parse_tree(doc: str) -> list[_Node]:
    nodes = []
    for line in _tree_block(doc):
        body = line[len(_INDENT):]
        if "+-- " in body:
            column = body.index("+-- ")
            assert (column - 1) % _STEP == 0, f"misaligned: {line!r}"
            assert set(body[:column]) <= {" ", "|"}, f"malformed: {line!r}"
            depth, rest = (column - 1) // _STEP + 1, body[column + 4:]
        elif body[:1].isalpha():
            depth, rest = 0, body
        else:
            assert set(body.split("   ")[0]) <= {" ", "|"}, f"malformed: {line!r}"
            continue  # a comment line ("|   packed-only rules")
        match = _NODE.fullmatch(rest)
        assert match, f"cannot parse {line!r}: NAME [(BASE, ...)] [  description]"
        bases = tuple(match["bases"].split(", ")) if match["bases"] else ()
        nodes.append(_Node(match["name"], depth, bases, line))
    return nodes


def _resolve(name: str) -> type[BaseException]:
    cls = vars(errors).get(name, vars(builtins).get(name))
    assert isinstance(cls, type) and issubclass(cls, BaseException), (
        f"{name} is no exception class of pyvirtio.errors or builtins")
    return cls


def test_docstring_tree_names_every_class_once() -> None:
    assert errors.__doc__ is not None
    drawn = [node.name for node in _parse_tree(errors.__doc__)]
    assert sorted(drawn) == sorted(set(drawn)), "a class drawn twice"
    assert set(drawn) == set(_errors_classes())


def test_docstring_tree_matches_the_base_classes() -> None:
    assert errors.__doc__ is not None
    path: list[str] = []  # the nodes above the current line
    for node in _parse_tree(errors.__doc__):
        assert node.depth <= len(path), f"a level skipped at {node.line!r}"
        del path[node.depth:]
        drawn = tuple(_resolve(name) for name in (*path[-1:], *node.extra_bases))
        assert _resolve(node.name).__bases__ == drawn, node.line
        path.append(node.name)


def test_the_parser_sees_a_wrong_drawing() -> None:
    """The tree test would catch a class drawn under the wrong parent."""
    doc = (
        "Tree::\n\n"
        "    PyVirtioError (Exception)\n"
        "     +-- HostError\n"
        "     |    +-- BlkError      drawn under HostError, but a PeerError\n"
    )
    nodes = _parse_tree(doc)
    assert [(n.name, n.depth) for n in nodes] == [
        ("PyVirtioError", 0), ("HostError", 1), ("BlkError", 2)]
    assert errors.BlkError.__bases__ != (errors.HostError,)


# -- the moved and new classes keep their contracts -----------------------------------------


def test_guest_ram_exhausted_is_a_host_error_with_its_sizes() -> None:
    ram = GuestRam(2 << 20)
    try:
        with pytest.raises(errors.GuestRamExhausted) as info:
            ram.alloc(4 << 20)
    finally:
        ram.close()
    assert isinstance(info.value, errors.HostError)
    assert (info.value.size, info.value.wanted) == (2 << 20, 4 << 20)
    assert "exhausted" in str(info.value)


def test_uplink_taken_is_also_an_oserror_ebusy() -> None:
    taken = errors.UplinkTaken("lab", "pid 7, tap t0")
    assert isinstance(taken, OSError) and isinstance(taken, errors.HostError)
    assert taken.errno == errno.EBUSY
    assert str(taken) == ("switch 'lab' already has a tap uplink (pid 7, tap t0); "
                          "a switch has one at most")


def test_guest_run_error_quotes_the_console_tail() -> None:
    console = "\n".join(f"line {n}" for n in range(100))
    error = errors.GuestTimeoutError("hung", console)
    assert isinstance(error, errors.GuestError) and isinstance(error, errors.HostError)
    tail = errors.GuestRunError.console_tail_lines
    assert str(error).endswith("\n".join(f"line {n}" for n in range(100 - tail, 100)))
    assert error.console == console


def test_terminated_escapes_except_exception() -> None:
    with pytest.raises(errors.Terminated):
        try:
            raise errors.Terminated(15)
        except Exception:  # what a clean-up path may catch: it must not stop the unwinding
            pytest.fail("Terminated was caught as an Exception")
