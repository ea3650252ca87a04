# The two commands of the quick start. Each bootstraps system packages and .venv first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

BENCH_OUT ?= results/bench

.PHONY: run test bootstrap lint typecheck unit bench clean

bootstrap:
	@scripts/bootstrap.sh

# Runs the quick-start playbook; its last line says where the report is (results/<run-id>/).
run: bootstrap
	$(BIN)/ksmh run playbooks/quickstart.yaml

lint: bootstrap
	$(BIN)/ruff check harness kernel-model tests bench
	$(BIN)/ruff format --check harness kernel-model tests bench

typecheck: bootstrap
	$(BIN)/mypy

test: bootstrap lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark under bench/ (root: real KSM and QEMU guests; ~10 minutes here). Each prints
# its table and writes its figures to $(BENCH_OUT)/<name>.json; the KSM lock serialises them
# with anything else driving KSM on this host.
bench: bootstrap
	$(BIN)/python bench/bench_model_vs_kernel.py --json $(BENCH_OUT)/model_vs_kernel.json
	$(BIN)/python bench/bench_shadow.py --json $(BENCH_OUT)/shadow.json
	$(BIN)/python bench/bench_guests.py --json $(BENCH_OUT)/guests.json
	$(BIN)/python bench/bench_doctor.py --json $(BENCH_OUT)/doctor.json
	$(BIN)/python bench/bench_twin.py --json $(BENCH_OUT)/twin.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results
