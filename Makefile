# The two commands of the quick start. Each bootstraps system packages and .venv first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

BENCH_OUT ?= results/bench

.PHONY: run test test-long bootstrap lint typecheck unit bench kernels clean

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

# Everything but the tests marked `long` (CI runs this: it must stay under 25 minutes).
test: bootstrap lint typecheck
	$(BIN)/python -m pytest -m "not long" $(PYTEST_ARGS)

# The nightly remainder: the `long` tests (the Debian guest, the quickstart on the model, random
# differential seeds 200-499) and the kernel matrix on both guest kernels with 100 seeds each.
test-long: bootstrap
	$(BIN)/python -m pytest -m long $(PYTEST_ARGS)
	KSM_MATRIX_SEEDS=100 \
		$(BIN)/python -m pytest tests/integration/test_kernel_matrix.py $(PYTEST_ARGS)

# Every benchmark under bench/ (root: real KSM and QEMU guests; ~10 minutes here, plus ~15 for
# bench_model_memory's 64 GiB host model). Each prints
# its table and writes its figures to $(BENCH_OUT)/<name>.json; the KSM lock serialises them
# with anything else driving KSM on this host.
bench: bootstrap
	$(BIN)/python bench/bench_model_vs_kernel.py --json $(BENCH_OUT)/model_vs_kernel.json
	$(BIN)/python bench/bench_model_memory.py --json $(BENCH_OUT)/model_memory.json
	$(BIN)/python bench/bench_shadow.py --json $(BENCH_OUT)/shadow.json
	$(BIN)/python bench/bench_guests.py --json $(BENCH_OUT)/guests.json
	$(BIN)/python bench/bench_density.py --json $(BENCH_OUT)/density.json
	$(BIN)/python bench/bench_doctor.py --json $(BENCH_OUT)/doctor.json
	$(BIN)/python bench/bench_twin.py --json $(BENCH_OUT)/twin.json

# The full kernel matrix (the nightly job): the host and every installed guest kernel, the
# spec's worked examples plus $(KERNELS_SEEDS) random scenarios each, then `ksmh compare`
# with the previous night under $(KERNELS_DIR). Exit status 1 on any mismatch or regression.
KERNELS_SEEDS ?= 200
KERNELS_DIR ?= results/kernels
kernels: bootstrap
	scripts/kernels-nightly.sh $(BIN)/ksmh $(KERNELS_DIR) $(KERNELS_SEEDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results
