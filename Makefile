# MedFinder Node — fresh-machine entry points (see README):
#   make setup   idempotent: apt packages the project needs, .venv/ with the project installed
#   make run     the main job on embedded defaults
#   make test    the test suite
#   make bench   the benchmarks (figures printed)
#   make bundle  the reference model bundle: trains like `make run` unless done, exports, installs, activates

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfinder-installed
APT_STAMP := $(VENV)/.medfinder-apt
# Debian packages: none are needed by the trainer yet; later services add theirs here.
APT_PACKAGES ?=
RUN_DIR ?= runs/synthetic-cpu

.PHONY: setup apt run test bench bundle clean

setup: $(STAMP)

apt: $(APT_STAMP)

$(APT_STAMP):
	@if [ -n "$(APT_PACKAGES)" ]; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  fi; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(APT_STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	@touch $@

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/medfinder train --config synthetic-cpu --out $(RUN_DIR) --evaluate

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks

bundle: setup
	HF_HUB_OFFLINE=1 $(BIN)/medfinder bundle reference --run-dir $(RUN_DIR)

clean:
	rm -rf runs .pytest_cache
