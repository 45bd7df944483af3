# cartrack-relay developer entry points. Everything runs from a local .venv that
# `make` creates on first use, so a fresh clone needs only Python 3.11+ and make.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cartrack-relay needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata or the C hot path changes (pip builds
# relay/_rows.c and relay/_sqlrun.c in place); -e keeps the venv on the working tree.
$(STAMP): $(BIN)/python setup.cfg setup.py pyproject.toml relay/_rows.c relay/_sqlrun.c
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## Run the relay's main job locally: relay + Cartrack stand-in + Frotcom simulator.
demo: $(STAMP)
	$(BIN)/cartrack-relay demo $(DEMO_ARGS)

## Lint, then the whole test suite (what CI runs through .ci/run).
test: $(STAMP)
	$(BIN)/ruff check relay tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check relay tests
	$(BIN)/ruff format --check relay tests

format: $(STAMP)
	$(BIN)/ruff format relay tests
	$(BIN)/ruff check --fix relay tests

clean:
	rm -rf $(VENV) build dist *.egg-info demo .pytest_cache .ruff_cache .hypothesis relay/*.so

.PHONY: bench
## Measure the relay against the machine's own limits (bench/README.md); several minutes.
## BENCH_QUICK=1 runs every bench at tiny sizes.
bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.forward
	$(BIN)/python -m bench.backlog
	$(BIN)/python -m bench.mixed
	$(BIN)/python -m bench.findings

.PHONY: soak
SOAK_KILLS ?= 200
SOAK_SEED  ?=
## Durability soak: SIGKILL the real daemon SOAK_KILLS times under load, then check that
## every acknowledged position reached the fake Cartrack (SOAK_SEED=... replays a run).
soak: $(STAMP)
	$(BIN)/python tests/crash_harness.py --kills $(SOAK_KILLS) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

## Install as a systemd service (as root): venv in /opt/cartrack-relay, unit, user,
## /etc/cartrack-relay/config.toml. Never overwrites config, API key or outbox.
## Settings (PREFIX, SYSCONFDIR, UNITDIR, DESTDIR): see systemd/install.sh.
.PHONY: install-service uninstall-service
install-service:
	PYTHON="$(PYTHON)" sh systemd/install.sh install

## Remove the venv and the unit; configuration and outbox stay.
uninstall-service:
	sh systemd/install.sh uninstall
