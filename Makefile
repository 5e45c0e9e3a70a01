# MedFinder Node — fresh-machine entry points (see README):
#   make setup   idempotent: apt packages the project needs, .venv/ with the project installed
#   make run     the DICOM node on embedded defaults, at once (builds the reference bundle in the background if none)
#   make train   the synthetic benchmark training + evaluation (the trainer's demo run)
#   make test    the test suite
#   make bench   the benchmarks (figures printed)
#   make bundle  the reference model bundle: trains like `make train` unless done, exports, installs, activates

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfinder-installed
APT_STAMP := $(VENV)/.medfinder-apt
# Debian packages: dcmtk (storescu/storescp/echoscu/findscu: real DICOM peers in tests and benchmarks), dicom3tools
# (dciodvfy validates every object we write), redis-server (distributed mode), docker-compose (validates the
# deployment file; no engine needed), orthanc + orthanc-python (the Orthanc integration's real peer), chromium +
# chromium-driver (headless browser tests of the pages).
APT_PACKAGES ?= dcmtk dicom3tools redis-server docker-compose orthanc orthanc-python chromium chromium-driver
RUN_DIR ?= runs/synthetic-cpu

.PHONY: setup apt run train test bench bundle clean

setup: $(STAMP)

apt: $(APT_STAMP)

$(APT_STAMP): Makefile
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

# The node on embedded defaults, listening at once. When no bundle is active the reference bundle is built in the
# background (once: ~15 min on 2 cores; log in $(RUN_DIR)/reference-bundle.log) and activated when done; until then
# the node receives and stores studies, queries answer 503, and it embeds what it holds as soon as the bundle is
# active. Stopping the node stops the build too (training resumes from its last checkpoint on the next make run).
# SERVE_ARGS adds flags, e.g. make run SERVE_ARGS="--allow-ae PACS@10.0.0.5:104 --quiet-seconds 5".
SERVE_ARGS ?=
run: setup
	@mkdir -p $(RUN_DIR)
	@HF_HUB_OFFLINE=1 $(BIN)/medfinder bundle reference --if-missing --run-dir $(RUN_DIR) \
	    > $(RUN_DIR)/reference-bundle.log 2>&1 & builder=$$!; \
	trap 'kill $$builder 2>/dev/null' EXIT INT TERM; \
	echo "reference bundle: building in the background if none is active (log: $(RUN_DIR)/reference-bundle.log)"; \
	HF_HUB_OFFLINE=1 $(BIN)/medfinder serve $(SERVE_ARGS)

train: setup
	HF_HUB_OFFLINE=1 $(BIN)/medfinder train --config synthetic-cpu --out $(RUN_DIR) --evaluate

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks

bundle: setup
	HF_HUB_OFFLINE=1 $(BIN)/medfinder bundle reference --run-dir $(RUN_DIR)

clean:
	rm -rf runs .pytest_cache
