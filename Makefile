# `make test` and `make demo` work on a fresh Debian machine: they install what is missing
# (system packages, the virtualenv with lhfs in editable mode) and are quick when it is there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_STAMP := .stamp-system

.PHONY: setup test soak demo lint bench clean

# The virtualenv holds lhfs in editable mode, so nothing compiles its modules ahead, and an
# interpreter told not to write bytecode (PYTHONDONTWRITEBYTECODE) compiles them again at every
# command: a sixth of a small backup's time. They are compiled here (only what changed).
setup: $(SYSTEM_STAMP) $(VENV)/.installed
	$(BIN)/python -m compileall -q lhfs backupstore tools

$(SYSTEM_STAMP): tools/setup-system.sh
	tools/setup-system.sh
	touch $@

$(VENV)/.installed: pyproject.toml $(SYSTEM_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite in two processes, a test file each at a time: most of its time is spent waiting
# (for timeouts, kills, rebuilds), so two halve it on two cores (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: setup lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# Hundreds of kills through the data path (LHFS_SOAK_ROUNDS, default 200; about 10 minutes).
soak: setup
	$(BIN)/pytest -m soak -s

demo: setup
	$(BIN)/python -m tools.demo

bench: setup
	$(BIN)/python bench/replica_bench.py

clean:
	rm -rf $(VENV) $(SYSTEM_STAMP) .pytest_cache .ruff_cache .hypothesis
