# tgnstream: the two entry points of the README, plus helpers. Each target creates or reuses
# the virtualenv and installs what it needs (torch 2.13.0 first when no torch is present).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/datasets/wikipedia.csv
OUT ?= runs/wikipedia
EPOCHS ?= 5
TRAIN_ARGS ?=

.PHONY: install demo train test test-tools test-faults test-all wheel-check image-test constraints bench bench-train bench-quality bench-large-batch bench-continual bench-serve lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Main job: the whole loop live (broker, server, trainer, replay, queries) for DEMO_S seconds;
## summary.json and plots in runs/demo/<time>/.
DEMO_S ?= 120
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/tgnstream demo --data $(DATA) --duration-s $(DEMO_S) $(DEMO_ARGS)

## Offline training + evaluation on JODIE Wikipedia (results in $(OUT)/results.json).
train: install
	$(VENV)/bin/tgnstream train --data $(DATA) --out $(OUT) --epochs $(EPOCHS) $(TRAIN_ARGS)

## Debian tools the tests need: prometheus + promtool (tests/integration/test_prometheus.py), kcat
## (tests/integration/test_broker_clients.py: the Kafka CLI users reach for, against the embedded broker).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
test-tools:
	@command -v promtool >/dev/null && command -v kcat >/dev/null || { \
	  echo "installing Debian's prometheus and kcat packages (monitoring and broker-client tests)"; \
	  $(APT_INSTALL) prometheus kcat || { $(SUDO) apt-get update -q && $(APT_INSTALL) prometheus kcat; }; }

## Default test suite: fast unit + integration tests (no slow/gpu markers).
test: install test-tools
	$(PY) -m pytest -q

## Fault-injection suite: hostile input, broker loss, dead ingest, full disk... (README, "Faults").
test-faults: install
	$(PY) -m pytest -q -m faults tests/faults

## The installed package, not the checkout: build the wheel, install it into new virtualenvs as a
## non-root user (tested and freshly resolved dependencies) and run the compose loop from it.
wheel-check: install
	bash scripts/wheel_check.sh both

## Images for real (scripts/image_test.sh --help): the CPU image built with podman on a
## debootstrapped Debian bookworm base (no registry, no Docker daemon), and the compose loop run
## from it as uid 1000: broker, server, trainer, feeder; Score, TopK, swap, SIGTERM, exact
## restart, down/up. Needs root or sudo; ~6 min cold, ~3.5 min with its cache.
image-test: install
	bash scripts/image_test.sh

## Pin what the test virtualenv runs (constraints/tested.txt, used by wheel-check's tested set).
constraints: install
	{ echo "# The versions the test suite runs (make constraints: pip freeze of the test virtualenv)."; \
	  $(PY) -m pip freeze --exclude-editable --exclude tgnstream; } > constraints/tested.txt

test-all: install
	$(PY) -m pytest -q -m ""

## Benchmarks (benchmarks/README.md): each writes benchmarks/results/<name>.json with its provenance.
## BENCH_ARGS adds flags (e.g. BENCH_ARGS='--out /tmp/x.json'); TGNSTREAM_DATASETS names the datasets' folder.
BENCH_ARGS ?=
bench: bench-train
bench-train: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/train_offline.py --epochs 12 --threads 2 --no-progress --with-refold $(BENCH_ARGS)
bench-quality: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/quality.py --seeds 3 $(BENCH_ARGS)
bench-large-batch: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/large_batch.py --epochs 5 --threads 2 --no-progress --pipeline-batch 200 --pipeline-depths 1 2 $(BENCH_ARGS)
bench-continual: install
	$(PY) benchmarks/continual.py --datasets wikipedia --rate 1000 $(BENCH_ARGS)
bench-serve: install
	$(PY) benchmarks/serve.py --rounds 5 $(BENCH_ARGS)

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
