# pyvirtio — set-up, demo and tests.  `make demo` and `make test` work on a fresh
# machine: they create the virtualenv, install QEMU and friends with apt-get (as root)
# and download the Debian guest kernel into ~/.cache/pyvirtio on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup guest-assets demo test lint unit e2e bench clean fuzz bench-net

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# QEMU, busybox, e2fsprogs... and the guest kernel (cached between runs).
guest-assets: $(STAMP)
	$(BIN)/python -m pyvirtio.guestkit

demo: guest-assets
	$(BIN)/python -m pyvirtio.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools examples
	$(BIN)/mypy src tests benchmarks tools examples

unit: $(STAMP)
	$(BIN)/pytest tests/unit

e2e: guest-assets
	$(BIN)/pytest tests/e2e

test: guest-assets lint
	$(BIN)/pytest tests

clean:
	rm -rf $(VENV) build dist demo-out src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis

# pyvirtio vs qemu-storage-daemon, driven from a Python front-end and from fio in a guest.
bench: guest-assets
	$(BIN)/python benchmarks/compare_blk.py

# Long fuzzing run (tests/fuzz, profile "fuzz"): each target for FUZZ_SECONDS seconds,
# failing inputs kept in .hypothesis/ (see tests/fuzz/conftest.py).
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest tests/fuzz --hypothesis-show-statistics

# virtio-net (issue #6): frames/s through two pyvirtio ports on a switch, driven by a
# Python front-end and by DPDK testpmd (apt-get install dpdk-dev), and TCP between two
# guests. See docs/benchmarks.md, "virtio-net".
bench-net: guest-assets
	$(BIN)/python benchmarks/net_bench.py
