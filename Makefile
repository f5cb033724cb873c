# ddpm-pipe: `make demo` runs the main job on the embedded default; `make test` runs the tests.
PY := .venv/bin/python
PYTEST_ARGS ?=
# make test runs the tests in a shuffled order (pytest-randomly), the same order for the same seed:
# a test that passes only after another has run fails here. TEST_SEED=N picks another order.
TEST_SEED ?= 1

.PHONY: setup demo test test-fast lint bench clean

.venv/bin/ddpm-pipe:
	python3 -m venv .venv
	scripts/install.sh $(PY) pipeline,test,bench

setup: .venv/bin/ddpm-pipe

demo: .venv/bin/ddpm-pipe
	.venv/bin/ddpm-pipe run --name demo

test: .venv/bin/ddpm-pipe
	$(PY) -m pytest -p randomly --randomly-seed=$(TEST_SEED) $(PYTEST_ARGS)

# The quick loop: everything but the tests marked slow (the multi-process Ray cluster jobs), in file order.
test-fast: .venv/bin/ddpm-pipe
	$(PY) -m pytest -m "not slow" -p no:randomly $(PYTEST_ARGS)

lint: .venv/bin/ddpm-pipe
	.venv/bin/ruff check .

bench: .venv/bin/ddpm-pipe
	$(PY) -m benchmarks.run

clean:
	rm -rf .ddpm .pytest_cache  # bench-results/ is tracked: the measured figures the README cites
