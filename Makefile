# Each target bootstraps .venv on first use (python3 -m venv + pip install -e '.[dev]') and reuses it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: demo test lab notebooks bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## fresh demo database + the whole runbook on it, archived under runs/local/
	$(BIN)/runbook demo --env local

test: $(STAMP)  ## pytest against real PostgreSQL (three workers), then nbval
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder tests
	RUNBOOK_ENV=ci $(BIN)/pytest -q $(NBVAL) notebooks

# Jupyter refuses to start as root ("Running as root is not recommended. Use --allow-root to bypass."): CI and
# containers often are root, so there the flag is added
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)  ## open the notebooks in JupyterLab (env from RUNBOOK_ENV, default local)
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks

notebooks: $(STAMP)  ## re-execute the committed notebooks on a fresh ci demo database
	$(BIN)/runbook notebooks --env ci

bench: $(STAMP)  ## benchmarks (never part of make test)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV)
