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

# The demo: synthetic birds -> manifest -> val split -> validation -> SimCLR pretraining of the
# offline ImageNet tf_efficientnet_lite0 (kNN monitor on val before and after). supcon and evaluate
# join as they land.
demo: $(STAMP)
	$(BIN)/finegrain demo-data $(DEMO)/birds --classes 12 --per-class 40
	$(BIN)/finegrain manifest split $(DEMO)/birds/manifest.csv --val-fraction 0.1 --seed 0 -o $(DEMO)/birds/manifest_val.csv
	$(BIN)/finegrain manifest validate $(DEMO)/birds/manifest_val.csv --show-classes
	rm -rf $(DEMO)/runs/pretrain
	$(BIN)/finegrain pretrain --manifest $(DEMO)/birds/manifest_val.csv -o $(DEMO)/runs/pretrain --method simclr \
		--image-size 64 --batch-size 32 --epochs 2 --cache-dir $(DEMO)/.cache --wandb offline

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
