# `make demo` and `make test` do all set-up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Read-only corpora and tokenizer files; prepared datasets go to the cache.
export DIFFUSION_TEXT_DATA  ?= $(abspath ../shared/data)
export DIFFUSION_TEXT_CACHE ?= $(abspath .cache)

.PHONY: venv demo demo-all test test-slow bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV) and installing pinned dependencies (about 30 s)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

demo: venv
	$(PY) -m diffusion_text.demo --out demo_out

demo-all: venv
	$(PY) -m diffusion_text.demo --out demo_out_all --all

# Test files run on $(TEST_WORKERS) processes (pytest-xdist), each file on
# one of them so its module fixtures compile once.
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) -m benchmarks.run --out benchmarks/results.json

clean:
	rm -rf $(VENV) .cache demo_out demo_out_all
