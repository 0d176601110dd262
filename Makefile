# Two commands matter: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run run-fsdp run-hsdp run-tokens run-hf test test-fast bench clean

install: $(STAMP)

# Pinned CPU torch first: an unpinned torch would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

# The demo afresh each time: a finished earlier one is moved aside (never deleted); one whose
# job still holds its lease, or that crashed, is left for the run to resume or refuse.
fresh = if [ -e runs/$(1)/summary.json ] && [ ! -e runs/$(1)/lease.json ]; then \
		d=runs/$(1).$$(date +%Y%m%d-%H%M%S); mv runs/$(1) $$d; \
		echo "make: the previous demo is now $$d"; fi

run: install
	@$(call fresh,local_cpu)
	$(PY) -m coordinator run configs/local_cpu.yaml

# The same story with a sharded model (FSDP2): lost shards come back from peers' memory.
run-fsdp: install
	@$(call fresh,local_cpu_fsdp)
	$(PY) -m coordinator run configs/local_cpu_fsdp.yaml

# HSDP (2 shard groups of 2): a lost rank or node takes its shards from the other group.
run-hsdp: install
	@$(call fresh,local_cpu_hsdp)
	$(PY) -m coordinator run configs/local_cpu_hsdp.yaml

# The same on a real corpus: the project's docs as bytes (scripts/prepare_tokens.py).
run-tokens: install
	@test -e runs/corpus/docs.bin || $(PY) scripts/prepare_tokens.py runs/corpus/docs.bin \
		README.md docs/*.md
	@$(call fresh,tokens_cpu)
	$(PY) -m coordinator run configs/tokens_cpu.yaml

# A Hugging Face GPT-2 (small config) on the same corpus.
run-hf: install
	@test -e runs/corpus/docs.bin || $(PY) scripts/prepare_tokens.py runs/corpus/docs.bin \
		README.md docs/*.md
	@$(call fresh,hf_cpu)
	$(PY) -m coordinator run configs/hf_cpu.yaml

test: install
	$(PY) -m pytest -v --durations=25 tests

# the unit tier, for the edit loop (under 2 minutes); `make test` stays what CI runs
test-fast: install
	$(PY) -m pytest -q -m unit tests

# each benchmark's JSON goes to docs/bench/, and docs/benchmarks.md's tables are rebuilt from it
bench: install
	$(PY) -m pip install --quiet -e ".[dev,hf,bench]"
	mkdir -p docs/bench
	$(PY) scripts/bench_overhead.py > docs/bench/overhead.json.tmp && mv docs/bench/overhead.json.tmp docs/bench/overhead.json
	$(PY) scripts/bench_overhead.py --case prefetch > docs/bench/prefetch.json.tmp && mv docs/bench/prefetch.json.tmp docs/bench/prefetch.json
	$(PY) scripts/bench_recovery.py --json > docs/bench/recovery.json.tmp && mv docs/bench/recovery.json.tmp docs/bench/recovery.json
	$(PY) scripts/bench_checkpoint.py --json > docs/bench/checkpoint.json.tmp && mv docs/bench/checkpoint.json.tmp docs/bench/checkpoint.json
	$(PY) scripts/bench_overhead.py --parallelism fsdp > docs/bench/snapshots.json.tmp && mv docs/bench/snapshots.json.tmp docs/bench/snapshots.json
	$(PY) scripts/bench_recovery.py --parallelism fsdp --json > docs/bench/recovery_fsdp.json.tmp && mv docs/bench/recovery_fsdp.json.tmp docs/bench/recovery_fsdp.json
	$(PY) scripts/bench_recovery.py --parallelism hsdp --json > docs/bench/recovery_hsdp.json.tmp && mv docs/bench/recovery_hsdp.json.tmp docs/bench/recovery_hsdp.json
	$(PY) scripts/bench_scale.py --json --plot docs/bench/scale.png > docs/bench/scale.json.tmp && mv docs/bench/scale.json.tmp docs/bench/scale.json
	$(PY) scripts/bench_tables.py
	cat docs/bench/*.json

clean:
	rm -rf runs .pytest_cache
