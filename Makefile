# Two commands matter: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

install: $(STAMP)

# Pinned CPU torch first: an unpinned torch would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo afresh each time: a finished earlier one is moved aside (never deleted); one whose
# job still holds its lease, or that crashed, is left for the run to resume or refuse.
run: install
	@if [ -e runs/local_cpu/summary.json ] && [ ! -e runs/local_cpu/lease.json ]; then \
		d=runs/local_cpu.$$(date +%Y%m%d-%H%M%S); mv runs/local_cpu $$d; \
		echo "make run: the previous demo is now $$d"; fi
	$(PY) -m coordinator run configs/local_cpu.yaml

test: install
	$(PY) -m pytest -v tests

# the unit tier, for the edit loop (under 2 minutes); `make test` stays what CI runs
test-fast: install
	$(PY) -m pytest -q -m unit tests

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) scripts/bench_overhead.py
	$(PY) scripts/bench_recovery.py --json
	$(PY) scripts/bench_checkpoint.py --json

clean:
	rm -rf runs .pytest_cache
