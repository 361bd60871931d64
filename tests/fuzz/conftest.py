"""Shared machinery of the fuzz targets: profiles, the seed corpus, execution counts.

Each target is one pytest test built by :func:`fuzz_target` from a hypothesis strategy
of *cases* (frozen dataclasses of plain data) and a body that runs one case and checks
the target's invariants.  The invariant common to all: only pyvirtio's own errors
(:class:`~pyvirtio.errors.PyVirtioError`) may escape the code under test.

Profiles (environment variable ``HYPOTHESIS_PROFILE``):

``fuzz-quick`` (the default, what ``make test`` runs)
    A fixed number of examples per target, derandomized: the same examples on every
    run, so the normal suite stays fast and deterministic.
``fuzz`` (``make fuzz``)
    Random examples in rounds of :data:`ROUND_EXAMPLES` until ``FUZZ_SECONDS``
    (default 300) have passed for each target.  Failing examples are saved in
    hypothesis' database under ``.hypothesis/examples`` and replayed first next time.

The seed corpus: every ``tests/fuzz/corpus/<target>/*.json`` file holds one case
(``{"note": ..., "case": ...}``).  Each is replayed as an explicit ``@example`` before
anything is generated, in both profiles.  When a case fails, its JSON is written to
``.hypothesis/fuzz-failures/<target>.json`` (the last write is the shrunk example)
and shown in the failure report: copy it into the corpus once the bug is fixed.

At the end of the session the number of examples each target executed is printed
(and written to ``.hypothesis/fuzz-stats.json``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

# The unit tests' in-process front-end, for the regression tests (test_regressions.py).
from ..unit.conftest import make_frontend, make_guest  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
HYPOTHESIS_DIR = ROOT / ".hypothesis"
FAILURES = HYPOTHESIS_DIR / "fuzz-failures"
STATS_FILE = HYPOTHESIS_DIR / "fuzz-stats.json"

#: Examples per round of the long run; each round starts from a fresh random seed.
ROUND_EXAMPLES = 2000
_SUPPRESSED = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]

settings.register_profile(
    "fuzz-quick",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "fuzz",
    deadline=None,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(HYPOTHESIS_DIR / "examples"),
    max_examples=ROUND_EXAMPLES,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)

PROFILE = "fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "fuzz-quick"
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "300"))


@dataclasses.dataclass
class TargetStats:
    """What one target did in this session."""

    executions: int = 0
    failures: int = 0
    rounds: int = 0
    seconds: float = 0.0
    corpus: int = 0


STATS: dict[str, TargetStats] = {}

C = TypeVar("C")


# -- cases as JSON ------------------------------------------------------------------------------


def to_json(obj: object) -> object:
    """A case (nested frozen dataclasses of ints, bools, bytes, tuples) as JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, object] = {"$type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = to_json(getattr(obj, f.name))
        return out
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    if isinstance(obj, tuple | list):
        return [to_json(item) for item in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    raise TypeError(f"cannot store {obj!r} in the corpus")


def from_json(data: object, types: Mapping[str, type]) -> object:
    """The inverse of :func:`to_json`; lists come back as tuples."""
    if isinstance(data, dict):
        if set(data) == {"hex"}:
            return bytes.fromhex(data["hex"])
        cls = types[data["$type"]]
        return cls(**{k: from_json(v, types) for k, v in data.items() if k != "$type"})
    if isinstance(data, list):
        return tuple(from_json(item, types) for item in data)
    return data


def load_corpus(target: str, types: Iterable[type]) -> list[tuple[str, object]]:
    """The seed cases of ``target``, by file name."""
    registry = {cls.__name__: cls for cls in types}
    cases = []
    for path in sorted((CORPUS / target).glob("*.json")):
        cases.append((path.name, from_json(json.loads(path.read_text())["case"], registry)))
    return cases


# -- targets -------------------------------------------------------------------------------------


def fuzz_target(
    target: str,
    cases: st.SearchStrategy[C],
    *,
    types: Iterable[type],
    quick_examples: int,
) -> Callable[[Callable[[C], None]], Callable[[], None]]:
    """Turn ``body(case)`` into a pytest test fuzzing ``target`` under the active profile.

    ``types`` are the dataclasses a case is made of (to read the corpus back);
    ``quick_examples`` is how many generated examples the ``fuzz-quick`` run executes.
    """
    stats = STATS.setdefault(target, TargetStats())

    def decorate(body: Callable[[C], None]) -> Callable[[], None]:
        def run_one(case: C) -> None:
            stats.executions += 1
            try:
                with quiet_pyvirtio() as tracebacks:
                    body(case)
                assert not tracebacks.records, f"pyvirtio logged tracebacks: {tracebacks.records}"
            except BaseException:
                stats.failures += 1
                text = json.dumps({"note": "", "case": to_json(case)})
                FAILURES.mkdir(parents=True, exist_ok=True)
                (FAILURES / f"{target}.json").write_text(text + "\n")
                note(f"case as corpus JSON (also in .hypothesis/fuzz-failures/{target}.json):")
                note(text)
                raise

        run_one.__name__ = body.__name__
        run_one.__qualname__ = body.__qualname__
        test = given(case=cases)(run_one)
        corpus = load_corpus(target, types)
        stats.corpus = len(corpus)
        for name, case in reversed(corpus):  # hypothesis runs explicit examples last-first
            test = example(case=case).via(f"corpus {target}/{name}")(test)
        if PROFILE == "fuzz":
            test = settings(settings.get_profile("fuzz"))(test)
        else:
            test = settings(settings.get_profile("fuzz-quick"), max_examples=quick_examples)(
                test
            )

        def run() -> None:
            start = time.monotonic()
            try:
                while True:
                    stats.rounds += 1
                    test()
                    if PROFILE != "fuzz" or time.monotonic() - start >= FUZZ_SECONDS:
                        break
            finally:
                stats.seconds += time.monotonic() - start

        run.__name__ = body.__name__
        run.__qualname__ = body.__qualname__
        run.__doc__ = body.__doc__
        run.__module__ = body.__module__
        # Let hypothesis' pytest plugin treat ``run`` as the test it wraps, so that
        # ``--hypothesis-show-statistics`` reports it (the last round, in the long run).
        run.__dict__.update(
            is_hypothesis_test=True,
            _hypothesis_internal_use_settings=vars(test)["_hypothesis_internal_use_settings"],
        )
        return run

    return decorate


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how many examples every target executed."""
    ran = {name: s for name, s in STATS.items() if s.executions}
    if not ran:
        return
    terminalreporter.section(f"fuzz targets (profile {PROFILE})")
    for name, s in ran.items():
        rate = s.executions / s.seconds if s.seconds else 0.0
        terminalreporter.write_line(
            f"{name}: {s.executions} executions in {s.seconds:.1f} s ({rate:.0f}/s), "
            f"{s.rounds} round(s), {s.corpus} corpus case(s), {s.failures} failing execution(s)"
        )
    total = sum(s.executions for s in ran.values())
    terminalreporter.write_line(f"total: {total} executions")
    HYPOTHESIS_DIR.mkdir(exist_ok=True)
    STATS_FILE.write_text(
        json.dumps(
            {"profile": PROFILE, "targets": {n: dataclasses.asdict(s) for n, s in ran.items()}},
            indent=2,
        )
        + "\n"
    )


# -- helpers -------------------------------------------------------------------------------------


class Tracebacks(logging.Handler):
    """Collects log records that carry an exception: a bug that got caught and logged
    (a device whose ``handle_chain`` raised, say) instead of answered."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Only text: a kept traceback would keep its frames' guest-memory views, and
        # so the mappings (and the fds mmap holds), alive.
        if record.exc_info:
            self.records.append(f"{record.getMessage()} ({record.exc_info[1]!r})")


@contextlib.contextmanager
def quiet_pyvirtio() -> Iterator[Tracebacks]:
    """Keep pyvirtio's (expected, abundant) error logs out of the report and of
    pytest's log capture, which would grow for the whole long run; keep tracebacks."""
    logger = logging.getLogger("pyvirtio")
    handler = Tracebacks()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def address_of(view: memoryview) -> int:
    """The host address of a non-empty writable view's first byte.

    The ctypes object that exports the buffer is dropped at once, so the view can be
    released afterwards (guest memory releases its region views on unmap).
    """
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def open_fds() -> set[str]:
    """The file descriptors this process has open now."""
    return set(os.listdir("/proc/self/fd"))
