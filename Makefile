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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

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
