# ddpm-pipe: `make demo` runs the main job on the embedded default; `make test` runs the tests.
PY := .venv/bin/python
PYTEST_ARGS ?=
# make test runs the tests in a shuffled order (pytest-randomly), the same order for the same seed:
# a test that passes only after another has run fails here. TEST_SEED=N picks another order.
TEST_SEED ?= 1

.PHONY: setup demo demo-rgb test test-fast lint bench clean

.venv/bin/ddpm-pipe:
	python3 -m venv .venv
	scripts/install.sh $(PY) pipeline,test,bench

setup: .venv/bin/ddpm-pipe

demo: .venv/bin/ddpm-pipe
	.venv/bin/ddpm-pipe run --name demo

# The same path on RGB data that ships with scikit-learn (its two sample photos in 32x32 crops, a
# seeded 20% held out): a small cifar10-shaped net trained for 4 minutes, sampled with the preset's
# DPM-Solver++ at 20 steps, evaluated offline (pixel and feature scores, the bound's 16-call estimate): 5 min 49 s quiet.
RGB_DEMO := --config cifar10 --set name=rgb-demo --set data.source=sample-images \
	--set model.ch=32 --set "model.ch_mult=[1,2]" --set model.num_res_blocks=1 \
	--set train.batch_size=32 --set train.lr=1e-3 --set train.warmup_steps=100 --set train.ema_decay=0.995 \
	--set train.registered_model=ddpm-rgb-demo
demo-rgb: .venv/bin/ddpm-pipe
	.venv/bin/ddpm-pipe data prepare --source sample-images --split train
	.venv/bin/ddpm-pipe data prepare --source sample-images --split test
	.venv/bin/ddpm-pipe train $(RGB_DEMO) --max-time 4m --run-name rgb-demo
	.venv/bin/ddpm-pipe sample --model models:/ddpm-rgb-demo/latest --num 64
	.venv/bin/ddpm-pipe evaluate --model models:/ddpm-rgb-demo/latest --num 200 --bound estimate

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
