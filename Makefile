# `make test`: set up .venv, lint (ruff) and run the test suite. `make demo`: set up and run the demo.
PY := .venv/bin/python
export WANDB_MODE ?= offline

.PHONY: setup lint test demo demo-quick
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
