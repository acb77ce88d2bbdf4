# The two set-up commands: `make demo` and `make test`. Each creates .venv (python3 -m venv) and
# installs finegrain into it when it is missing or pyproject.toml changed since.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.finegrain-installed
DEMO   ?= demo
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= disabled

.PHONY: demo test test-fast bench venv clean

PIP_LOG := $(VENV)/pip.log

# One line per step; pip's own output goes to $(PIP_LOG), and its last lines are shown when it fails.
# $(call pip_step,WHAT,PIP INSTALL ARGUMENTS)
pip_step = echo "make: $(1) (pip's output: $(PIP_LOG))"; \
	$(BIN)/python -m pip install --disable-pip-version-check $(2) >>$(PIP_LOG) 2>&1 || \
	{ tail -n 25 $(PIP_LOG); echo "make: pip failed while $(1); the whole log is $(PIP_LOG)"; exit 1; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@: > $(PIP_LOG)
	@$(call pip_step,upgrading pip,--upgrade pip)
	@$(call pip_step,installing finegrain and its dependencies,-e '.[dev]')
	@touch $(STAMP)
	@echo "make: $(VENV) is ready"

venv: $(STAMP)

# The demo: pipelines/demo.yaml draws synthetic birds, splits them, then runs supcon (from the offline
# ImageNet tf_efficientnet_lite0) -> evaluate, prints the comparison with the frozen start and chance,
# where the report is, and what to run on your own photos.
# A second `make demo` reuses every stage (cached); `finegrain run ... --force supcon` reruns one.
demo: $(STAMP)
	$(BIN)/finegrain run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Several hours on a 2-core CPU (bench_own_data.py alone about 2); each script prints its table and writes
# benchmarks/results/*.json; the long ones resume where they stopped.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_throughput.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_eval.py extraction
	$(BIN)/python benchmarks/bench_eval.py index
	$(BIN)/python benchmarks/bench_projection.py
	$(BIN)/python benchmarks/bench_accuracy.py --baselines
	$(BIN)/python benchmarks/bench_label_fraction.py
	$(BIN)/python benchmarks/bench_own_data.py
	$(BIN)/python benchmarks/bench_label_rules.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
