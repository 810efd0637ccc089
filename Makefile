# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SRC    := $(wildcard rnnjax tests examples benchmarks docs)
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
DEMO_MINUTES ?= 3

MIN_VENV := .venv-min
MIN_PY   := $(MIN_VENV)/bin/python
# The tests run against the lowest declared versions of jax, flax and optax: quick, and torch-free.
MIN_TESTS ?= tests/test_losses.py tests/test_layers.py tests/test_interop.py tests/test_errors.py tests/test_data.py

.PHONY: demo test test-slow test-min test-dist typecheck lint format docs docs-serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[examples]"
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev,bench,examples,docs]"
	touch $@ $(STAMP_RUN)

# The flagship: the gradient-check table of every cell, then the character language model trained for a
# few minutes (samples printed as they improve), then the paths of its plot and samples.
demo: $(STAMP_RUN)
	$(PY) -m examples.gradcheck_table
	$(PY) -m examples.char_lm --minutes $(DEMO_MINUTES)

# The docstring examples run first, in their own process with JAX's default settings (the test suite's
# conftest turns on float64 and strict promotion for the whole process), with LLVM's kernel optimisation and
# the fusion emitters off as the suite's conftest sets them (they change compile time, no test's outcome); then
# the test suite.
test: $(STAMP_DEV)
	XLA_FLAGS="$$XLA_FLAGS --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" $(PY) -m pytest -q -p no:cacheprovider --doctest-modules rnnjax
	$(PY) -m pytest -n 2 --dist worksteal -q -m "not slow"

# The tests marked slow (device meshes in subprocesses, several processes, the benchmarks' smoke runs):
# CI runs them after `make test`.
test-slow: $(STAMP_DEV)
	$(PY) -m pytest -n 2 --dist worksteal -q -m slow

# A venv of its own with exactly the floors of pyproject's dependencies (each `>=` read as `==`), the test
# extra, and no torch; then a subset of the tests that reaches jax, flax (NNX, checkpoints) and optax.
$(MIN_VENV)/constraints.txt: pyproject.toml
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
		print("\n".join(d.replace(">=", "==") for d in deps))' > $@.tmp
	$(MIN_PY) -m pip install -q -c $@.tmp -e ".[test]"
	mv $@.tmp $@

test-min: $(MIN_VENV)/constraints.txt
	$(MIN_PY) -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|flax|optax) '
	$(MIN_PY) -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# python -m build makes the sdist and, from it, the wheel; the wheel installs into a fresh venv and runs.
test-dist: $(STAMP_DEV)
	RNNJAX_TEST_DIST=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_dist.py

# pyright (basic mode, [tool.pyright] in pyproject.toml) on rnnjax/: CI runs it after `make lint`.
# pyright on the sources, then the public API's type completeness as a user's pyright sees it: rnnjax
# installed (not editable) into build/typed and read by `pyright --verifytypes` (.ci/verifytypes.py).
typecheck: $(STAMP_DEV)
	$(VENV)/bin/pyright --pythonpath $(PY)
	rm -rf build/typed && $(PY) -m pip install -q --no-deps --no-build-isolation --target build/typed .
	cd build && PYTHONPATH=typed ../$(VENV)/bin/pyright --verifytypes rnnjax --ignoreexternal \
		--pythonpath ../$(PY) --outputjson | ../$(PY) ../.ci/verifytypes.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any broken link or reference.
# The benchmark tables are generated from benchmarks/results/*.json as it builds (docs/hooks/benchmarks.py).
docs: $(STAMP_DEV)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP_DEV)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

format: $(STAMP_DEV)
	$(VENV)/bin/ruff format $(SRC)
	$(VENV)/bin/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) $(MIN_VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache runs site
