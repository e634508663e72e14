# `make run` and `make test` do all the set-up on a fresh machine (a virtual environment in
# .venv with the project and its test tools), then run the main job / the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 4
# Test processes (pytest-xdist), each taking whole test files: a serial run keeps a 2-core
# machine 40% idle while processes start, wait on signals and sleep between polls.
TEST_JOBS ?= 2

.PHONY: run test test-docs test-extended test-soak lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m src.train

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

# Every command of the README and the guides, run as written (tests/system/test_documented_commands.py).
test-docs: $(VENV)/.installed
	$(PY) -m pytest -q -m docs -n $(TEST_JOBS)

# Second cases of promises the default suite already proves once (pytest -m extended).
test-extended: $(VENV)/.installed
	$(PY) -m pytest -q -m extended -n $(TEST_JOBS)

test-soak: $(VENV)/.installed
	$(PY) -m pytest -q -m soak

# ruff; hadolint on the Dockerfiles (warnings fail); the Kubernetes manifests against the
# pinned Kubernetes version's schemas (kubernetes-validate --strict, via launch/lint_k8s.py).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests launch examples
	$(VENV)/bin/hadolint --no-color --failure-threshold warning docker/Dockerfile.*
	$(PY) -m launch.lint_k8s

clean:
	rm -rf checkpoints .pytest_cache
