# `make test`: set up .venv, lint (ruff) and run the test suite. `make demo`: set up and run the demo.
# `make study`: the fair study, one seed (SEED=0; seeds 1 and 2 each run the same way).
PY := .venv/bin/python
SEED ?= 0
export WANDB_MODE ?= offline

.PHONY: setup lint test demo demo-quick demo-seeds study study-quick
setup:
	scripts/setup.sh dev

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

demo:
	scripts/setup.sh demo
	.venv/bin/wspo demo --out demo_out

demo-quick:
	scripts/setup.sh demo
	.venv/bin/wspo demo --quick --out demo_out/quick

# The spread over two more seeds (same held-out prompts): two more full runs, one thread each side by side.
demo-seeds: demo
	OMP_NUM_THREADS=1 .venv/bin/wspo demo --out demo_out/seed1 --settings.seed 1 > demo_out/seed1.log 2>&1 & one=$$!; \
	OMP_NUM_THREADS=1 .venv/bin/wspo demo --out demo_out/seed2 --settings.seed 2 > demo_out/seed2.log 2>&1 & two=$$!; \
	wait $$one && wait $$two
	.venv/bin/wspo demo-spread demo_out demo_out/seed1 demo_out/seed2 --out demo_out/seeds.md

study:
	scripts/setup.sh demo
	.venv/bin/wspo study --out study_out --settings.seed $(SEED)

study-quick:
	scripts/setup.sh demo
	.venv/bin/wspo study --quick --out study_out/quick --settings.seed $(SEED)
