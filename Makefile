# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (Python >= 3.10) and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CLI    := $(BIN)/compressed-perception
OUT    := build/demo

.PHONY: demo test bench build clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[torch]'
	touch $@

$(VENV)/.installed-test: setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

demo: $(VENV)/.installed-run
	$(CLI) detect data/vtest --json $(OUT)/detections.jsonl --annotate $(OUT)/annotated
	$(CLI) replay data/sample_bag --out $(OUT)/replay_bag --overwrite \
		--metrics $(OUT)/replay_metrics.json
	$(CLI) build --quick --out $(OUT)/model --no-progress

# The full default build, shipped as the package's default model (models/default.json)
build: $(VENV)/.installed-run
	$(CLI) build --out build/model
	$(CLI) ship build/model --to models/nanodet_g_compressed --index models/default.json

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-run
	$(CLI) bench --json build/bench.json

clean:
	rm -rf $(VENV) build
