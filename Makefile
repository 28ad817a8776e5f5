# Two entry points: `make demo` and `make test`. Each creates .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs venv bench-quick clean system-deps

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch lies on disk; installing it first keeps pip from fetching CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	# bench: cornac, the reference recommenders (tests/recsys/test_references.py checks our EASE against it).
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/gplr demo

# System packages the tests use (Debian's prometheus: promtool + server for tests/deploy).
system-deps:
	sh deploy/system-deps.sh

# The gate: lint + import order (ruff), types (mypy, strict on core/; pyproject.toml), and the
# generated settings tables of docs/operations.md. `make test` runs it first, so CI fails on it.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m streams.config_docs

# Regenerate the settings tables of docs/operations.md from the declarations in the code.
docs: $(STAMP)
	$(BIN)/python -m streams.config_docs --write

test: $(STAMP) system-deps lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Every benchmark in its quick mode; each prints one JSON object as its last line.
bench-quick: $(STAMP)
	for b in affinity labels stream stream_quality sampling_bias recsys segmentation; do \
		HF_HUB_OFFLINE=1 $(BIN)/python bench/$$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
