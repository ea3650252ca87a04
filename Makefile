# The two commands of the quick start. Each bootstraps system packages and .venv first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test bootstrap lint typecheck unit clean

bootstrap:
	@scripts/bootstrap.sh

# Runs the quick-start playbook; its last line says where the report is (results/<run-id>/).
run: bootstrap
	$(BIN)/ksmh run playbooks/quickstart.yaml

lint: bootstrap
	$(BIN)/ruff check harness kernel-model tests
	$(BIN)/ruff format --check harness kernel-model tests

typecheck: bootstrap
	$(BIN)/mypy

test: bootstrap lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results
