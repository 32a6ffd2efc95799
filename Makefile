# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
GPU ?= 0
PYTEST_ARGS ?=

ifeq ($(GPU),1)
TORCH_PKGS := torch==2.13.0 fbgemm-gpu==1.8.0
else
TORCH_PKGS := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
endif

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PKGS)
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -e '.[ray,dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/torchrec-prune demo $(DEMO_ARGS)
	$(VENV)/bin/torchrec-prune ray-train --schedule alternate --trainers 2 --servers 2 --rows 20000 \
		--increment-rows 5000 --window 2000 --no-progress --run-dir runs/demo/ray

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Performance suite: each script is one command; results land in docs/results/perf_*.json (see
# docs/performance.md). Timings are CPU and wall time of interleaved arms, one intra-op thread.
BENCH_SCRIPTS := perf_trainer perf_dmp perf_structured perf_masks denormals perf_pruners perf_grow_prune

bench: install
	for script in $(BENCH_SCRIPTS); do $(PY) benchmarks/$$script.py || exit 1; done

lint: install
	$(VENV)/bin/ruff check torchrec_prune launch tests benchmarks

clean:
	rm -rf $(VENV) runs
