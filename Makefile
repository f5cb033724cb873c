# ddpm-pipe: `make demo` runs the main job on the embedded default; `make test` runs the tests.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

.venv/bin/ddpm-pipe:
	python3 -m venv .venv
	scripts/install.sh $(PY) pipeline,test,bench

setup: .venv/bin/ddpm-pipe

demo: .venv/bin/ddpm-pipe
	.venv/bin/ddpm-pipe run --name demo

test: .venv/bin/ddpm-pipe
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: .venv/bin/ddpm-pipe
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: .venv/bin/ddpm-pipe
	.venv/bin/ruff check .

bench: .venv/bin/ddpm-pipe
	$(PY) -m benchmarks.run

clean:
	rm -rf .ddpm .pytest_cache  # bench-results/ is tracked: the measured figures the README cites
