# `make test`: set up .venv and run the test suite. `make demo`: set up and run the demo.
PY := .venv/bin/python
export WANDB_MODE ?= offline

.PHONY: setup test demo demo-quick
setup:
	scripts/setup.sh dev

test: setup
	$(PY) -m pytest -q

demo:
	scripts/setup.sh demo
	.venv/bin/wspo demo --out demo_out

demo-quick:
	scripts/setup.sh demo
	.venv/bin/wspo demo --quick --out demo_out/quick
