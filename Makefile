# Each target bootstraps .venv on first use from the lock, requirements/lock.txt (every Python package, runtime and
# dev, pinned with its hashes), and reuses it until the lock or pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOCK := requirements/lock.txt
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: demo test test-matrix test-citus lab notebooks bench lock clean

# Plain pip installs the lock: the venv's bundled pip checks every file against its hashes and installs the locked pip,
# setuptools and wheel with the rest; that pip then installs the project itself, in a call of its own (an editable
# install has no hash), without dependencies (the lock has them all) and with the locked setuptools as the build
# backend (--no-build-isolation: nothing unpinned is fetched). --clear: the venv holds the lock and nothing left
# from an earlier one (tests/test_packaging.py checks). The lock installs on any CPython 3.11+.
$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)  ## fresh demo database + the whole runbook on it, archived under runs/local/
	$(BIN)/runbook demo --env local

test: $(STAMP)  ## pytest against real PostgreSQL (three workers), then nbval
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not matrix" --ignore=tests/citus tests
	RUNBOOK_ENV=ci $(BIN)/pytest -q $(NBVAL) notebooks

# The whole matrix, too long for make test's 15 minutes (CI runs it after make test): every step of every phase
# killed in-process and resumed (make test: one step of each kind), 07_distribute's on the Citus cluster too
# (make test-citus: one of each kind), a real SIGKILL after one step of each kind (make
# test: six), and the runner's start-up 200 times in parallel. Test by test across the workers (--dist load).
MATRIX := tests/test_steps_killed.py tests/test_faults.py::test_killed_right_after_a_step_then_rerun_completes \
	tests/test_runner_startup.py tests/citus/test_steps_killed_citus.py
test-matrix: $(STAMP)  ## every step killed and resumed (Citus's too), a SIGKILL after every kind of step, 200 start-ups
	RUNBOOK_STEPS=all $(BIN)/pytest -q -n 3 --dist load $(MATRIX)

# On a real Citus cluster (tests/citus/): Citus 13.0.5 built once per machine from ../shared/peers/ against Debian's
# PostgreSQL 15 (tests/citus/build.sh; .ci/run installs what the build needs), a coordinator and two workers on
# 127.0.0.1 started by the suite in .runbook/citus-*/. Without Citus the suite skips, saying how to get it (under CI
# it fails).
test-citus: $(STAMP)  ## 07_distribute, validate and the application on a real Citus cluster
	$(BIN)/pytest -q -n 2 --dist loadfile tests/citus

# Jupyter refuses to start as root ("Running as root is not recommended. Use --allow-root to bypass."): CI and
# containers often are root, so there the flag is added
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)  ## open the notebooks in JupyterLab (env from RUNBOOK_ENV, default local)
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks

notebooks: $(STAMP)  ## re-execute the committed notebooks on a fresh ci demo database
	$(BIN)/runbook notebooks --env ci

bench: $(STAMP)  ## benchmarks (never part of make test)
	$(BIN)/python -m bench

# The lock is pip-tools' compiled requirements, so that installing it needs nothing but the pip every Python has
# (uv's lock would need uv fetched first). pip-compile runs from a throwaway venv (build/pip-tools), never from .venv,
# which holds exactly the lock. After a change to pyproject.toml it keeps every pin that still fits and resolves
# the rest; UPGRADE=1 re-resolves everything to the newest releases. It resolves against PyPI alone (no pip config
# file, no find-links: a machine's local wheels and extra indexes must not reach the lock) and for the Python that
# runs it: run it with a 3.11 (PYTHON=python3.11), the oldest the project supports. requirements/bootstrap.in adds
# pip, setuptools and wheel, the tools that install the project; requirements/constraints.txt caps the packages whose
# newer releases exclude an older 3.11 (their Requires-Python), so that the lock installs on any CPython 3.11.
lock:
	rm -rf build/pip-tools
	$(PYTHON) -m venv build/pip-tools
	build/pip-tools/bin/python -m pip install --quiet 'pip-tools>=7.4'
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
	  CUSTOM_COMPILE_COMMAND='make lock' build/pip-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --strip-extras --extra dev --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
	  --constraint requirements/constraints.txt --output-file $(LOCK) pyproject.toml requirements/bootstrap.in
	rm -rf build/pip-tools

clean:
	rm -rf $(VENV)
