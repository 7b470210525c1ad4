# `make demo` and `make test` work on a fresh machine: each creates (or reuses) .venv and installs
# the project into it. torch is installed first, pinned to the CPU wheel; a torch already in .venv
# that fits the project's range is kept.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
# `make bench` runs every benchmark in bench/ at the sizes the README's figures use; each prints one JSON
# line. Smaller runs: make bench BENCH_SHARD_ARGS="--images 2000"; the 7B conversion (~45 GB of disk):
# make bench BENCH_CONVERT_ARGS="--model 7b"; keep the pipeline bench's 558K synthetic set:
# make bench BENCH_PIPELINE_ARGS="--cache-dir bench-cache".
BENCH_SHARD_ARGS ?=
BENCH_CONVERT_ARGS ?=
BENCH_LIBRARIES_ARGS ?=
BENCH_PIPELINE_ARGS ?=

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/neva demo --workdir demo-run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/shard.py $(BENCH_SHARD_ARGS)
	$(BIN)/python bench/convert.py $(BENCH_CONVERT_ARGS)
	$(BIN)/python bench/libraries.py $(BENCH_LIBRARIES_ARGS)
	$(BIN)/python bench/pipeline.py $(BENCH_PIPELINE_ARGS)

clean:
	rm -rf demo-run .pytest_cache
