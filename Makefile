# Set-up and main jobs. `make quickstart` and `make test` work on a fresh machine: they create
# .venv when it is missing and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where the built-in datasets and caches go (kept inside the checkout by default).
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
export REGIONSPOT_CACHE ?= $(CURDIR)/.cache/regionspot

.PHONY: install quickstart test clean

$(STAMP): setup.py tools/install_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) bash tools/install_deps.sh
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) tools/quickstart.py --output-dir output/quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf output .cache .pytest_cache
